"""Joined 4-bit weights for the serving decoder, and an NF4 kernel for small batches.

`FusedNF4` joins layers that read the same input (q/k/v; gate/up) into one weight, so a layer
runs 4 products per step instead of 7: 52 ms to first token and 10.8 ms per decode step for
Qwen3-14B on an H200, against 69 and 11.6 layer by layer (README, Performance). The joined
buffer is the layers' own storage: each layer's weight becomes a view into it, nothing is held
twice, and bitsandbytes' own path (training, `generate()`) keeps working on the same bytes.
Decode steps (up to 8 rows) multiply on the tensor cores with `nf4_matmul_mma`
(serving/nf4_mma.cu, compiled at run time by NVRTC): 4.8 ms of 4-bit products per decode step
at 14B for one row and 5.2 ms for 8, against bitsandbytes' 6.4 and 18.1 (README, Performance). More rows (a prefill), GPUs before compute capability 8.0 and fp16 models use
bitsandbytes' kernels (GEMV for one row, dequantize + matmul for more).

bitsandbytes' layout: weight (out, in) row-major, two values per byte (the even index in the
high nibble), one absmax per 64 consecutive values, values from a 16-entry code (NF4).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger(__name__)

GROUP = 64  # values per absmax (bitsandbytes' default blocksize, required here)

MMA_ROWS = 8  # the tensor-core kernel's B operand is 8 rows wide
# (16-row tiles per warp, warps per block splitting K, 64-value blocks per load round): the
# shapes the kernel is compiled in; each product's shape and row count keeps its fastest (tune_mma)
MMA_CONFIGS = ((1, 4, 2), (1, 8, 2), (2, 4, 2), (2, 8, 2), (4, 4, 2), (1, 4, 4), (2, 4, 4), (1, 8, 4),
               (1, 16, 2), (2, 16, 2))
_mma_kernels: dict[tuple[int, int, int], object] = {}
_mma_choice: dict[tuple[int, int, int], tuple[int, int, int]] = {}
_mma_timings: dict[tuple[int, int, int], dict[tuple[int, int, int], float]] = {}  # what tune_mma measured (µs)
_mma_refusals: set[str] = set()  # said once each, not once per layer


def _mma_kernel(config: tuple[int, int, int]):
    """serving/nf4_mma.cu compiled by NVRTC for this GPU (torch's own runtime compiler: no
    nvcc, no build step), once per configuration."""
    if config not in _mma_kernels:
        from pathlib import Path

        tiles, split, unroll = config
        source = Path(__file__).with_name("nf4_mma.cu").read_text()
        _mma_kernels[config] = torch.cuda._compile_kernel(
            source, "nf4_small_m", nvcc_options=["-std=c++17", f"-DTILES={tiles}", f"-DSPLIT={split}",
                                                 f"-DUNROLL={unroll}"])
    return _mma_kernels[config]


def nf4_byte_table(code: torch.Tensor) -> torch.Tensor:
    """For each of the 256 bytes, its two code values as one bf16x2 word (the high nibble's, the
    lower k, in the low half): what the tensor-core kernel decodes a byte with."""
    import numpy as np

    bits = code.float().cpu().to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    byte = np.arange(256)
    words = (bits[byte >> 4] | (bits[byte & 15] << 16)).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32)).to(code.device)


def nf4_matmul_mma(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, byte_table: torch.Tensor,
                   out_features: int, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x (..., K) @ W.T for a flat NF4 weight W (out_features, K) on the tensor cores: up to
    MMA_ROWS rows of bf16 x, K a multiple of 64, absmax fp32, byte_table from nf4_byte_table.
    The configuration is the one tune_mma chose for this shape, or `config`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if x2.data_ptr() % 16:  # the kernel reads x 16 bytes at a time: a view may start mid-way
        x2 = x2.clone()
    rows, k = x2.shape
    if rows > MMA_ROWS or k % GROUP or x2.dtype != torch.bfloat16:
        raise ValueError(f"nf4_matmul_mma takes up to {MMA_ROWS} bf16 rows and K a multiple of {GROUP}")
    config = config or _mma_choice.get((_rows_bucket(rows), out_features, k), MMA_CONFIGS[0])
    tiles, split, _ = config
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    _mma_kernel(config)(grid=(-(-out_features // (16 * tiles)), 1, 1), block=(32 * split, 1, 1),
                        args=[x2, packed, absmax, byte_table, out, rows, out_features, k])
    return out.reshape(*shape[:-1], out_features)


def mma_unavailable(device: torch.device) -> str | None:
    """Why the tensor-core kernel cannot run on `device`, or None when it can: it needs bf16
    mma.sync (compute capability 8.0: A100, H100, RTX 30xx and later) and torch's runtime
    compiler (torch 2.8+). Elsewhere the joined layers use bitsandbytes' kernels."""
    if device.type != "cuda":
        return "not a CUDA device"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no runtime CUDA compiler (torch.cuda._compile_kernel)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"compute capability {major}.{minor} has no bf16 tensor-core mma (8.0 or later needed)"
    return None


def _rows_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: the tensor-core kernel's tuning key."""
    return 1 << (rows - 1).bit_length()


def graph_time_us(run, repeats: int = 20) -> float:
    """Microseconds per call of `run`, replayed as a CUDA graph: the GPU's time, not the
    Python launch's (a decode step is a graph too)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up outside the capture (compiles, allocates)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            run()
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    stop.record()
    stop.synchronize()
    return 1000 * start.elapsed_time(stop) / repeats


def tune_mma(packed: torch.Tensor, absmax: torch.Tensor, byte_table: torch.Tensor, out_features: int, k: int) -> None:
    """Keeps the fastest configuration per shape and row count (1, 2, 4, 8), timed once at load
    (eagerly, before any decode step is captured)."""
    for rows in (1, 2, 4, 8):
        if (rows, out_features, k) in _mma_choice:
            continue
        x = torch.randn(rows, k, dtype=torch.bfloat16, device=packed.device)
        timings = {config: graph_time_us(lambda c=config: nf4_matmul_mma(x, packed, absmax, byte_table,
                                                                         out_features, c))
                   for config in MMA_CONFIGS}
        _mma_choice[(rows, out_features, k)] = min(timings, key=timings.get)
        _mma_timings[(rows, out_features, k)] = timings


class FusedNF4:
    """Several bitsandbytes 4-bit layers with the same input, as one weight (their storage)."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.kernel = "mma"  # decode steps on the tensor cores; "bitsandbytes" where it cannot run
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
        if self.packed.is_cuda:
            reason = mma_unavailable(self.packed.device)
            try:
                if reason is None:
                    self.byte_table = nf4_byte_table(self.code)
                    tune_mma(self.packed, self.absmax, self.byte_table, sum(self.sizes), self.in_features)
            except Exception as exc:  # e.g. a driver that cannot compile or load it
                reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                if reason not in _mma_refusals:
                    log.warning("the tensor-core NF4 kernel is off (%s); bitsandbytes' kernels serve instead", reason)
                    _mma_refusals.add(reason)
                self.kernel = "bitsandbytes"

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.joined(x).split(self.sizes, dim=-1))

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs side by side (in the order they were given)."""
        rows = x.numel() // x.shape[-1]
        if x.is_cuda and self.kernel == "mma" and rows <= MMA_ROWS and x.dtype == torch.bfloat16:
            y = nf4_matmul_mma(x, self.packed, self.absmax, self.byte_table, sum(self.sizes))
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
