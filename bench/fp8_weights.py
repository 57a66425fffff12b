"""What fp8 products in the refresh recipe's backward cost beside what they save, per Qwen3-14B
weight: the NF4 weight decoded to bf16 (the forward's dequantization; bitsandbytes' own kernel;
finetune.nf4.decode_nf4) against decoded straight to fp8 (a recompute's) and to fp8 transposed
(the input gradient's; in torch operations two ways, and decode_nf4); a gradient's rows scaled to
fp8; and the products themselves, bf16 against fp8, at 4,096 tokens. Each is torch.compile'd as
the recipe's layers are; the time is the kernels' own, from a profile over 20 runs.

    python bench/fp8_weights.py        # needs CUDA (compute capability 8.9+) and bitsandbytes
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.nf4 import FP8_MAX  # noqa: E402

# Qwen3-14B's 4-bit products inside the recomputed part of a layer (out x in)
SHAPES = {"q, o": (5120, 5120), "k, v": (1024, 5120), "gate, up": (17408, 5120)}
TOKENS = 4096  # the recipe's tokens per forward


def nf4_as_fp8(packed, state, transposed: bool = False, transpose_after: bool = True):
    """bitsandbytes' NF4 weight (out x in) straight to float8_e4m3fn, one scale for the whole
    weight (its largest absmax: NF4 code values are at most 1 in size) repeated per channel as
    torch._scaled_mm's row-wise scaling wants it. `transposed`: (in x out), for the input's
    gradient, whose fp8 product needs the weight K-major; `transpose_after`: decode in the
    weight's order and transpose the fp8 bytes, else decode in the transposed order."""
    import torch

    from finetune.training import nf4_absmax, nf4_codes

    absmax = nf4_absmax(state)
    scale = absmax.max() / FP8_MAX
    weight = (nf4_codes(packed, state) * (absmax / scale).view(-1, 1)).view(state.shape)
    if not transposed:
        return weight.to(torch.float8_e4m3fn), scale.expand(1, state.shape[0])
    if transpose_after:
        return weight.to(torch.float8_e4m3fn).t().contiguous(), scale.expand(1, state.shape[1])
    return weight.t().contiguous().to(torch.float8_e4m3fn), scale.expand(1, state.shape[1])


def triton_nf4_decode(packed, state, fp8: bool = False, transposed: bool = False):
    """finetune.nf4.decode_nf4 with what it takes computed here (tables, scale; the 8-bit absmax is
    decoded inside the kernel), so its time counts them; returns (weight, scale), scale None for bf16."""
    from finetune import nf4

    scales = nf4.BlockScales.of(state)
    scale = scales.decoded().max().reshape(1) / FP8_MAX if fp8 else None
    return nf4.decode_nf4(packed, scales, nf4.nibble_tables(state.code), tuple(state.shape),
                          fp8_inverse_scale=1 / scale if fp8 else None, transposed=transposed), scale


def timed_ms(fn, runs: int = 20) -> float:
    """GPU milliseconds per call: the kernels' own time, summed from a profile. Wall time would
    measure the host instead for a small weight, whose kernels run shorter than a compiled
    function's call from Python (about 0.07 ms)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    return sum(getattr(e, "self_device_time_total", 0) or 0 for e in prof.key_averages()) / 1000 / runs


def main() -> int:
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from finetune.nf4 import fp8_rows
    from finetune.training import dequantize_nf4

    out = Path(os.environ.get("OUT", "bench/results")) / "fp8_weights.jsonl"
    torch.manual_seed(0)
    decode_bf16 = torch.compile(dequantize_nf4)
    decode_fp8 = torch.compile(nf4_as_fp8)
    rows_fp8 = torch.compile(fp8_rows)
    print("| weight | bf16 decode ms | bitsandbytes' bf16 decode | Triton bf16 decode | Triton fp8 decode | "
          "Triton fp8 transposed | fp8 decode | fp8 transposed, decode then transpose | fp8 transposed, "
          "decode transposed | gradient rows to fp8 | bf16 product | fp8 product | fp8 input-gradient product |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        x = torch.randn(TOKENS, k, dtype=torch.bfloat16, device="cuda")
        grad = torch.randn(TOKENS, n, dtype=torch.bfloat16, device="cuda")
        w8, ws = decode_fp8(packed, state)
        wt8, wts = decode_fp8(packed, state, transposed=True)
        x8, xs = rows_fp8(x)
        g8, gs = rows_fp8(grad)
        dense = decode_bf16(packed, state)
        row = {"weight": name, "shape": [n, k], "tokens": TOKENS,
               "bf16_decode_ms": timed_ms(lambda: decode_bf16(packed, state)),
               "bitsandbytes_decode_ms": timed_ms(lambda: dequantize_4bit(packed, state)),
               "fp8_decode_ms": timed_ms(lambda: decode_fp8(packed, state)),
               "fp8_transposed_after_ms": timed_ms(lambda: decode_fp8(packed, state, transposed=True)),
               "fp8_transposed_decode_ms": timed_ms(lambda: decode_fp8(packed, state, True, False)),
               "triton_bf16_decode_ms": timed_ms(lambda: triton_nf4_decode(packed, state)),
               "triton_fp8_decode_ms": timed_ms(lambda: triton_nf4_decode(packed, state, fp8=True)),
               "triton_fp8_transposed_ms": timed_ms(lambda: triton_nf4_decode(packed, state, True, True)),
               "gradient_rows_fp8_ms": timed_ms(lambda: rows_fp8(grad)),
               "bf16_product_ms": timed_ms(lambda: x @ dense.t()),
               "fp8_product_ms": timed_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.contiguous(),
                                                                   out_dtype=torch.bfloat16)),
               "fp8_input_gradient_ms": timed_ms(lambda: torch._scaled_mm(
                   g8, wt8.t(), scale_a=gs, scale_b=wts.contiguous(), out_dtype=torch.bfloat16))}
        exact = x.float() @ dense.float().t()
        fp8 = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.contiguous(), out_dtype=torch.bfloat16)
        row["fp8_product_rel_error"] = ((fp8.float() - exact).norm() / exact.norm()).item()
        # the Triton decodes against bitsandbytes' (bf16: bit for bit) and the compiled fp8 decodes
        # (a multiply by 1/scale instead of a division may move a value by one fp8 step)
        row["triton_bf16_equal"] = torch.equal(triton_nf4_decode(packed, state)[0], dequantize_4bit(packed, state))
        row["triton_fp8_differing"] = (triton_nf4_decode(packed, state, fp8=True)[0].float() != w8.float()
                                       ).float().mean().item()
        row["triton_fp8_transposed_differing"] = (triton_nf4_decode(packed, state, True, True)[0].float()
                                                  != wt8.float()).float().mean().item()
        print(f"| {name} {n}x{k} | " + " | ".join(f"{row[key]:.3f}" for key in (
            "bf16_decode_ms", "bitsandbytes_decode_ms", "triton_bf16_decode_ms", "triton_fp8_decode_ms",
            "triton_fp8_transposed_ms", "fp8_decode_ms", "fp8_transposed_after_ms", "fp8_transposed_decode_ms",
            "gradient_rows_fp8_ms", "bf16_product_ms", "fp8_product_ms", "fp8_input_gradient_ms")) + " |")
        print(f"  Triton bf16 decode equal to bitsandbytes': {row['triton_bf16_equal']}; fp8 values differing from the "
              f"compiled decode: {row['triton_fp8_differing']:.2e}, transposed {row['triton_fp8_transposed_differing']:.2e}")
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
