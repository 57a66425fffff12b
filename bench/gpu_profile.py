"""Where a decode step's GPU time goes, at Qwen3-14B scale in 4 bits: hangjia's decoder
(fused NF4 layers, two LoRA adapters) profiled over eager steps at batch 1 and 8, with the
tensor-core NF4 kernel and with bitsandbytes', kernel time summed per kind. A CUDA graph
replays the same kernels without the launch gaps, so these sums are what the graphed step costs.

    python bench/gpu_profile.py --model Qwen/Qwen3-14B
    python bench/gpu_profile.py --random-weights --ckpt /mnt/q14b
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train import add_model_arguments, model_path  # noqa: E402 (bench/ on the path first)

KINDS = (  # first match wins: kernel name fragment -> kind
    ("nf4_small_m", "4-bit product (hangjia's tensor-core kernel)"),
    ("gemv_4bit", "4-bit GEMV (bitsandbytes)"), ("kgemm_4bit", "4-bit GEMV (bitsandbytes)"),
    ("dequantize", "4-bit dequantize (bitsandbytes)"), ("flash", "attention"), ("fmha", "attention"),
    ("attention", "attention"), ("gemm", "bf16 GEMM (LoRA, head, dequantized weights)"),
    ("gemv", "bf16 GEMM (LoRA, head, dequantized weights)"), ("cutlass", "bf16 GEMM (LoRA, head, dequantized weights)"),
    ("nvjet", "bf16 GEMM (LoRA, head, dequantized weights)"),
    ("index", "KV cache writes / indexing"), ("scatter", "KV cache writes / indexing"),
    ("reduce", "norms and reductions"), ("triton", "compiled norms/rope"),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for fragment, kind in KINDS if fragment in lowered), "other elementwise")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import torch
    from gpu_serve import add_adapters
    from gpu_train import load_4bit
    from torch.profiler import ProfilerActivity, profile

    from finetune.decoding import StaticDecoder

    model = add_adapters(load_4bit(model_path(args)), 64)
    out = Path(os.environ.get("OUT", "/tmp")) / "gpu_profile.jsonl"
    for nf4_kernel, batch in (("mma", 1), ("mma", 8), ("bitsandbytes", 1), ("bitsandbytes", 8)):
        decoder = StaticDecoder(model, max_batch=8, max_len=1024, use_graphs=False, nf4_kernel=nf4_kernel)
        for row in range(batch):
            decoder.set_row_adapter(row, ["finance", "hr", None][row % 3])
        tokens, positions = [11] * batch, [600 + row for row in range(batch)]
        for _ in range(3):
            decoder.decode(tokens, positions)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                decoder.decode(tokens, positions)
            torch.cuda.synchronize()
        totals: dict[str, float] = collections.defaultdict(float)
        kernels = 0
        for event in prof.key_averages():
            cuda_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            if cuda_us:
                totals[kind_of(event.key)] += cuda_us / args.steps / 1000
                kernels += event.count
        row = {"batch": batch, "nf4_kernel": nf4_kernel, "kernels_per_step": round(kernels / args.steps),
               "gpu_ms_per_step": round(sum(totals.values()), 2),
               "by_kind_ms": {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
               "top_kernels": [(e.key[:80], round((getattr(e, "self_device_time_total", 0) or 0) / args.steps / 1000, 3))
                               for e in sorted(prof.key_averages(),
                                               key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:8]]}
        print("RESULT", json.dumps(row), flush=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        del decoder
    return 0


if __name__ == "__main__":
    sys.exit(main())
