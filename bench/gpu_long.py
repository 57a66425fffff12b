"""Long turns on Qwen3-14B, 4-bit NF4, one GPU: a whole report in one prompt, served by the
batched paged-cache engine (serving/decoding.py) beside transformers' generate() on the same
loaded model.

    python bench/gpu_long.py --model Qwen/Qwen3-14B
    python bench/gpu_long.py --random-weights --ckpt /mnt/q14b
    TINY=1 python bench/gpu_long.py --random-weights --ckpt /tmp/tiny --lengths 256,512 --short-prompt 32  # dry run on CPU

1. One user, prompts of --lengths tokens (8k, 16k, 32k): time to first token and decode tok/s,
   hangjia's engine and generate().
2. --users users chatting (--short-prompt-token prompts, --short-answer tokens each) alone, then
   the same while one more sends a --lengths[-1]-token prompt: their tok/s and the worst gap
   between two of their tokens while the long prompt is prefilled (it goes in --chunk tokens
   at a time between their steps).
3. Peak GPU memory at each point, and how many users of the longest prompt fit in the memory
   left next to the weights (the KV cache a token needs, times the prompt).

Random tokens, greedy, answers of a fixed length (stop tokens ignored: random weights stop
anywhere), one LoRA adapter (r=64, q/k/v) loaded as a department's. Rows are appended to
bench/results/gpu_long.jsonl ($OUT/gpu_long.jsonl where OUT is set); a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_serve import add_adapters, sync  # noqa: E402 (bench/ on the path first)
from gpu_train import add_model_arguments, model_path  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--lengths", default="8192,16384,32768", help="prompt lengths for one user, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64, help="answer length of the one user")
    parser.add_argument("--users", type=int, default=7, help="users chatting beside the long prompt")
    parser.add_argument("--short-prompt", type=int, default=512)
    parser.add_argument("--short-answer", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=2048, help="prompt tokens prefilled between two decode steps")
    parser.add_argument("--kv-tokens", type=int, default=65536, help="the engine's KV cache, in tokens")
    parser.add_argument("--skip-generate", action="store_true", help="leave out generate() on this model")
    args = parser.parse_args()

    import torch
    from gpu_train import load_4bit
    from provenance import append, commit, cpu_device, gpu_device

    from serving.decoding import BatchingEngine, DecodeRequest, StaticDecoder

    code = commit()
    cuda = torch.cuda.is_available()
    model = add_adapters(load_4bit(model_path(args)), 64)
    config = model.config
    lengths = [int(n) for n in args.lengths.split(",")]
    longest = lengths[-1]
    vocab = min(config.vocab_size, 151643)
    generator = torch.Generator().manual_seed(11)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    out = Path(os.environ.get("OUT", "bench/results")) / "gpu_long.jsonl"
    rows: list[dict] = []
    device = gpu_device() if cuda else cpu_device()

    def record(**row):
        variant = row.pop("path", None) or row["setup"]
        row = append(out, "bench/gpu_long.py", device, code, variant=variant, **row)
        rows.append(row)
        print("RESULT", json.dumps(row, ensure_ascii=False), flush=True)

    def peak_gib() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    def reset_peak():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    weights_gib = round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None
    max_len = max(int(getattr(config, "max_position_embeddings", 0) or 0), longest + args.new_tokens + 64)
    decoder = StaticDecoder(model, max_batch=args.users + 1, max_len=max_len, kv_tokens=args.kv_tokens)
    engine = BatchingEngine(decoder, prefill_chunk=args.chunk)
    steps: list[tuple[float, int]] = []
    engine.on_step = lambda active: steps.append((time.perf_counter(), active))
    kv_token_bytes = (decoder.keys.nbytes + decoder.values.nbytes) // ((decoder.total_pages + 1) * decoder.page_size)
    record(setup="engine", weights_gib=weights_gib, kv_tokens=decoder.kv_tokens,
           kv_gib=round((decoder.keys.nbytes + decoder.values.nbytes) / 2**30, 2), kv_kib_per_token=kv_token_bytes / 1024,
           page_size=decoder.page_size, chunk=args.chunk, max_len=max_len)

    def one(prompt: list[int], new_tokens: int) -> tuple[float, float, float, list[int]]:
        """(time to first token s, decode tok/s after it, wall s, the answer) of one request alone."""
        sync()
        started = time.perf_counter()
        request = engine.submit(DecodeRequest(prompt, max_new_tokens=new_tokens, adapter="finance"))
        answer = request.collect(timeout=3600)
        sync()
        ended = time.perf_counter()
        first = request.first_token_at - started
        return first, (len(answer) - 1) / max(ended - request.first_token_at, 1e-9), ended - started, answer

    try:
        # -- 1. one user, long prompts -----------------------------------------------------
        for length in lengths:
            prompt = tokens(length)
            one(tokens(length), args.new_tokens)  # warm-up (graphs, kernels), other tokens: nothing to reuse
            decoder.reused_tokens = 0
            reset_peak()
            ttft, rate, wall, ours = one(prompt, args.new_tokens)
            record(path="hangjia engine", scenario="one user", prompt_tokens=length, ttft_ms=round(1000 * ttft, 1),
                   decode_tok_s=round(rate, 1), wall_s=round(wall, 2), peak_gib=peak_gib(),
                   reused_tokens=decoder.reused_tokens)
            if not args.skip_generate:
                ids = torch.tensor([prompt], device=model.device)
                kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0,
                              adapter_names=["finance"])
                reset_peak()
                with torch.inference_mode():
                    model.generate(input_ids=ids[:, :256], max_new_tokens=2, **kwargs)  # warm-up
                    sync()
                    started = time.perf_counter()
                    model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
                    sync()
                    first = time.perf_counter() - started
                    started = time.perf_counter()
                    output = model.generate(input_ids=ids, max_new_tokens=args.new_tokens,
                                            min_new_tokens=args.new_tokens, **kwargs)
                    sync()
                    wall = time.perf_counter() - started
                theirs = output[0, length:].tolist()
                same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                record(path="transformers generate() (stock)", scenario="one user", prompt_tokens=length,
                       ttft_ms=round(1000 * first, 1),
                       decode_tok_s=round((args.new_tokens - 1) / max(wall - first, 1e-9), 1),
                       wall_s=round(wall, 2), peak_gib=peak_gib(), same_leading_tokens_as_engine=same, of=len(theirs))
                del ids, output
                if cuda:
                    torch.cuda.empty_cache()

        # -- 2. users chatting, with and without a long prompt arriving ----------------------
        def chat_round(with_report: bool, label: str | None) -> None:
            # prompts of their own each round: none is a start another round left in the cache
            chats, report = [tokens(args.short_prompt) for _ in range(args.users)], tokens(longest)
            steps.clear()
            reset_peak()
            sync()
            requests = [engine.submit(DecodeRequest(c, max_new_tokens=args.short_answer, adapter="finance"))
                        for c in chats]
            long = None
            if with_report:
                while any(r.first_token_at == 0 for r in requests):  # they are all being answered
                    time.sleep(0.001)
                long_started = time.perf_counter()
                long = engine.submit(DecodeRequest(report, max_new_tokens=args.new_tokens, adapter="finance"))
            done = [0] * len(requests)

            def read(i):
                done[i] = len(requests[i].collect(timeout=3600))

            readers = [threading.Thread(target=read, args=(i,)) for i in range(len(requests))]
            for t in readers:
                t.start()
            for t in readers:
                t.join()
            chats_ended = time.perf_counter()
            if long is not None:
                long.collect(timeout=3600)
            sync()
            if label is None:
                return
            first = max(r.first_token_at for r in requests)
            decode_s = chats_ended - first
            window = [t for t, _ in steps if t >= first]
            gaps = [b - a for a, b in zip(window, window[1:])]
            row = dict(path="hangjia engine", scenario=label, users=len(requests),
                       per_user_tok_s=round(statistics.mean(d - 1 for d in done) / decode_s, 1),
                       worst_gap_ms=round(1000 * max(gaps), 1), median_gap_ms=round(1000 * statistics.median(gaps), 1),
                       peak_gib=peak_gib())
            if long is not None:
                prefilling = [t for t in window if long_started <= t <= long.first_token_at]
                during = [b - a for a, b in zip(prefilling, prefilling[1:])]
                row.update(long_prompt_tokens=longest, long_ttft_ms=round(1000 * (long.first_token_at - long_started), 1),
                           steps_during_long_prefill=len(prefilling),
                           worst_gap_during_long_prefill_ms=round(1000 * max(during), 1) if during else None)
            record(**row)

        chat_round(True, None)  # warm-up: the graphs of these batch sizes and page counts
        chat_round(False, f"{args.users} users alone")
        chat_round(True, f"{args.users} users, one more sends {longest} tokens")

        # -- 3. how many of the longest prompt fit beside the weights -------------------------
        if cuda:
            free, total = torch.cuda.mem_get_info()
            held = torch.cuda.memory_reserved()
            activations = max(r.get("peak_gib") or 0 for r in rows if r.get("variant") == "hangjia engine") * 2**30 \
                - (decoder.keys.nbytes + decoder.values.nbytes) - (weights_gib or 0) * 2**30
            per_user = kv_token_bytes * (longest + args.new_tokens)
            room = total - (weights_gib or 0) * 2**30 - max(activations, 0) - 2**30  # 1 GiB for CUDA's own
            record(setup="capacity", gpu_total_gib=round(total / 2**30, 1), free_gib_now=round(free / 2**30, 1),
                   reserved_gib_now=round(held / 2**30, 1), activations_gib=round(max(activations, 0) / 2**30, 2),
                   kv_gib_per_long_user=round(per_user / 2**30, 2),
                   long_users_that_fit=int(room // per_user), long_prompt_tokens=longest)
    finally:
        engine.close()

    print("\n| path | scenario | prompt tokens | TTFT ms | decode tok/s | per-user tok/s | worst gap ms | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "scenario" in row:
            print(f"| {row['variant']} | {row['scenario']} | {row.get('prompt_tokens', row.get('long_prompt_tokens', ''))} "
                  f"| {row.get('ttft_ms', row.get('long_ttft_ms', ''))} | {row.get('decode_tok_s', '')} "
                  f"| {row.get('per_user_tok_s', '')} "
                  f"| {row.get('worst_gap_during_long_prefill_ms', row.get('worst_gap_ms', ''))} | {row['peak_gib']} |")
        else:
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
