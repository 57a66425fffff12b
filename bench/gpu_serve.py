"""hangjia's serving path at Qwen3-14B scale, 4-bit NF4, on one GPU: the batched paged-cache
decoder (serving/decoding.py) against transformers' generate() on the same loaded model.

    python bench/gpu_serve.py --model Qwen/Qwen3-14B
    python bench/gpu_serve.py --random-weights --ckpt /mnt/q14b
    TINY=1 python bench/gpu_serve.py --random-weights --ckpt /tmp/tiny     # dry run on CPU

Prompts are 512 random tokens, answers exactly 256 tokens (stop tokens ignored: random
weights would stop anywhere), greedy. Two LoRA adapters (r=64, q/k/v, non-zero weights) are
loaded, as two departments would have. Rows are appended to bench/results/gpu_serve.jsonl
($OUT/gpu_serve.jsonl where OUT is set); a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train import add_model_arguments, model_path  # noqa: E402 (bench/ on the path first)


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def add_adapters(model, r: int):
    import torch
    from peft import LoraConfig, get_peft_model

    config = dict(r=r, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, LoraConfig(**config), adapter_name="finance")
    model.add_adapter("hr", LoraConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3)
    return model.eval()


def on_bitsandbytes(decoder) -> None:
    """Decode steps on bitsandbytes' GEMV / dequantize + matmul, as the joined layers run where
    the tensor-core kernel cannot (the comparison for hangjia's kernel)."""
    for fused in decoder._fused.values():
        fused.kernel = "bitsandbytes"


def without_prefix_reuse(decoder) -> None:
    """Every prompt computed in full: a shared start is never long enough to copy."""
    decoder.MIN_REUSED_PREFIX = decoder.max_len + 1


def with_prefix_reuse(decoder) -> None:
    decoder.__dict__.pop("MIN_REUSED_PREFIX", None)


def run_requests(engine, prompts, adapters, new_tokens: int) -> tuple[float, list[float], list[list[int]]]:
    """All requests submitted at once; wall time, each one's time to first token, tokens."""
    from serving.decoding import DecodeRequest

    sync()
    started = time.perf_counter()
    requests = [engine.submit(DecodeRequest(list(p), max_new_tokens=new_tokens, adapter=a))
                for p, a in zip(prompts, adapters)]
    outputs = [request.collect() for request in requests]
    first = [r.first_token_at - started for r in requests]  # stamped by the engine, not by this reader
    sync()
    return time.perf_counter() - started, first, outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--skip-generate", action="store_true", help="leave out generate() on this model")
    parser.add_argument("--variants", type=int, default=8, help="how many of hangjia's variants to run (1: the default only)")
    parser.add_argument("--only", nargs="*", help="run the variants whose label contains one of these words")
    parser.add_argument("--max-len", type=int, help="longest turn in tokens (default: prompt + answer + 64)")
    args = parser.parse_args()

    import torch
    from gpu_train import load_4bit

    from serving.decoding import BatchingEngine, StaticDecoder

    model = add_adapters(load_4bit(model_path(args)), args.lora_r)
    cuda = torch.cuda.is_available()
    generator = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, 151643, (args.batch, args.prompt_len), generator=generator).tolist()
    rows = []
    out = Path(os.environ.get("OUT", "bench/results")) / "gpu_serve.jsonl"

    def record(**row):
        rows.append(row)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print("RESULT", json.dumps(row), flush=True)

    # a turn of the app may take up to --decode-max-len tokens (the model's context by default)
    max_len = args.max_len or args.prompt_len + args.new_tokens + 64
    greedy_ours: list[int] = []
    first_user: dict[str, list[int]] = {}
    # (label, the decoder's options, what the bench changes on the decoder it made): hangjia's
    # default first, then each lever taken away
    eager_prefill = "hangjia before: q/k/v and gate/up joined (bitsandbytes kernels), eager prefill"
    before = dict(graph_prefill=False, join_lora=False)
    variants = [("hangjia: decode steps on the tensor-core NF4 kernel", {}, None),
                ("hangjia before: bitsandbytes' GEMV / dequantize + matmul for decode steps", {}, on_bitsandbytes),
                ("hangjia before: LoRA per layer, prefill as a CUDA graph", dict(join_lora=False), on_bitsandbytes),
                (eager_prefill, before, on_bitsandbytes),
                ("paged cache + CUDA graphs + compiled norms/rope", dict(before, fused_nf4=False), None)]
    chosen = [v for v in variants if not args.only or any(word in v[0] for word in args.only)]
    for label, options, change in (chosen[:args.variants] if cuda else variants[:1]):
        decoder = engine = None
        try:
            # every prompt computed in full here (the warm-up saw the same prompts); the reuse of a
            # shared prompt start is measured on its own below
            decoder = StaticDecoder(model, max_batch=args.batch, max_len=max_len, **options)
            without_prefix_reuse(decoder)
            if change is not None:
                change(decoder)
            engine = BatchingEngine(decoder)
            run_requests(engine, prompts[:1], ["finance"], 16)  # warm-up: kernels, graph capture bs 1
            run_requests(engine, prompts, ["finance"] * args.batch, 16)  # and the batch's graph
            # time to first token: prefill of the prompt + the first token, alone
            ttft = []
            for _ in range(5):
                wall, first, _ = run_requests(engine, prompts[:1], ["finance"], 1)
                ttft.append(first[0])
            for users, adapters in ((1, ["finance"]), (1, [None]),
                                    (args.batch, [["finance", "hr", None][i % 3] for i in range(args.batch)])):
                wall, first, outputs = run_requests(engine, prompts[:users], adapters, args.new_tokens)
                tokens = sum(len(o) for o in outputs)
                record(path=label, users=users, adapters=sorted({str(a) for a in adapters}),
                       ttft_ms=round(1000 * statistics.median(ttft), 1), ttft_all_ms=[round(1000 * t, 1) for t in ttft],
                       wall_s=round(wall, 3),
                       tok_s=round(tokens / wall, 1), per_user_tok_s=round(tokens / users / wall, 1),
                       first_token_ms_p50=round(1000 * statistics.median(first), 1),
                       ms_per_step=round(1000 * (wall - max(first)) / (args.new_tokens - 1), 2),
                       peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
                if users > 1:
                    greedy_ours = outputs[0][:32]
                    first_user[label] = greedy_ours
            if label == eager_prefill or not cuda:
                # chat turns of one department share the system prompt and tool schemas: here the
                # first 7/8 of the prompt, computed by the first turn and copied by the next five
                # (an eager prefill's lever: a graphed one computes the whole prompt instead)
                with_prefix_reuse(decoder)
                shared = prompts[0][:args.prompt_len * 7 // 8]
                tails = torch.randint(0, 151643, (6, args.prompt_len - len(shared)), generator=generator).tolist()
                reused = [run_requests(engine, [shared + tail], ["finance"], 1)[1][0] for tail in tails][1:]
                record(path=label + ", shared prompt start reused", users=1, adapters=["finance"],
                       ttft_ms=round(1000 * statistics.median(reused), 1), ttft_all_ms=[round(1000 * t, 1) for t in reused],
                       shared_tokens=len(shared),
                       reused_tokens=decoder.reused_tokens)
        except Exception as exc:  # keep measuring the other paths
            import traceback

            traceback.print_exc()
            record(path=label, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        finally:
            if engine is not None:
                engine.close()
        del decoder, engine
        if cuda:
            torch.cuda.empty_cache()

    for label_b, b in list(first_user.items())[1:]:  # each variant against the first, same model and prompt
        label_a, a = next(iter(first_user.items()))
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        record(check=f"greedy tokens of the first user, {label_a} vs {label_b}", same_leading_tokens=agree, of=len(a))

    if not args.skip_generate:  # the stock path on the same model, the adapter chosen per request as the app did
        ids = torch.tensor(prompts, device=model.device)
        for users in (1, args.batch):
            kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                          temperature=None, top_p=None, top_k=None, pad_token_id=0,
                          adapter_names=["finance"] * users)
            with torch.inference_mode():
                model.generate(input_ids=ids[:users], **kwargs)  # warm-up
                sync()
                started = time.perf_counter()
                first = model.generate(input_ids=ids[:users], **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
                sync()
                ttft = time.perf_counter() - started
                started = time.perf_counter()
                output = model.generate(input_ids=ids[:users], **kwargs)
                sync()
                wall = time.perf_counter() - started
            record(path="transformers generate() (stock)", users=users, adapters=["finance"],
                   ttft_ms=round(1000 * ttft, 1), wall_s=round(wall, 3),
                   tok_s=round(users * args.new_tokens / wall, 1),
                   per_user_tok_s=round(args.new_tokens / wall, 1),
                   ms_per_step=round(1000 * (wall - ttft) / (args.new_tokens - 1), 2))
            if users == args.batch and greedy_ours:
                reference = output[0, args.prompt_len:args.prompt_len + 32].tolist()
                agree = next((i for i, (a, b) in enumerate(zip(reference, greedy_ours)) if a != b), len(reference))
                record(check="greedy tokens of the first user, ours vs generate()", same_leading_tokens=agree,
                       of=len(reference))
            del first

    print("\n| path | users | adapters | TTFT ms (512-token prompt) | tok/s all users | tok/s per user | ms/step |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['path']} | error: {row['error'][:120]} | | | | | |")
        elif "path" in row:
            print(f"| {row['path']} | {row['users']} | {', '.join(row['adapters'])} | {row['ttft_ms']} | "
                  f"{row.get('tok_s', '')} | {row.get('per_user_tok_s', '')} | {row.get('ms_per_step', '')} |")
        else:
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
