"""Manage the company knowledge base from a shell (the app must be stopped: DuckDB has one writer).

    python -m webapp.knowledge add policy.pdf handbook.docx --departments finance,hr
    python -m webapp.knowledge add notice.md --company-wide
    python -m webapp.knowledge list
    python -m webapp.knowledge delete 12
    python -m webapp.knowledge search "应收账款周转率" --department finance
    python -m webapp.knowledge rebuild          # the FAISS index, from DuckDB
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m webapp.knowledge", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="as for launch.py (default: settings)")
    parser.add_argument("--config", type=Path, default=None, help="the app's TOML settings file")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add or replace documents")
    add.add_argument("paths", nargs="+", type=Path, help="files, or folders (searched for txt/md/pdf/docx)")
    readers = add.add_mutually_exclusive_group(required=True)
    readers.add_argument("--departments", help="comma-separated department ids that may read them")
    readers.add_argument("--company-wide", action="store_true", help="every department may read them")
    commands.add_parser("list", help="list documents")
    delete = commands.add_parser("delete", help="delete a document")
    delete.add_argument("document_id", type=int)
    search = commands.add_parser("search", help="search as a department would")
    search.add_argument("query")
    search.add_argument("--department", required=True)
    search.add_argument("-k", type=int, default=5)
    commands.add_parser("rebuild", help="rebuild the FAISS index from DuckDB")
    return parser


def _files(paths: list[Path]) -> list[Path]:
    from webapp.knowledge.parsing import SUPPORTED

    found = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED))
        else:
            found.append(path)
    return found


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from storage import Database, DatabaseLockedError, accounts, migrate
    from webapp.services import open_knowledge
    from webapp.settings import SettingsError, load_settings

    argv_settings = [*(["--config", str(args.config)] if args.config else []),
                     *(["--data-dir", str(args.data_dir)] if args.data_dir else [])]
    try:
        settings = load_settings(argv_settings)
        db = Database(settings.db_path)
    except (SettingsError, DatabaseLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        migrate(db)
        if args.command == "rebuild":
            settings.knowledge_dir.joinpath("chunks.faiss").unlink(missing_ok=True)
        knowledge = open_knowledge(db, settings)
        if args.command == "add":
            departments = [d.strip() for d in (args.departments or "").split(",") if d.strip()]
            known = sorted(d.id for d in accounts.list_departments(db))
            unknown = sorted(set(departments) - set(known))
            if unknown:
                print(f"error: unknown departments {', '.join(unknown)}; known: "
                      f"{', '.join(known) or '(none yet: start the app once to create the first ones)'}",
                      file=sys.stderr)
                return 2
            files = _files(args.paths)
            failed = 0
            bar = tqdm(total=len(files), unit="file")
            for path in files:
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    bar.write(f"❌ {path}: cannot be read ({exc.strerror or exc})")
                    failed += 1
                    bar.update()
                    continue
                bar.set_description(path.name)
                for report in knowledge.add_files([(path.name, data)], departments, args.company_wide):
                    failed += report.status == "error"
                    bar.write(f"{'❌' if report.status == 'error' else '✅'} {report.name}: {report.status}"
                              f" · {report.message}")
                bar.update()
            bar.close()
            return 1 if failed else 0
        if args.command == "list":
            for d in knowledge.documents():
                readers = "company-wide" if d.company_wide else ",".join(d.departments)
                print(f"{d.id:>5}  {d.title[:40]:40}  {d.source_name[:30]:30}  {readers:20}  {d.chunks:>5} passages")
            return 0
        if args.command == "delete":
            if not knowledge.delete(args.document_id):
                print(f"error: no document {args.document_id}", file=sys.stderr)
                return 1
            print(f"deleted document {args.document_id}")
            return 0
        if args.command == "search":
            for rank, hit in enumerate(knowledge.search(args.department, args.query, args.k), 1):
                print(f"{rank}. [{hit.score:.4f}] {hit.title} {hit.location or ''}\n   {hit.text[:200]}")
            return 0
        if args.command == "rebuild":
            print(f"rebuilt: {len(knowledge.documents())} documents, version {knowledge.version}")
            return 0
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
