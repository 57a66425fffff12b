"""Training samples on the command line (the app must be stopped: DuckDB has one writer).

    python -m finetune export --data-dir hangjia-data --out samples.jsonl [--department finance] [--split train]
    python -m finetune import --data-dir hangjia-data samples.jsonl --department finance [--no-scrub-pii]
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
    for sub in (export, imp):
        sub.add_argument("--data-dir", type=Path, default=Path("hangjia-data"))
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


if __name__ == "__main__":
    sys.exit(main())
