"""What guided tool calls cost per decode step: the batching engine with every user inside a
tool call for every step (the worst case: guidance runs only inside calls), beside the same
engine unguided, in one process, alternating.

    python bench/guided_cost.py                                   # CPU: the embedded model
    python bench/guided_cost.py --model /mnt/q14b/ckpt --users 8  # GPU: Qwen3-14B, 4-bit NF4

The guide is the demo company's tools (webapp/tools/demo_tools.toml, with their aliases),
compiled by xgrammar for the model's tokenizer. Each user's session is opened inside a call
(a free string, an enum, a pattern-checked value, a row each in turn) and reopened whenever
the call is complete, so every row of every step is masked. Prompts are
random tokens, answers a fixed length, greedy. Rows go to bench/results/guided_cost.jsonl
($OUT/guided_cost.jsonl where OUT is set); a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def demo_tools() -> tuple[list[dict], dict]:
    data = tomllib.loads((ROOT / "webapp/tools/demo_tools.toml").read_text(encoding="utf-8"))
    tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                               "parameters": t.get("parameters", {"type": "object"})}}
             for t in data["tool"]]
    return tools, {t["name"]: t.get("aliases", {}) for t in data["tool"]}


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Qwen3 folder (4-bit NF4 on a GPU); default: the embedded model on CPU")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="unguided and guided runs, alternating")
    args = parser.parse_args()

    import torch
    from provenance import append, commit, cpu_device, gpu_device
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.decoding import BatchingEngine, DecodeRequest, StaticDecoder
    from serving.guided import GuidedSession, GuideVocabulary, ToolCallGuide

    code = commit()
    cuda = torch.cuda.is_available()
    if args.model:
        from gpu_train import load_4bit

        folder = args.model
        model = load_4bit(folder) if cuda else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        import tempfile

        from webapp.models import ensure_embedded_model

        folder = str(ensure_embedded_model(Path(tempfile.gettempdir()) / "hangjia-bench-models"))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    started = time.perf_counter()
    vocabulary = GuideVocabulary.for_model(tokenizer, model)
    vocabulary_s = time.perf_counter() - started
    tools, aliases = demo_tools()
    started = time.perf_counter()
    guide = ToolCallGuide.from_tools(tools, aliases)
    vocabulary.compile(guide)
    compile_s = time.perf_counter() - started
    # the rows' calls begin in a free string, in an enum, in a pattern-checked value
    openings = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (
        '<tool_call>\n{"name": "lookup_customer", "arguments": {"name_or_id": "',
        '<tool_call>\n{"name": "query_sales", "arguments": {"region": "',
        '<tool_call>\n{"name": "query_sales", "arguments": {"region": "华东", "period": "')]

    class AlwaysInCall(GuidedSession):
        """A session that opens a call again as soon as one is complete: every step is guided."""

        def __init__(self, number: int):
            super().__init__(vocabulary.compile(guide), vocabulary)
            self.opening = openings[number % len(openings)]
            self.reopen()

        def advance(self, token_id: int) -> None:
            started = time.perf_counter()
            super().advance(token_id)
            host["advance"] += time.perf_counter() - started
            if self.matcher is None:
                started = time.perf_counter()
                self.reopen()
                host["reopen"] += time.perf_counter() - started
                host["reopens"] += 1

        def reopen(self) -> None:
            self.text.clear()
            self.call_start = None
            for token in self.opening:
                super().advance(token)

    # the host's share of a guided step: the matchers' advancing and mask_rows (both run while the
    # GPU computes the step: the advancing follows the last step's tokens); reopening is the bench's own
    import serving.decoding as decoding

    host = dict(advance=0.0, reopen=0.0, reopens=0, mask=0.0, steps=0)
    masking = decoding.mask_rows

    def timed_mask_rows(logits, sessions):
        started = time.perf_counter()
        masking(logits, sessions)
        host["mask"] += time.perf_counter() - started
        host["steps"] += 1

    decoding.mask_rows = timed_mask_rows
    generator = torch.Generator().manual_seed(7)
    limit = min(len(tokenizer), model.config.vocab_size) - 300
    prompts = torch.randint(0, limit, (args.users, args.prompt_len), generator=generator).tolist()
    decoder = StaticDecoder(model, max_batch=args.users, max_len=args.prompt_len + args.new_tokens + 64)
    engine = BatchingEngine(decoder)

    def run(guided: bool) -> tuple[float, list[list[int]]]:
        sessions = [AlwaysInCall(number) if guided else None for number in range(len(prompts))]
        sync()
        started = time.perf_counter()
        requests = [engine.submit(DecodeRequest(list(p), max_new_tokens=args.new_tokens, guide=s))
                    for p, s in zip(prompts, sessions)]
        outputs = [r.collect() for r in requests]
        first = max(r.first_token_at for r in requests) - started
        sync()
        wall = time.perf_counter() - started
        return 1000 * (wall - first) / (args.new_tokens - 1), outputs

    try:
        run(False), run(True)  # warm-up: graphs, the mask kernel's compilation
        steps = {False: [], True: []}
        texts = []
        host.update(advance=0.0, reopen=0.0, reopens=0, mask=0.0, steps=0)
        for _ in range(args.rounds):
            for guided in (False, True):
                ms, outputs = run(guided)
                steps[guided].append(ms)
                if guided:
                    texts = [tokenizer.decode(o) for o in outputs[:2]]
    finally:
        engine.close()
    plain, guided = statistics.median(steps[False]), statistics.median(steps[True])
    row = dict(model=folder if args.model else "embedded SmolLM2-135M-Instruct", users=args.users,
               prompt_len=args.prompt_len, new_tokens=args.new_tokens, rounds=args.rounds,
               ms_per_step_unguided=round(plain, 3), ms_per_step_guided=round(guided, 3),
               overhead_ms=round(guided - plain, 3), overhead_pct=round(100 * (guided - plain) / plain, 2),
               all_unguided=[round(x, 3) for x in steps[False]], all_guided=[round(x, 3) for x in steps[True]],
               host_ms_per_step=dict(mask_rows=round(1000 * host["mask"] / max(host["steps"], 1), 3),
                                     advance=round(1000 * host["advance"] / max(host["steps"], 1), 3),
                                     bench_reopen=round(1000 * host["reopen"] / max(host["steps"], 1), 3)),
               reopens=host["reopens"], vocabulary_s=round(vocabulary_s, 3), compile_s=round(compile_s, 3),
               tokenizer_tokens=len(tokenizer), sample_guided_output=texts[0][:300] if texts else "")
    out = Path(os.environ.get("OUT", ROOT / "bench/results")) / "guided_cost.jsonl"
    append(out, "bench/guided_cost.py", gpu_device() if cuda else cpu_device(), code, **row)
    print(json.dumps(row, ensure_ascii=False, indent=1))
    print(f"\n| users | ms/step unguided | ms/step, every row inside a call | overhead |\n|---|---|---|---|\n"
          f"| {args.users} | {plain:.2f} | {guided:.2f} | {guided - plain:+.2f} ms ({row['overhead_pct']:+.1f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
