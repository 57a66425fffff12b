"""The NF4 product of a decode step at Qwen3-14B's shapes: bitsandbytes (what Linear4bit runs:
its GEMV for one row, dequantize + matmul for more) against hangjia's kernels (serving/nf4.py:
the tensor-core kernel `mma`, up to 8 rows), for 1..16 rows, in the same
process. Prints microseconds, the weight bytes read per second, and the largest difference from
the dequantized product. Each kernel is timed as a CUDA graph (a decode step is one: no Python
launch cost) over enough copies of the weight to overflow the 50 MB L2 cache, so every weight is
read from memory as in a decode step, where 40 layers do not fit in L2.

    python bench/nf4_kernel.py            # needs CUDA, bitsandbytes
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

    from serving import nf4

    torch.manual_seed(0)
    out = Path(os.environ.get("OUT", "bench/results")) / "nf4_kernel.jsonl"
    kernels = [k for k in os.environ.get("NF4_KERNELS", "mma").split(",") if k]
    print("| layer | rows | bitsandbytes µs | " + " | ".join(f"{k} µs | {k} ×" for k in kernels)
          + " | mma GB/s | max rel. error |")
    print("|---|---|---|" + "---|---|" * len(kernels) + "---|---|")
    totals: dict[int, dict[str, float]] = {}
    for name, (n, k) in SHAPES.items():
        copies = []
        for _ in range(max(2, -(-256 * 2**20 // (n * k // 2)))):  # > 256 MB of weights in all
            weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            packed, state = F.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=False)
            copies.append((packed, state, state.absmax.float().contiguous()))
        packed, state, absmax = copies[0]
        reference_weight = F.dequantize_4bit(packed, state).float()
        weight_bytes = packed.numel() + state.absmax.numel() * 4
        byte_table = nf4.nf4_byte_table(state.code)
        if "mma" in kernels:
            nf4.tune_mma(packed.view(-1), absmax, byte_table, n, k)
            for rows in (1, 8):
                timings = nf4._mma_timings[(rows, n, k)]
                print(f"RESULT {name} rows={rows} mma configurations (tiles, split, unroll) µs, L2-warm: "
                      + ", ".join(f"{c}: {us:.1f}" for c, us in sorted(timings.items(), key=lambda kv: kv[1])))
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            reference = x.float() @ reference_weight.t()
            one = {"bitsandbytes": lambda p, s, a: bnb.matmul_4bit(x, p.t(), quant_state=s),
                   "mma": lambda p, s, a: nf4.nf4_matmul_mma(x, p.view(-1), a, byte_table, n)}
            row = dict(layer=name, n=n, k=k, rows=rows)
            errors = {}
            for kernel in ["bitsandbytes"] + kernels:
                if kernel == "mma" and rows > nf4.MMA_ROWS:
                    continue
                result = one[kernel](*copies[0])
                errors[kernel] = ((result.float() - reference).abs().max() / reference.abs().max()).item()
                every_copy = lambda run=one[kernel]: [run(*c) for c in copies]  # noqa: E731
                row[f"{kernel}_us"] = round(nf4.graph_time_us(every_copy, repeats=3) / len(copies), 1)
                totals.setdefault(rows, {}).setdefault(kernel, 0.0)
                totals[rows][kernel] += row[f"{kernel}_us"]
            if "mma_us" in row:
                row["mma_config"] = nf4._mma_choice[(nf4._rows_bucket(rows), n, k)]
                row["mma_gb_s"] = round(weight_bytes / row["mma_us"] / 1000, 1)
            row["max_rel_error"] = {kernel: round(e, 5) for kernel, e in errors.items()}
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            cells = " | ".join(f"{row.get(f'{k}_us', '')} | "
                               + (f"{row['bitsandbytes_us'] / row[f'{k}_us']:.2f}" if f"{k}_us" in row else "")
                               for k in kernels)
            print(f"| {name} | {rows} | {row['bitsandbytes_us']} | {cells} | {row.get('mma_gb_s', '')} | "
                  f"{max(errors.values()):.1e} |", flush=True)
    print("\nOne layer of each (x40 for the model's 4-bit products per decode step):")
    for rows, by_kernel in totals.items():
        print(f"RESULT rows={rows}: " + ", ".join(f"{k} {us:.0f} µs per layer -> {40 * us / 1000:.2f} ms per step"
                                                  for k, us in by_kernel.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
