"""Joined 4-bit weights for the serving decoder, and an NF4 kernel for small batches.

`FusedNF4` joins layers that read the same input (q/k/v; gate/up) into one weight, so a layer
runs 4 products per step instead of 7: 52 ms to first token and 10.8 ms per decode step for
Qwen3-14B on an H200, against 69 and 11.6 layer by layer (README, Performance). The joined
buffer is the layers' own storage: each layer's weight becomes a view into it, nothing is held
twice, and bitsandbytes' own path (training, `generate()`) keeps working on the same bytes.
`nf4_matmul_mma` (kernel="mma", the decoder's default) multiplies up to 8 rows on the tensor
cores with finetune/nf4_mma.cu, compiled at run time by NVRTC: 4.8 ms of 4-bit products per
decode step at 14B for one row and 5.2 ms for 8, against bitsandbytes' 6.4 and 18.1 (README,
Performance). More rows (a prefill), GPUs before compute capability 8.0 and fp16 models use
bitsandbytes' kernels (GEMV for one row, dequantize + matmul for more).

`nf4_matmul` (opt-in: kernel="triton") reads the packed weight once for up to 16 rows in wide
tiles and dequantizes each tile once (a byte through two 256-entry tables, its high and low value)
for all rows. At 14B on an H200 it reaches up to 740 GB/s against bitsandbytes' ~1 TB/s GEMV:
0.5-0.66x bitsandbytes per layer for one row and 0.51-0.62x for 8 (no tensor cores), so it stays
opt-in (README, Performance).

`decode_nf4` decodes a whole weight in one Triton kernel, to bf16 or fp8, transposed or not, at
about memory speed, its 8-bit (double-quantized) block scales decoded inside it. `linear_op` (the
torch operator hangjia::nf4_linear) is a 4-bit product that compiled training layers call: bf16
in the forward, and, asked to, fp8 when an activation checkpoint recomputes it in backward
(qlora._nf4_product). `FrozenNF4` holds what a frozen weight's products need, computed once.

bitsandbytes' layout: weight (out, in) row-major, two values per byte (the even index in the
high nibble), one absmax per 64 consecutive values, values from a 16-entry code (NF4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 16  # up to this many rows per product use the kernel; more use dequantize + matmul
GROUP = 64  # values per absmax (bitsandbytes' default blocksize, required here)

_kernels: dict[str, object] = {}  # Triton kernels, each built at first use


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


def _build_decode_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_decode(w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, high_ptr, low_ptr, inverse_scale_ptr,
                   out_ptr, N, K, BLOCK2, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr,
                   SCALED: tl.constexpr, NESTED: tl.constexpr):
        # a tile of BLOCK_N weight rows x BLOCK_K values: its bytes read with contiguous loads, each
        # byte turned into its two values through the nibble tables, scaled by the block's absmax
        # (decoded here when double-quantized; and by 1/scale for fp8), stored in the weight's order
        # or transposed (Triton moves the tile through shared memory, so the stores stay contiguous)
        HALF: tl.constexpr = BLOCK_K // 2
        GROUPS: tl.constexpr = BLOCK_K // 64
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        k0 = tl.program_id(1) * BLOCK_K
        packed = tl.load(w_ptr + rows[:, None] * (K // 2) + k0 // 2 + tl.arange(0, HALF)[None, :]).to(tl.int32)
        blocks = rows[:, None] * (K // 64) + k0 // 64 + tl.arange(0, GROUPS)[None, :]
        if NESTED:  # bitsandbytes' order: the 8-bit code times its block's scale, then the offset
            codes = tl.load(absmax_ptr + blocks).to(tl.int32)
            scales = tl.load(code2_ptr + codes) * tl.load(absmax2_ptr + blocks // BLOCK2) + tl.load(offset_ptr)
        else:
            scales = tl.load(absmax_ptr + blocks)
        if SCALED:
            scales = scales * tl.load(inverse_scale_ptr)
        high = tl.reshape(tl.load(high_ptr + packed), (BLOCK_N, GROUPS, 32)) * scales[:, :, None]
        low = tl.reshape(tl.load(low_ptr + packed), (BLOCK_N, GROUPS, 32)) * scales[:, :, None]
        values = tl.reshape(tl.interleave(high, low), (BLOCK_N, BLOCK_K)).to(out_ptr.dtype.element_ty)
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        if TRANSPOSED:
            tl.store(out_ptr + cols[:, None] * N + rows[None, :], tl.trans(values))
        else:
            tl.store(out_ptr + rows[:, None] * K + cols[None, :], values)

    return nf4_decode


class BlockScales(NamedTuple):
    """An NF4 weight's scale per block of 64 values as bitsandbytes keeps it: fp32 (`absmax`), or
    double-quantized: `absmax` 8-bit indices into `code2`, times `absmax2` (one per `block2`
    blocks), plus `offset` (1 byte per block instead of 4; decoded inside decode_nf4's kernel)."""
    absmax: torch.Tensor
    code2: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    block2: int = 256

    @classmethod
    def of(cls, quant_state) -> "BlockScales":
        if not quant_state.nested:
            return cls(quant_state.absmax.float())
        second = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=quant_state.absmax.device)
        return cls(quant_state.absmax, second.code.float(), second.absmax.float(), offset.reshape(1), second.blocksize)

    def decoded(self) -> torch.Tensor:
        """The scales as fp32 (torch operations, in bitsandbytes' order)."""
        if self.code2 is None:
            return self.absmax.float()
        block = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.block2
        return self.code2[self.absmax.int()] * self.absmax2[block] + self.offset


DECODE_TILE = (32, 256)  # weight rows x values per program


def decode_tiles(out_features: int, in_features: int) -> bool:
    """Whether decode_nf4 takes a weight of this shape (whole tiles only; Qwen3's all do)."""
    return out_features % DECODE_TILE[0] == 0 and in_features % DECODE_TILE[1] == 0


def decode_nf4(packed: torch.Tensor, scales: BlockScales, tables: tuple[torch.Tensor, torch.Tensor],
               shape: tuple[int, int], fp8_inverse_scale: torch.Tensor | None = None,
               transposed: bool = False) -> torch.Tensor:
    """An NF4 weight (out x in; tables from nibble_tables) as bf16, or,
    given `fp8_inverse_scale` (a 1-element tensor), as float8_e4m3fn of weight / scale; stored
    (out x in), or `transposed` (in x out), as the input gradient's fp8 product wants it.
    One kernel at about memory speed: for Qwen3-14B's gate/up weight 0.097 ms (bf16), 0.089 ms
    (fp8), 0.105 ms (fp8 transposed) on an H200, against 0.272, 0.657 and 1.105 ms for the same
    decode in torch operations compiled (README, Performance, session 13). Bit for bit
    bitsandbytes' dequantize_4bit (bf16)."""
    out_features, in_features = shape
    if not decode_tiles(out_features, in_features):
        raise ValueError(f"decode_nf4 takes whole {DECODE_TILE[0]}x{DECODE_TILE[1]} tiles, not {out_features}x{in_features}")
    if not torch.compiler.is_compiling():  # the operator is for compiled code; eager, it is one dispatch more
        decode_op()  # (registered here all the same, outside compiled code, for compiled code to call)
        return _decode_now(packed, scales, tables, shape, fp8_inverse_scale, transposed)
    fp8 = fp8_inverse_scale is not None
    high, low = tables
    return decode_op()(packed, *scales, high, low, fp8_inverse_scale if fp8 else high, out_features, in_features,
                       fp8, transposed)


_ops: dict[str, object] = {}  # torch operators, each registered at first use


def decode_op():
    """decode_nf4's kernel as a torch operator (hangjia::nf4_decode), registered at first call:
    torch.compile then calls it as it is, instead of tracing into Triton's launcher (which it
    cannot, inside a compiled layer's backward). Call it once outside compiled code first."""
    if "decode" not in _ops:
        _ops["decode"] = _register_decode_op()
    return _ops["decode"]


def _register_decode_op():
    schema = ("(Tensor packed, Tensor absmax, Tensor? code2, Tensor? absmax2, Tensor? offset, int block2, Tensor high, "
              "Tensor low, Tensor inverse_scale, int out_features, int in_features, bool fp8, bool transposed) -> Tensor")

    @torch.library.custom_op("hangjia::nf4_decode", mutates_args=(), schema=schema)
    def nf4_decode(packed, absmax, code2, absmax2, offset, block2, high, low, inverse_scale, out_features, in_features,
                   fp8, transposed):
        return _decode_now(packed, BlockScales(absmax, code2, absmax2, offset, block2), (high, low),
                           (out_features, in_features), inverse_scale if fp8 else None, transposed)

    @nf4_decode.register_fake
    def _(packed, absmax, code2, absmax2, offset, block2, high, low, inverse_scale, out_features, in_features, fp8,
          transposed):
        return _decoded_empty(packed.device, (out_features, in_features), fp8, transposed)

    return nf4_decode


def _decoded_empty(device, shape: tuple[int, int], fp8: bool, transposed: bool) -> torch.Tensor:
    """The decoded weight's tensor, before the kernel fills it: (out x in), or (in x out)."""
    out_features, in_features = shape
    return torch.empty((in_features, out_features) if transposed else shape,
                       dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=device)


def _decode_now(packed: torch.Tensor, scales: BlockScales, tables: tuple[torch.Tensor, torch.Tensor],
                shape: tuple[int, int], fp8_inverse_scale: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """decode_nf4's kernel launched from eager code (the decode operator's body, and decode_nf4
    outside compiled code)."""
    if "decode" not in _kernels:
        _kernels["decode"] = _build_decode_kernel()
    out_features, in_features = shape
    fp8, nested = fp8_inverse_scale is not None, scales.code2 is not None
    out = _decoded_empty(packed.device, shape, fp8, transposed)
    packed, absmax = packed.contiguous(), scales.absmax.contiguous()  # (as compiled code hands them: no copy)
    high, low = tables
    # no fused multiply-add: the scale is rounded after its product, as bitsandbytes rounds it
    _kernels["decode"][(out_features // DECODE_TILE[0], in_features // DECODE_TILE[1])](
        packed, absmax, scales.code2 if nested else absmax, scales.absmax2 if nested else absmax,
        scales.offset if nested else absmax, high, low, fp8_inverse_scale if fp8 else high, out, out_features,
        in_features, scales.block2, BLOCK_N=DECODE_TILE[0], BLOCK_K=DECODE_TILE[1], TRANSPOSED=transposed,
        SCALED=fp8, NESTED=nested, enable_fp_fusion=False)
    return out


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows x k) as float8_e4m3fn with one fp32 scale per row (x ~ x8 * scale): each row
    uses the whole fp8 range, so one large row does not flatten the others. In torch
    operations (compiled code fuses them); fp8_rows_now for eager calls on CUDA."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-30) / FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def _build_fp8_rows_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_rows_kernel(x_ptr, out_ptr, scale_ptr, K, BLOCK: tl.constexpr):
        # one program per row, BLOCK columns at a time: its largest magnitude, then the row over
        # it, in fp8 (fp8_rows' arithmetic, the division rounded as IEEE's). The second pass
        # reads the row again, from L2 (a row is 10-35 KB)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        largest = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * K + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            largest = tl.maximum(largest, tl.abs(x))
        scale = tl.maximum(tl.max(largest, axis=0), 1e-30) / 448.0
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * K + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * K + k0 + cols, tl.math.div_rn(x, scale).to(out_ptr.dtype.element_ty),
                     mask=k0 + cols < K)

    return fp8_rows_kernel


def _tuned_fp8_rows_kernel():
    """The row kernel with its block and warps timed at first use per row width (Triton's
    autotune: about a second, once per width; rows of 5,120 and of 17,408 at 14B). It took 30
    ms of a 14B step's GPU time on an H200, against 68 ms with a whole row per program in 4
    warps (README, Performance, session 15)."""
    import triton

    configs = [triton.Config({"BLOCK": block}, num_warps=warps)
               for block in (1024, 2048, 4096) for warps in (4, 8, 16) if block // (32 * warps) >= 4]
    return triton.autotune(configs=configs, key=["K"])(_build_fp8_rows_kernel())


def fp8_rows_now(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_rows in one Triton kernel on CUDA in eager code (the product operator, the down
    projection after the checkpoint), where nothing fuses the torch operations' five passes over
    x; in compiled code, and on CPUs, fp8_rows (which the compiler fuses)."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return fp8_rows(x)
    if "fp8_rows" not in _kernels:
        _kernels["fp8_rows"] = _tuned_fp8_rows_kernel()
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    _kernels["fp8_rows"][(x.shape[0],)](x, out, scale, x.shape[1])
    return out, scale


def fp8_weight_scale(absmax: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp8 scale for a whole NF4 weight, its largest absmax (fp32) over fp8's largest value
    (code values are at most 1 in size), repeated per output row (1 x out) as torch._scaled_mm's
    row-wise scaling wants it, and its reciprocal (1 element) for the decode. A scale per channel
    would cost a reduction over the decoded weight, and e4m3's 2^17 of range holds a weight's
    spread of block scales."""
    scale = absmax.max().reshape(1) / FP8_MAX
    return scale.expand(1, out_features).contiguous(), 1 / scale


@dataclass
class FrozenNF4:
    """A frozen NF4 weight (out x in) with what its products need, computed once, not per
    product: its block scales as bitsandbytes keeps them (decoded inside the kernel), the
    nibble tables, and its fp8 scale, repeated per output row (the recompute's product) and per
    input channel (the input gradient's), with its reciprocal. A weight never changes while
    LoRA trains, and per product these were five small kernels more, about 800 of them per
    forward at 14B."""
    packed: torch.Tensor
    scales: BlockScales
    tables: tuple[torch.Tensor, torch.Tensor]
    shape: tuple[int, int]
    fp8_scale_rows: torch.Tensor
    fp8_scale_channels: torch.Tensor
    fp8_inverse_scale: torch.Tensor
    quant_state: object  # bitsandbytes' own, for decodes in torch operations (qlora.dequantize_nf4)

    @property
    def dtype(self) -> torch.dtype:
        """The products' dtype (bitsandbytes' compute dtype: bf16)."""
        return self.quant_state.dtype

    @classmethod
    def of(cls, packed: torch.Tensor, quant_state) -> "FrozenNF4":
        out_features, in_features = (int(side) for side in quant_state.shape)
        scales = BlockScales.of(quant_state)
        rows, inverse = fp8_weight_scale(scales.decoded(), out_features)
        return cls(packed, scales, nibble_tables(quant_state.code), (out_features, in_features), rows,
                   rows[:, :1].expand(1, in_features).contiguous(), inverse, quant_state)

    def decoded(self, fp8: bool = False, transposed: bool = False) -> torch.Tensor:
        """The weight as bf16, or as fp8 over its scale; (out x in), or `transposed`."""
        return decode_nf4_any(self.packed, self.scales, self.tables, self.shape,
                              fp8_inverse_scale=self.fp8_inverse_scale if fp8 else None, transposed=transposed)

    def product(self, x: torch.Tensor, fp8_in_backward: bool, fp8_in_forward: bool = False) -> torch.Tensor:
        """x @ W.t() by the operator hangjia::nf4_linear (linear_op)."""
        return linear_op()(x, self.packed, *self.scales, *self.tables, self.fp8_scale_rows, self.fp8_inverse_scale,
                           self.shape[0], fp8_in_backward, fp8_in_forward)


def decode_nf4_reference(packed: torch.Tensor, scales: BlockScales, tables: tuple[torch.Tensor, torch.Tensor],
                         shape: tuple[int, int], fp8_inverse_scale: torch.Tensor | None = None,
                         transposed: bool = False) -> torch.Tensor:
    """decode_nf4 in torch operations, value for value (the scales multiplied in the kernel's
    order): for CPUs and for shapes the kernel does not take."""
    byte = packed.reshape(-1).int()
    high, low = tables
    absmax = scales.decoded().view(-1, 1)
    absmax = absmax if fp8_inverse_scale is None else absmax * fp8_inverse_scale
    values = (torch.stack((high[byte], low[byte]), dim=-1).view(-1, GROUP) * absmax).view(shape)
    values = values.to(torch.bfloat16 if fp8_inverse_scale is None else torch.float8_e4m3fn)
    return values.t().contiguous() if transposed else values


def decode_nf4_any(packed: torch.Tensor, scales: BlockScales, tables: tuple[torch.Tensor, torch.Tensor],
                   shape: tuple[int, int], fp8_inverse_scale: torch.Tensor | None = None,
                   transposed: bool = False) -> torch.Tensor:
    """decode_nf4 where the kernel takes it (CUDA, whole tiles), else decode_nf4_reference."""
    decode = decode_nf4 if packed.is_cuda and decode_tiles(*shape) else decode_nf4_reference
    return decode(packed, scales, tables, shape, fp8_inverse_scale=fp8_inverse_scale, transposed=transposed)


def linear_op():
    """x @ W.t() for an NF4 weight W as the torch operator hangjia::nf4_linear, registered at
    first call (call it once outside compiled code first; FrozenNF4.product calls it).
    Arguments: x (..., in; bf16), the packed weight, its BlockScales' fields, nibble_tables(code),
    W's fp8 scales (fp8_weight_scale), out_features, fp8_in_backward, fp8_in_forward. In a forward
    it decodes W to bf16 (one kernel at memory speed, decode_nf4) and multiplies. With
    fp8_in_backward, when autograd's engine runs it (an activation checkpoint recomputing the
    layer in backward) it multiplies in fp8 instead: x scaled per row, W decoded straight to fp8,
    scaled as a whole, on the tensor cores at about twice bf16's rate (H100/H200); with
    fp8_in_forward, always (the loss then moves by fp8's rounding). Being one operator to the
    compiler, the forward and the recompute are one compiled graph, so the checkpoint finds the
    same saved tensors in both; the choice is made when it runs."""
    if "linear" not in _ops:
        decode_op()
        _ops["linear"] = _register_linear_op()
    return _ops["linear"]


def _register_linear_op():
    schema = ("(Tensor x, Tensor packed, Tensor absmax, Tensor? code2, Tensor? absmax2, Tensor? offset, int block2, "
              "Tensor high, Tensor low, Tensor fp8_scale, Tensor fp8_inverse_scale, int out_features, "
              "bool fp8_in_backward, bool fp8_in_forward) -> Tensor")

    @torch.library.custom_op("hangjia::nf4_linear", mutates_args=(), schema=schema)
    def nf4_linear(x, packed, absmax, code2, absmax2, offset, block2, high, low, fp8_scale, fp8_inverse_scale,
                   out_features, fp8_in_backward, fp8_in_forward):
        rows = x.reshape(-1, x.shape[-1])
        shape, scales = (out_features, x.shape[-1]), BlockScales(absmax, code2, absmax2, offset, block2)
        if fp8_in_forward or (fp8_in_backward and torch._C._current_graph_task_id() != -1):  # (-1: not in backward)
            rows8, row_scale = fp8_rows_now(rows)
            weight8 = decode_nf4_any(packed, scales, (high, low), shape, fp8_inverse_scale=fp8_inverse_scale)
            out = torch._scaled_mm(rows8, weight8.t(), scale_a=row_scale, scale_b=fp8_scale, out_dtype=x.dtype)
        else:
            out = rows @ decode_nf4_any(packed, scales, (high, low), shape).to(x.dtype).t()
        return out.view(*x.shape[:-1], out_features)

    @nf4_linear.register_fake
    def _(x, packed, absmax, code2, absmax2, offset, block2, high, low, fp8_scale, fp8_inverse_scale, out_features,
          fp8_in_backward, fp8_in_forward):
        return x.new_empty(*x.shape[:-1], out_features)

    return nf4_linear


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
    if "tuned" not in _kernels:
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

    padded = _rows_bucket(rows)
    if config:
        _kernels["fixed"][grid(config)](x2, packed, absmax, high, low, out, out_features, k, M=rows, M_PAD=padded,
                                        **config)
    else:
        _kernels["tuned"][grid](x2, packed, absmax, high, low, out, out_features, k, M=rows, M_PAD=padded)
    return out.reshape(*shape[:-1], out_features)


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
    """finetune/nf4_mma.cu compiled by NVRTC for this GPU (torch's own runtime compiler: no
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
    """Rows rounded up to a power of two: the Triton kernel's padding, the mma kernel's tuning key."""
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

    def __init__(self, layers: Sequence[torch.nn.Module], kernel: str = "bitsandbytes"):
        if kernel not in ("bitsandbytes", "triton", "mma"):
            raise ValueError(f"unknown NF4 kernel {kernel!r}: bitsandbytes, triton or mma")
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
        if kernel == "mma" and self.packed.is_cuda:
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
        elif x.is_cuda and self.kernel == "triton" and rows <= MAX_ROWS:
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
