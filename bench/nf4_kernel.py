"""The NF4 product of a decode step at Qwen3-14B's shapes: bitsandbytes (what Linear4bit runs:
its GEMV for one row, dequantize + matmul for more) against hangjia's kernel (finetune/nf4.py),
for 1..16 rows, in the same process. Prints microseconds, the weight bytes read per second,
and the largest difference from the dequantized product.

    python bench/nf4_kernel.py            # needs CUDA, bitsandbytes, triton
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Qwen3-14B: hidden 5120, 40 query heads and 8 key/value heads of 128, MLP 17408
SHAPES = {"q/k/v fused": (7168, 5120), "o": (5120, 5120), "gate/up fused": (34816, 5120), "down": (5120, 17408)}


def main() -> int:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    from triton.testing import do_bench

    from finetune.nf4 import nf4_matmul, nibble_tables

    torch.manual_seed(0)
    out = Path(os.environ.get("OUT", "/tmp")) / "nf4_kernel.jsonl"
    print("| layer | rows | bitsandbytes µs | hangjia µs | × | hangjia GB/s | max rel. error |")
    print("|---|---|---|---|---|---|---|")
    totals: dict[int, list[float]] = {}
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        packed, state = F.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=False)
        reference_weight = F.dequantize_4bit(packed, state).float()
        weight_bytes = packed.numel() + state.absmax.numel() * 4
        tables = nibble_tables(state.code)
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            ours = nf4_matmul(x, packed.view(-1), state.absmax, tables, n)  # tunes on first call
            reference = x.float() @ reference_weight.t()
            error = ((ours.float() - reference).abs().max() / reference.abs().max()).item()
            stock_us = 1000 * do_bench(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), warmup=25, rep=100)
            ours_us = 1000 * do_bench(lambda: nf4_matmul(x, packed.view(-1), state.absmax, tables, n),
                                      warmup=25, rep=100)
            totals.setdefault(rows, [0.0, 0.0])
            totals[rows][0] += stock_us
            totals[rows][1] += ours_us
            row = dict(layer=name, n=n, k=k, rows=rows, bnb_us=round(stock_us, 1), ours_us=round(ours_us, 1),
                       gb_s=round(weight_bytes / ours_us / 1000, 1), max_rel_error=round(error, 5))
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"| {name} | {rows} | {stock_us:.1f} | {ours_us:.1f} | {stock_us / ours_us:.2f} | "
                  f"{row['gb_s']} | {error:.1e} |", flush=True)
    print("\nOne layer of each (×40 for the model's 4-bit products per decode step):")
    for rows, (stock, ours) in totals.items():
        print(f"RESULT rows={rows}: bitsandbytes {stock:.0f} µs, hangjia {ours:.0f} µs per layer "
              f"-> {40 * stock / 1000:.1f} vs {40 * ours / 1000:.1f} ms per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
