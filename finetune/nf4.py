"""Joined 4-bit weights for the serving decoder, and an NF4 kernel for small batches.

`FusedNF4` joins layers that read the same input (q/k/v; gate/up) into one weight, so a layer
runs 4 products per step instead of 7: 52 ms to first token and 10.8 ms per decode step for
Qwen3-14B on an H200, against 69 and 11.6 layer by layer (README, Performance). The joined
buffer is the layers' own storage: each layer's weight becomes a view into it, nothing is held
twice, and bitsandbytes' own path (training, `generate()`) keeps working on the same bytes.
By default the joined weight goes through bitsandbytes' kernels (GEMV for one row, dequantize +
matmul for more).

`nf4_matmul` (opt-in: kernel="triton") reads the packed weight once for up to 16 rows and
dequantizes in registers, so 8 rows cost what 1 row does, where bitsandbytes' dequantize +
matmul costs 2.1-2.4x. But it reaches 130-350 GB/s against bitsandbytes' ~600 GB/s GEMV, so it
is slower at every batch size measured; it stays as the start of a Marlin-style kernel.

bitsandbytes' layout: weight (out, in) row-major, two values per byte (the even index in the
high nibble), one absmax per 64 consecutive values, values from a 16-entry code (NF4).
"""

from __future__ import annotations

from typing import Sequence

import torch

MAX_ROWS = 16  # up to this many rows per product use the kernel; more use dequantize + matmul
GROUP = 64  # values per absmax (bitsandbytes' default blocksize, required here)

_kernels: dict[str, object] = {}


def _build_kernels() -> dict[str, object]:
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk, "GROUPS": g}, num_warps=w, num_stages=st)
               for bn, sk, g, w, st in [(32, 1, 2, 4, 3), (64, 1, 2, 4, 3), (128, 1, 2, 4, 3), (64, 1, 4, 4, 3),
                                        (32, 2, 2, 4, 3), (64, 2, 2, 4, 3), (128, 2, 2, 8, 3), (32, 4, 2, 4, 3),
                                        (64, 4, 2, 4, 3), (64, 2, 4, 4, 4), (128, 4, 1, 4, 4), (16, 1, 4, 4, 3)]]

    @triton.jit
    def nf4_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, M_BUCKET,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, GROUPS: tl.constexpr,
                   ITERATIONS: tl.constexpr):
        # out^T tile (BLOCK_N x BLOCK_M) = W tile (BLOCK_N x 64) @ x^T (64 x BLOCK_M), group by group:
        # the weight is the row-major operand as stored; all index arithmetic per element is
        # pointer + scalar (no 64-bit division per element, which had made it 5x slower)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        safe_cols = tl.where(col_ok, cols, 0).to(tl.int64)  # rows past N read row 0; never stored
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < M
        half = tl.arange(0, 32)  # a group of 64 values is 32 bytes
        weight_at = w_ptr + safe_cols[:, None] * (K // 2) + half[None, :]
        scale_at = absmax_ptr + safe_cols * (K // 64)
        x_at = x_ptr + rows[None, :] * K + 2 * half[:, None]  # x^T, even columns of a group
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        first = pid_k * ITERATIONS * GROUPS
        for i in range(ITERATIONS):  # K / SPLIT_K values per program, GROUPS x 64 at a time
            for g in tl.static_range(GROUPS):
                group = first + i * GROUPS + g
                x_even = tl.load(x_at + group * 64, mask=row_ok[None, :], other=0.0)
                x_odd = tl.load(x_at + group * 64 + 1, mask=row_ok[None, :], other=0.0)
                packed = tl.load(weight_at + group * 32)
                high = tl.load(code_ptr + (packed >> 4).to(tl.int32)).to(x_even.dtype)
                low = tl.load(code_ptr + (packed & 15).to(tl.int32)).to(x_even.dtype)
                part = tl.dot(high, x_even) + tl.dot(low, x_odd)
                acc += part * tl.load(scale_at + group)[:, None]
        tl.atomic_add(out_ptr + rows[None, :] * N + cols[:, None], acc, mask=col_ok[:, None] & row_ok[None, :],
                      sem="relaxed")

    iterations = triton.heuristics({"ITERATIONS": lambda a: a["K"] // (a["SPLIT_K"] * a["GROUPS"] * GROUP)})
    return {"fixed": nf4_kernel, "tuned": triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"],
                                                          reset_to_zero=["out_ptr"])(iterations(nf4_kernel))}


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               out_features: int, config: dict | None = None) -> torch.Tensor:
    """x (..., K) bf16 @ W.T for an NF4 weight W (out_features, K); at most MAX_ROWS rows.
    The tile shape is tuned per (rows bucket, N, K) on first use, unless `config` fixes it
    (BLOCK_N, SPLIT_K, GROUPS: as the tests do, which run Triton's interpreter on CPU)."""
    if not _kernels:
        _kernels.update(_build_kernels())
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows, k = x2.shape
    if rows > MAX_ROWS or k % (GROUP * 8):
        raise ValueError(f"nf4_matmul takes up to {MAX_ROWS} rows and K a multiple of {GROUP * 8}")
    out = torch.zeros(rows, out_features, dtype=torch.float32, device=x.device)
    bucket = 1 if rows == 1 else (4 if rows <= 4 else 16)

    def grid(meta):
        return (-(-out_features // meta["BLOCK_N"]), meta["SPLIT_K"])

    if config:
        _kernels["fixed"][grid(config)](x2, packed, absmax, code, out, rows, out_features, k, bucket, BLOCK_M=16,
                                        ITERATIONS=k // (config["SPLIT_K"] * config["GROUPS"] * GROUP), **config)
    else:
        _kernels["tuned"][grid](x2, packed, absmax, code, out, rows, out_features, k, bucket, BLOCK_M=16)
    return out.to(x.dtype).reshape(*shape[:-1], out_features)


class FusedNF4:
    """Several bitsandbytes 4-bit layers with the same input, as one weight (their storage)."""

    def __init__(self, layers: Sequence[torch.nn.Module], kernel: str = "bitsandbytes"):
        if kernel not in ("bitsandbytes", "triton"):
            raise ValueError(f"unknown NF4 kernel {kernel!r}: bitsandbytes or triton")
        self.kernel = kernel
        states = [layer.weight.quant_state for layer in layers]
        first = states[0]
        if any(layer.weight.data.numel() * 2 % GROUP for layer in layers):
            raise ValueError("a layer's value count is not a multiple of 64: its last scale would be shared")
        if any(getattr(s, "packing_format_for_cpu", False) for s in states):
            raise ValueError("bitsandbytes repacked these layers for its CPU kernel: not the NF4 layout read here")
        if any(s.nested or s.blocksize != GROUP or s.quant_type != "nf4" or s.shape[1] != first.shape[1]
               or not torch.equal(s.code, first.code) for s in states):
            raise ValueError("only flat (not double-quantised) NF4 layers of one input size, blocksize 64, fuse")
        self.sizes = [int(s.shape[0]) for s in states]
        self.in_features = int(first.shape[1])
        self.packed = torch.cat([layer.weight.data.reshape(-1) for layer in layers])
        self.absmax = torch.cat([s.absmax.reshape(-1).float() for s in states])
        self.code = first.code.float().contiguous()
        self.dtype = first.dtype
        offset = absmax_offset = 0
        for layer, state in zip(layers, states):  # each layer now reads its slice of the joined buffer
            count, scales = layer.weight.data.numel(), state.absmax.numel()
            layer.weight.data = self.packed[offset:offset + count].view(layer.weight.data.shape)
            state.absmax = self.absmax[absmax_offset:absmax_offset + scales]
            offset, absmax_offset = offset + count, absmax_offset + scales
        import bitsandbytes.functional as bnb_functional

        self._state = bnb_functional.QuantState(
            absmax=self.absmax, shape=torch.Size([sum(self.sizes), self.in_features]), code=self.code,
            blocksize=GROUP, quant_type="nf4", dtype=self.dtype)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        rows = x.numel() // x.shape[-1]
        if x.is_cuda and self.kernel == "triton" and rows <= MAX_ROWS:
            y = nf4_matmul(x, self.packed, self.absmax, self.code, sum(self.sizes))
        elif x.is_cuda:  # bitsandbytes' GEMV for one row, dequantize + matmul for more
            import bitsandbytes as bnb

            y = bnb.matmul_4bit(x, self.packed.view(-1, 1).t(), quant_state=self._state)
        else:
            import bitsandbytes.functional as bnb_functional

            weight = bnb_functional.dequantize_4bit(self.packed, self._state)
            y = x @ weight.to(x.dtype).t()
        return list(y.split(self.sizes, dim=-1))


def fusable(layer: torch.nn.Module) -> bool:
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return state is not None and getattr(layer, "bias", None) is None
