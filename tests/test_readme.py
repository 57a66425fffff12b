"""The README is a contract: its commands are the ones CI runs, and its schema is the real one."""

import re
from pathlib import Path

from storage import Database, migrate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


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

    schema = README.split("<!-- schema:start -->", 1)[1].split("<!-- schema:end -->", 1)[0]
    documented = {}
    for table, body in re.findall(r"### (\w+)\n(.*?)(?=\n### |\Z)", schema, re.S):
        documented[table] = dict(re.findall(r"^\| `(\w+)` \| ([\w(),]+) \|", body, re.M))
    assert documented == actual
