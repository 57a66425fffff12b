"""The NF4 kernels of training: a whole weight decoded at memory speed, and the 4-bit product
that compiled training layers call.

`decode_nf4` decodes a whole weight in one Triton kernel, to bf16 or fp8, transposed or not, at
about memory speed, its 8-bit (double-quantized) block scales decoded inside it. `linear_op` (the
torch operator hangjia::nf4_linear) is a 4-bit product that compiled training layers call: bf16
in the forward, and, asked to, fp8 when an activation checkpoint recomputes it in backward
(training._nf4_product). `FrozenNF4` holds what a frozen weight's products need, computed once.

bitsandbytes' layout: weight (out, in) row-major, two values per byte (the even index in the
high nibble), one absmax per 64 consecutive values, values from a 16-entry code (NF4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from serving.nf4 import GROUP

_kernels: dict[str, object] = {}  # Triton kernels, each built at first use


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
    decode in torch operations compiled (README, Performance). Bit for bit
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
    warps (README, Performance)."""
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
    quant_state: object  # bitsandbytes' own, for decodes in torch operations (training.dequantize_nf4)

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

    def product(self, x: torch.Tensor, fp8_in_backward: bool) -> torch.Tensor:
        """x @ W.t() by the operator hangjia::nf4_linear (linear_op)."""
        return linear_op()(x, self.packed, *self.scales, *self.tables, self.fp8_scale_rows, self.fp8_inverse_scale,
                           self.shape[0], fp8_in_backward)


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


def nibble_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value of a byte's high nibble, value of its low nibble) for all 256 bytes, fp32."""
    byte = torch.arange(256, device=code.device)
    return code.float()[byte >> 4].contiguous(), code.float()[byte & 15].contiguous()


def linear_op():
    """x @ W.t() for an NF4 weight W as the torch operator hangjia::nf4_linear, registered at
    first call (call it once outside compiled code first; FrozenNF4.product calls it).
    Arguments: x (..., in; bf16), the packed weight, its BlockScales' fields, nibble_tables(code),
    W's fp8 scales (fp8_weight_scale), out_features, fp8_in_backward. In a forward
    it decodes W to bf16 (one kernel at memory speed, decode_nf4) and multiplies. With
    fp8_in_backward, when autograd's engine runs it (an activation checkpoint recomputing the
    layer in backward) it multiplies in fp8 instead: x scaled per row, W decoded straight to fp8,
    scaled as a whole, on the tensor cores at about twice bf16's rate (H100/H200). Being one operator to the
    compiler, the forward and the recompute are one compiled graph, so the checkpoint finds the
    same saved tensors in both; the choice is made when it runs."""
    if "linear" not in _ops:
        decode_op()
        _ops["linear"] = _register_linear_op()
    return _ops["linear"]


def _register_linear_op():
    schema = ("(Tensor x, Tensor packed, Tensor absmax, Tensor? code2, Tensor? absmax2, Tensor? offset, int block2, "
              "Tensor high, Tensor low, Tensor fp8_scale, Tensor fp8_inverse_scale, int out_features, "
              "bool fp8_in_backward) -> Tensor")

    @torch.library.custom_op("hangjia::nf4_linear", mutates_args=(), schema=schema)
    def nf4_linear(x, packed, absmax, code2, absmax2, offset, block2, high, low, fp8_scale, fp8_inverse_scale,
                   out_features, fp8_in_backward):
        rows = x.reshape(-1, x.shape[-1])
        shape, scales = (out_features, x.shape[-1]), BlockScales(absmax, code2, absmax2, offset, block2)
        if fp8_in_backward and torch._C._current_graph_task_id() != -1:  # (-1: not in backward)
            rows8, row_scale = fp8_rows_now(rows)
            weight8 = decode_nf4_any(packed, scales, (high, low), shape, fp8_inverse_scale=fp8_inverse_scale)
            out = torch._scaled_mm(rows8, weight8.t(), scale_a=row_scale, scale_b=fp8_scale, out_dtype=x.dtype)
        else:
            out = rows @ decode_nf4_any(packed, scales, (high, low), shape).to(x.dtype).t()
        return out.view(*x.shape[:-1], out_features)

    @nf4_linear.register_fake
    def _(x, packed, absmax, code2, absmax2, offset, block2, high, low, fp8_scale, fp8_inverse_scale, out_features,
          fp8_in_backward):
        return x.new_empty(*x.shape[:-1], out_features)

    return nf4_linear
