"""Imports run one way between the packages (the layout in README.md): serving imports neither
webapp nor finetune; finetune never imports webapp; webapp reaches finetune only for samples,
datasets and refreshes. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# what the app takes from the training package: samples, datasets (with their slot-swap
# augmentation) and the refresh runner
WEBAPP_USES_OF_FINETUNE = {"finetune.samples", "finetune.dataset", "finetune.augment", "finetune.refresh"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from finetune import nf4` imports finetune.nf4
            found += [(node.lineno, f"{node.module}.{alias.name}" if node.module in ("finetune", "serving", "webapp")
                       else node.module) for alias in node.names]
    return found


def crossings(package: str) -> list[str]:
    """'file:line module' for each import from `package` of another of hangjia's packages."""
    return [f"{path.relative_to(ROOT)}:{line} {module}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for line, module in imports_of(path)
            if module.split(".")[0] in {"webapp", "finetune", "serving", "storage"} - {package}]


def top(module: str, depth: int = 2) -> str:
    return ".".join(module.split(".")[:depth])


def test_serving_imports_neither_webapp_nor_finetune():
    assert [c for c in crossings("serving") if c.split()[-1].startswith(("webapp", "finetune"))] == []


def test_finetune_never_imports_webapp():
    assert [c for c in crossings("finetune") if c.split()[-1].startswith("webapp")] == []


def test_webapp_imports_finetune_only_for_samples_datasets_and_refreshes():
    assert [c for c in crossings("webapp") if c.split()[-1].startswith("finetune")
            and top(c.split()[-1]) not in WEBAPP_USES_OF_FINETUNE] == []


@pytest.mark.parametrize("source, module", [("from finetune.decoding import StaticDecoder", "finetune.decoding"),
                                            ("def f():\n    from finetune import nf4", "finetune.nf4"),
                                            ("import webapp.engine", "webapp.engine")])
def test_the_walk_finds_imports_at_any_depth(tmp_path, source, module):
    path = tmp_path / "module.py"
    path.write_text(source)
    assert [m for _, m in imports_of(path)] == [module]
