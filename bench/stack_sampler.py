"""Where the app's threads spend a measured window: a sampling profiler from the standard
library (sys._current_frames), for machines where py-spy cannot attach.

    python bench/stack_sampler.py OUT_DIR launch.py ARGS...   # runs launch.py with the sampler

Samples are taken only while OUT_DIR/sampling exists (the bench writes the round's name into it
around the round it measures); OUT_DIR/stacks.json is rewritten every few seconds: per round
and thread name, the share of samples at each innermost frame (file:line function) and the
three frames above it."""

from __future__ import annotations

import collections
import json
import re
import runpy
import sys
import threading
import time
from pathlib import Path

INTERVAL_S = 0.002


def _where(frame, depth: int = 4) -> str:
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " < ".join(parts)


def sample(out: Path) -> None:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    flag, written = out / "sampling", time.monotonic()
    me = threading.get_ident()
    while True:
        time.sleep(INTERVAL_S)
        try:
            round_name = flag.read_text().strip()
        except OSError:
            round_name = None
        if round_name:
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    counts[f"{round_name} / {re.sub(r'[0-9]+', 'N', names.get(ident, '?'))}"][_where(frame)] += 1
        if time.monotonic() - written > 3 and counts:
            written = time.monotonic()
            summary = {name: {"samples": sum(c.values()), "top": [
                {"share": round(n / sum(c.values()), 3), "where": where} for where, n in c.most_common(25)]}
                for name, c in counts.items()}
            (out / "stacks.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=sample, args=(out,), name="stack-sampler", daemon=True).start()
    sys.argv = sys.argv[2:]
    sys.path[0] = str(Path(sys.argv[0]).resolve().parent)  # as if the script were run itself
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
