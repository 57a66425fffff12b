"""The GPU benchmarks run end to end on CPU (tiny random model) before GPU time is spent on
them, and write rows in the shared results schema: a bench that breaks on its own bookkeeping
wastes a whole GPU run (bench/gpu_long.py once stopped on its result writing, on an H100)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path, *args, **env):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OUT": str(tmp_path), **env})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def rows(path: Path) -> list[dict]:
    found = [json.loads(line) for line in path.read_text().splitlines()]
    for row in found:
        assert {"bench", "variant", "commit", "device", "date", "versions"} <= set(row), row
    return found


@pytest.mark.slow  # writes a tiny checkpoint, loads it in 4 bits and serves long and short turns
def test_the_long_turn_benchmark_runs_on_cpu_and_records_each_scenario(tmp_path):
    run(tmp_path, "bench/gpu_long.py", "--random-weights", "--ckpt", str(tmp_path / "ckpt"), "--lengths", "200,400",
        "--short-prompt", "24", "--short-answer", "16", "--new-tokens", "8", "--users", "2", "--chunk", "64",
        "--kv-tokens", "2048", TINY="1")
    recorded = rows(tmp_path / "gpu_long.jsonl")
    scenarios = [(r["variant"], r.get("scenario"), r.get("prompt_tokens")) for r in recorded]
    assert ("hangjia engine", "one user", 400) in scenarios and ("transformers generate() (stock)", "one user", 400) in scenarios
    beside = next(r for r in recorded if r.get("long_prompt_tokens") == 400 and r["variant"] == "hangjia engine")
    assert beside["users"] == 2 and beside["steps_during_long_prefill"] >= 1 and beside["long_ttft_ms"] > 0


def test_the_paged_attention_benchmark_checks_its_variants_on_cpu(tmp_path):
    run(tmp_path, "bench/paged_attention.py", "--cpu")
    recorded = rows(tmp_path / "paged_attention.jsonl")
    assert {r["variant"] for r in recorded} == {"reference: pages gathered + SDPA",
                                                 "fixed slots: SDPA over a contiguous cache"}
    assert all(r["max_abs_diff"] < 1e-4 for r in recorded)
