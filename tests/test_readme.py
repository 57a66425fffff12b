"""The README and docs/ are a contract: the README's commands are the ones CI runs, the documented
schema is the real one, and every result they cite exists."""

import re
from pathlib import Path

from storage import Database, migrate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
OPERATIONS = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2
    start, test = commands
    assert "launch.py --demo" in start and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text(), ".ci/run must run the README's test command"
    assert (ROOT / "scripts" / "setup.sh").is_file()


def test_every_column_is_documented_and_every_documented_column_exists(tmp_path):
    db = Database(tmp_path / "schema.duckdb")
    migrate(db)
    actual = {}
    for row in db.query(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
    ):
        actual.setdefault(row["table_name"], {})[row["column_name"]] = row["data_type"]
    db.close()

    schema = OPERATIONS.split("<!-- schema:start -->", 1)[1].split("<!-- schema:end -->", 1)[0]
    documented = {}
    for table, body in re.findall(r"### (\w+)\n(.*?)(?=\n### |\Z)", schema, re.S):
        documented[table] = dict(re.findall(r"^\| `(\w+)` \| ([\w(),]+) \|", body, re.M))
    assert documented == actual


def missing_results(text: str) -> list[str]:
    """The bench/results/... paths a text cites that are not in the repository."""
    cited = re.findall(r"bench/results/[^\s`)\],;:]*", text)
    return sorted({path.rstrip(".") for path in cited if not (ROOT / path.rstrip(".")).exists()})


def test_every_result_the_docs_cite_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = {doc.name: missing_results(doc.read_text(encoding="utf-8")) for doc in docs}
    assert not {name: paths for name, paths in missing.items() if paths}


def test_a_cited_result_that_does_not_exist_is_reported():
    text = "Rows: `bench/results/gpu_serve.jsonl` and bench/results/2026-11-29-h200-serve-*.jsonl."
    assert missing_results(text) == ["bench/results/2026-11-29-h200-serve-*.jsonl"]
