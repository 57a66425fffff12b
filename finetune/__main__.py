"""Training samples on the command line (the app must be stopped: DuckDB has one writer).

    python -m finetune export --data-dir hangjia-data --out samples.jsonl [--department finance] [--split train]
    python -m finetune import --data-dir hangjia-data samples.jsonl --department finance [--no-scrub-pii]
    python -m finetune refresh --data-dir hangjia-data --adapter finance [--force] [--model PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write samples as OpenAI-format JSONL")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--split", choices=("train", "eval"))
    imp = commands.add_parser("import", help="import a JSONL file of samples, all or nothing")
    imp.add_argument("file", type=Path)
    imp.add_argument("--scrub-pii", action=argparse.BooleanOptionalAction, default=True)
    imp.add_argument("--eval-fraction", type=float, default=0.1)
    refresh = commands.add_parser("refresh", help="refresh one department's adapter now (the nightly recipe)")
    refresh.add_argument("--adapter", required=True, help="the department whose adapter to refresh")
    refresh.add_argument("--force", action="store_true", help="run even below the new-sample threshold")
    refresh.add_argument("--model", help="base model folder or hub id; default: the embedded model's folder")
    refresh.add_argument("--auto-promote", action=argparse.BooleanOptionalAction, default=True)
    refresh.add_argument("--min-new-samples", type=int, default=20)
    for sub in (export, imp, refresh):
        sub.add_argument("--data-dir", type=Path, default=Path("hangjia-data"))
        if sub is not refresh:
            sub.add_argument("--department", help="only this department (export) / import into it")
    args = parser.parse_args(argv)

    from finetune.dataset import ImportRefused, export_jsonl, import_jsonl
    from storage import Database, StorageError, migrate

    try:
        db = Database(args.data_dir / "hangjia.duckdb")
    except StorageError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        migrate(db)
        if args.command == "refresh":
            return refresh_now(db, args)
        if args.command == "export":
            text = export_jsonl(db, [args.department] if args.department else None, args.split)
            tmp = args.out.with_name(args.out.name + ".part")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(args.out)  # never a half-written file under the real name
            print(f"wrote {text.count(chr(10))} samples to {args.out}")
        else:
            try:
                text = args.file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                print(f"cannot read {args.file}: {exc}", file=sys.stderr)
                return 1
            try:
                result = import_jsonl(db, text, args.department, None, args.scrub_pii, args.eval_fraction)
            except ImportRefused as exc:
                print(exc, file=sys.stderr)
                return 1
            print(f"imported {result.imported} samples ({result.by_split}), "
                  f"{result.near_duplicates} near-duplicates of earlier ones")
    finally:
        db.close()
    return 0


def refresh_now(db, args) -> int:
    """The same refresh the app runs, headless. The app must be stopped; the promoted
    version is what it loads at its next start."""
    import json

    from finetune.refresh import RefreshRunner, RefreshSettings
    from storage import adapters as registry
    from storage import reviews

    samples = reviews.list_samples(db, args.adapter)
    latest = samples[-1] if samples else None
    messages = json.loads(latest["messages"]) if latest else []
    system_prompt = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    tools = json.loads(latest["tools"]) if latest and latest["tools"] else []
    model = args.model or str(args.data_dir / "models" / "SmolLM2-135M-Instruct")
    runner = RefreshRunner(
        db, RefreshSettings(min_new_samples=args.min_new_samples, auto_promote=args.auto_promote,
                            system_prompt=system_prompt),
        lambda: model, args.data_dir / "adapters", args.data_dir / "runs", lambda department: tools,
        lambda department, version: registry.activate(db, department, version))

    def show(event):
        if event["event"] == "step":
            print(f"step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} ETA {event['eta_s']:.0f} s",
                  flush=True)
        elif event["event"] == "mode":
            print(event["mode"], flush=True)

    outcome = runner.refresh(args.adapter, "cli", force=args.force, on_progress=show)
    print(f"{outcome.status}" + (f": {outcome.reason}" if outcome.reason else "")
          + (f"; candidate {outcome.version}, gate {'passed' if outcome.gate['passed'] else 'failed'}"
             f"{', promoted' if outcome.promoted else ''}" if outcome.version else ""))
    return 0 if outcome.status in ("succeeded", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
