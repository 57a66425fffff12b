"""Joined 4-bit weights for the serving decoder, and an NF4 kernel for small batches.

`FusedNF4` joins layers that read the same input (q/k/v; gate/up) into one weight, so a layer
runs 4 products per step instead of 7: 52 ms to first token and 10.8 ms per decode step for
Qwen3-14B on an H200, against 69 and 11.6 layer by layer (README, Performance). The joined
buffer is the layers' own storage: each layer's weight becomes a view into it, nothing is held
twice, and bitsandbytes' own path (training, `generate()`) keeps working on the same bytes.
By default the joined weight goes through bitsandbytes' kernels (GEMV for one row, dequantize +
matmul for more).

`nf4_matmul` (opt-in: kernel="triton") reads the packed weight once for up to 16 rows in wide
tiles and dequantizes each tile once (a byte through two 256-entry tables, its high and low value)
for all rows. At 14B on an H200 it reaches up to 740 GB/s against bitsandbytes' ~1 TB/s GEMV:
0.5-0.66x bitsandbytes per layer for one row and 0.51-0.62x for 8 (no tensor cores), so it stays
opt-in (README, Performance).

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

    # split-K 1 only: the output is stored once, in its own dtype (a split needs a zeroed fp32
    # buffer, atomics and a cast: two more kernels per product, ~1 ms per step at 14B)
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bn, bk, w, st in [(8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (16, 1024, 8, 3),
                                     (32, 256, 4, 3), (32, 512, 8, 3), (64, 256, 8, 3), (8, 1024, 4, 4),
                                     (16, 512, 4, 4), (32, 128, 4, 4), (4, 1024, 4, 3), (16, 256, 2, 4)]]

    @triton.jit
    def nf4_kernel(x_ptr, w_ptr, absmax_ptr, high_ptr, low_ptr, out_ptr, N, K,
                   M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Each program: BLOCK_N outputs over all of K. A tile is BLOCK_N weight rows x BLOCK_K/2
        # bytes, read once with wide contiguous loads and dequantised once (a 256-entry table per
        # nibble position: one byte -> its high and its low value), then used by all M rows of x.
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        safe = tl.where(col_ok, cols, 0).to(tl.int64)  # rows past N read row 0; never stored
        HALF: tl.constexpr = BLOCK_K // 2
        GROUPS: tl.constexpr = BLOCK_K // 64
        byte = tl.arange(0, HALF)
        weight_at = w_ptr + safe[:, None] * (K // 2) + byte[None, :]
        scale_at = absmax_ptr + safe[:, None] * (K // 64) + tl.arange(0, GROUPS)[None, :]
        rows = tl.arange(0, M_PAD)  # M rounded up to a power of two; rows past M are never stored
        acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            packed = tl.load(weight_at + k0 // 2).to(tl.int32)
            scales = tl.load(scale_at + k0 // 64)
            high = tl.reshape(tl.load(high_ptr + packed), (BLOCK_N, GROUPS, 32)) * scales[:, :, None]
            low = tl.reshape(tl.load(low_ptr + packed), (BLOCK_N, GROUPS, 32)) * scales[:, :, None]
            high = tl.reshape(high, (BLOCK_N, HALF))
            low = tl.reshape(low, (BLOCK_N, HALF))
            for m in tl.static_range(M):
                x_even = tl.load(x_ptr + m * K + k0 + 2 * byte).to(tl.float32)
                x_odd = tl.load(x_ptr + m * K + k0 + 2 * byte + 1).to(tl.float32)
                part = tl.sum(high * x_even[None, :] + low * x_odd[None, :], axis=1)
                acc += tl.where(rows[:, None] == m, part[None, :], 0.0)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=col_ok[None, :] & (rows[:, None] < M))

    def fits(configs, named_args, **kwargs):  # a tile must not straddle the end of K (128 always fits)
        return [c for c in configs if named_args["K"] % c.kwargs["BLOCK_K"] == 0]

    return {"fixed": nf4_kernel,
            "tuned": triton.autotune(configs=configs, key=["M", "N", "K"], prune_configs_by={"early_config_prune": fits})(
                nf4_kernel)}


def nibble_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value of a byte's high nibble, value of its low nibble) for all 256 bytes, fp32."""
    byte = torch.arange(256, device=code.device)
    return code.float()[byte >> 4].contiguous(), code.float()[byte & 15].contiguous()


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
               out_features: int, config: dict | None = None) -> torch.Tensor:
    """x (..., K) @ W.T for an NF4 weight W (out_features, K), `tables` from nibble_tables(code);
    at most MAX_ROWS rows, K a multiple of 128. The tile shape is tuned per (rows, N, K) on first
    use, unless `config` fixes it (BLOCK_N, BLOCK_K: as the tests do, which run Triton's
    interpreter on CPU)."""
    if not _kernels:
        _kernels.update(_build_kernels())
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows, k = x2.shape
    if rows > MAX_ROWS or k % (GROUP * 2):
        raise ValueError(f"nf4_matmul takes up to {MAX_ROWS} rows and K a multiple of {GROUP * 2}")
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    high, low = tables

    def grid(meta):
        return (-(-out_features // meta["BLOCK_N"]),)

    padded = 1 << (rows - 1).bit_length()
    if config:
        _kernels["fixed"][grid(config)](x2, packed, absmax, high, low, out, out_features, k, M=rows, M_PAD=padded,
                                        **config)
    else:
        _kernels["tuned"][grid](x2, packed, absmax, high, low, out, out_features, k, M=rows, M_PAD=padded)
    return out.reshape(*shape[:-1], out_features)


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
        self.tables = nibble_tables(self.code)
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
        return list(self.joined(x).split(self.sizes, dim=-1))

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs side by side (in the order they were given)."""
        rows = x.numel() // x.shape[-1]
        if x.is_cuda and self.kernel == "triton" and rows <= MAX_ROWS:
            y = nf4_matmul(x, self.packed, self.absmax, self.tables, sum(self.sizes))
        elif x.is_cuda:  # bitsandbytes' GEMV for one row, dequantize + matmul for more
            import bitsandbytes as bnb

            y = bnb.matmul_4bit(x, self.packed.view(-1, 1).t(), quant_state=self._state)
        else:
            import bitsandbytes.functional as bnb_functional

            weight = bnb_functional.dequantize_4bit(self.packed, self._state)
            y = x @ weight.to(x.dtype).t()
        return y


def fusable(layer: torch.nn.Module) -> bool:
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return state is not None and getattr(layer, "bias", None) is None
