"""The fused 4-bit layers of the serving decoder (serving/nf4.py) and the training kernels
(finetune/nf4.py): the NF4 kernels' arithmetic (run by Triton's interpreter on CPU, the same code
the GPU compiles) and fused q/k/v, gate/up weights that share the layers' storage. The GPU speed
is measured by bench/nf4_kernel.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")


def nf4_layer(out_features: int, in_features: int, seed: int):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type="nf4", compress_statistics=False,
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False,
                                     quant_type="nf4", compress_statistics=False)
    return layer.to("cpu")


def test_fused_layers_share_storage_and_give_each_layer_its_output():
    from serving.nf4 import FusedNF4

    layers = [nf4_layer(96, 128, 1), nf4_layer(32, 128, 2), nf4_layer(32, 128, 3)]
    x = torch.randn(5, 128)
    before = [layer(x) for layer in layers]
    fused = FusedNF4(layers)
    outputs = fused(x)
    assert [o.shape[-1] for o in outputs] == [96, 32, 32]
    for got, want in zip(outputs, before):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # each layer is now a view into the joined buffer (no second copy), and still works alone
    for layer, want in zip(layers, before):
        assert layer.weight.data.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr()
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    assert fused.packed.numel() == sum(layer.weight.data.numel() for layer in layers)


def test_double_quantised_layers_are_refused_not_misread():
    from serving.nf4 import FusedNF4

    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to("cpu")
    if not layer.weight.quant_state.nested:
        pytest.skip("this bitsandbytes build does not double-quantise on CPU")
    with pytest.raises(ValueError, match="double-quantised"):
        FusedNF4([layer])


def product_operator_check(device: str, out_features: int, in_features: int):
    """nf4.linear_op against bitsandbytes: in a forward the bf16 product of the dequantized
    weight, bit for bit; run by autograd's engine (as an activation checkpoint recomputes it in
    backward) the fp8 product, near and not equal; without fp8_in_backward, bf16 there too."""
    import bitsandbytes.functional as F

    from finetune import nf4

    torch.manual_seed(0)
    weight = (torch.randn(out_features, in_features) * 0.02).to(torch.bfloat16).to(device)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    frozen = nf4.FrozenNF4.of(packed, state)  # the 8-bit absmax kept: decoded by the kernel on CUDA
    assert frozen.scales.code2 is not None
    weight = F.dequantize_4bit(packed, state)
    x = torch.randn(3, 5, in_features, dtype=torch.bfloat16, device=device)
    want = x @ weight.t()

    def product(fp8_in_backward):
        return frozen.product(x, fp8_in_backward)

    assert torch.equal(product(True), want) and torch.equal(product(False), want)
    in_backward = {}

    class Probe(torch.autograd.Function):  # its backward runs inside autograd's engine
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            in_backward["fp8"], in_backward["bf16"] = product(True), product(False)
            return grad

    Probe.apply(torch.zeros(1, requires_grad=True, device=device)).sum().backward()
    assert torch.equal(in_backward["bf16"], want)
    error = ((in_backward["fp8"].float() - want.float()).norm() / want.float().norm()).item()
    assert 1e-3 < error < 0.1, error
    return packed, state, weight


def test_product_operator_is_bf16_in_a_forward_and_fp8_when_autograd_recomputes_it():
    """The refresh's 4-bit product with fp8_recompute (product_operator_check), in the torch
    decode CPUs use, which must be bitsandbytes' weight exactly, transposed too."""
    from finetune import nf4

    packed, state, weight = product_operator_check("cpu", 96, 256)
    scales, tables = nf4.BlockScales.of(state), nf4.nibble_tables(state.code)
    bitsandbytes_absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(scales.decoded(), bitsandbytes_absmax)
    assert torch.equal(nf4.decode_nf4_reference(packed, scales, tables, (96, 256)), weight)
    assert torch.equal(nf4.decode_nf4_reference(packed, scales, tables, (96, 256), transposed=True), weight.t())


@pytest.mark.gpu
def test_product_operator_on_gpu_is_bitsandbytes_in_a_forward_and_fp8_when_recomputed():
    """The same on the GPU (the Triton decode and row scaling, cuBLAS, _scaled_mm), at Qwen3-14B's
    q shape; the row-scaling kernel gives fp8_rows' values (rows of 5,120 and of 17,408 x 2)."""
    from finetune import nf4

    product_operator_check("cuda", 5120, 5120)
    for k in (5120, 34816):
        x = torch.randn(64, k, dtype=torch.bfloat16, device="cuda") * torch.logspace(-3, 3, 64, device="cuda")[:, None]
        (want, want_scale), (got, got_scale) = nf4.fp8_rows(x), nf4.fp8_rows_now(x)
        assert torch.equal(got_scale, want_scale) and torch.equal(got.float(), want.float())


def interpreted(script: str) -> subprocess.CompletedProcess:
    """`script` (a format string taking {root}) run by a Python with Triton's interpreter on,
    which must be set before triton is imported: a process of its own. It must succeed."""
    root = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-c", script.format(root=root)], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


DECODE_CHECK = """
import sys, torch, bitsandbytes.functional as F
sys.path.insert(0, {root!r})
from finetune import nf4, training
for nested in (False, True):
    # 64 x 1,024: 1,024 blocks of 64, so a double-quantized absmax has four blocks of 256 to decode
    weight = torch.randn(64, 1024, dtype=torch.bfloat16) * torch.logspace(-2, 1, 64)[:, None]
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
    scales, tables = nf4.BlockScales.of(state), nf4.nibble_tables(state.code)
    assert (scales.code2 is not None) == nested  # the 8-bit absmax goes to the kernel as it is
    want = F.dequantize_4bit(packed, state).float()
    # the interpreter rounds to bf16 and fp8 toward zero (numpy), a GPU to nearest: one step apart
    got = nf4.decode_nf4(packed, scales, tables, (64, 1024)).float()
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
    assert torch.equal(nf4.decode_nf4(packed, scales, tables, (64, 1024), transposed=True).float(), got.t())
    frozen = nf4.FrozenNF4.of(packed, state)  # on CPU: torch operations
    weight8, per_channel = frozen.decoded(fp8=True, transposed=True), frozen.fp8_scale_channels
    got8 = nf4.decode_nf4(packed, scales, tables, (64, 1024), fp8_inverse_scale=1 / per_channel[:, :1].reshape(1),
                          transposed=True).float()
    # the interpreter's fp8 rounding is its own: at most one fp8 step off, or, losing the carry
    # into the exponent, half a power of two (64 for a value just under 128); the GPU test
    # checks every value for equality
    def near(got8, want8):
        one_step = (got8 - want8).abs() <= 2 ** (torch.log2(want8.abs().clamp(min=2 ** -6)).floor() - 3)
        carry_lost = (want8.abs() == 2 ** torch.log2(want8.abs()).round()) & (got8 == want8 / 2)
        return bool((one_step | carry_lost).all()) and (got8 != want8).float().mean() < 0.05
    assert near(got8, weight8.float())
# the row-scaling kernel of the fp8 recompute (fp8_rows_now on CUDA): fp8_rows' scales and values
x = torch.randn(6, 300, dtype=torch.bfloat16) * torch.logspace(-3, 3, 6)[:, None]
rows8, row_scale = torch.empty(6, 300, dtype=torch.float8_e4m3fn), torch.empty(6, 1)
nf4._build_fp8_rows_kernel()[(6,)](x, rows8, row_scale, 300, BLOCK=128)  # 128 at a time: a partial last block
want8, want_scale = nf4.fp8_rows(x)
assert torch.equal(row_scale, want_scale) and near(rows8.float(), want8.float())
# as compiled code calls it (a layer's backward): one operator, no graph break
compiled = torch.compile(lambda *args: nf4.decode_op()(*args, 64, 1024, True, True), fullgraph=True)
assert torch.equal(compiled(packed, *scales, *tables, 1 / per_channel[:, :1].reshape(1)).float(), got8)
try:
    nf4.decode_nf4(packed, scales, tables, (80, 1024))
except ValueError as exc:
    print("refused:", exc)
print("decode ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install -e .[dev])")
def test_nf4_decode_kernel_gives_bitsandbytes_weights_in_bf16_and_fp8_and_transposed():
    """finetune.nf4.decode_nf4 (the fp8 input gradients' weight decode on CUDA) under Triton's
    interpreter: the nibble order, a scale per 64 values, the transposed store and the fp8 scale
    must give bitsandbytes' weight (to the interpreter's rounding); shapes that are not whole
    tiles are refused. A process of its own: the interpreter must be on before triton loads."""
    result = interpreted(DECODE_CHECK)
    assert "refused: decode_nf4 takes whole 32x256 tiles, not 80x1024" in result.stdout
    assert "decode ok" in result.stdout


@pytest.mark.gpu
def test_nf4_decode_kernel_is_bitsandbytes_bit_for_bit_on_gpu():
    """On the GPU, decode_nf4 rounds to nearest: bitsandbytes' bf16 weight exactly, and the fp8
    weight of the torch decode exactly, at Qwen3-14B's gate/up shape."""
    from finetune import nf4, training

    weight = (torch.randn(17408, 5120) * 0.02).to(torch.bfloat16).cuda()
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=True)
    scales, tables = nf4.BlockScales.of(state), nf4.nibble_tables(state.code)  # the absmax decoded in the kernel
    assert torch.equal(nf4.decode_nf4(packed, scales, tables, (17408, 5120)), bnb.functional.dequantize_4bit(
        packed, state))
    frozen = nf4.FrozenNF4.of(packed, state)  # the kernel on CUDA
    weight8, per_channel = frozen.decoded(fp8=True, transposed=True), frozen.fp8_scale_channels
    scale = training.nf4_absmax(state).max().reshape(1) / nf4.FP8_MAX
    assert torch.equal(per_channel, scale.expand(1, 5120))
    want8 = nf4.decode_nf4_reference(packed, scales, tables, (17408, 5120), fp8_inverse_scale=1 / scale,
                                     transposed=True)
    assert torch.equal(weight8.float(), want8.float())


@pytest.mark.gpu
def test_tensor_core_kernel_matches_the_dequantised_product_on_gpu():
    """serving/nf4_mma.cu for 1..8 rows and every configuration it is compiled in: the lane
    order of k, the nibble order, a scale per 64 values, K split over warps unevenly (18 blocks
    of 64 over 4, 8 or 16 warps, in rounds of 2 or 4 with a short last one) and a last tile
    partly past N (80 rows; 8,208 rows: many blocks) must give W's product."""
    from serving import nf4

    for n, row_counts in ((80, range(1, 9)), (8208, (1, 8))):
        weight = (torch.randn(n, 1152) * 0.02).to(torch.bfloat16).cuda()
        packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", blocksize=64,
                                                     compress_statistics=False)
        dequantised = bnb.functional.dequantize_4bit(packed, state).float()
        absmax, table = state.absmax.float().contiguous(), nf4.nf4_byte_table(state.code)
        for rows in row_counts:
            x = torch.randn(rows, 1152, dtype=torch.bfloat16, device="cuda")
            want = x.float() @ dequantised.t()
            for config in nf4.MMA_CONFIGS:
                got = nf4.nf4_matmul_mma(x, packed.view(-1), absmax, table, n, config).float()
                # code values rounded to bf16 (2^-9 at most), the output to bf16
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item(),
                                           msg=f"n={n} rows={rows} config={config}")
    with pytest.raises(ValueError, match="up to 8 bf16 rows"):
        nf4.nf4_matmul_mma(torch.randn(9, 1152, dtype=torch.bfloat16, device="cuda"), packed.view(-1), absmax,
                           table, n)


@pytest.mark.gpu
def test_joined_layers_on_the_tensor_core_kernel_give_bitsandbytes_outputs_on_gpu():
    """FusedNF4 on the tensor-core kernel for decode-sized batches, bitsandbytes' path for a prefill."""
    from serving.nf4 import FusedNF4

    def layers(seed):
        torch.manual_seed(seed)
        made = []
        for out_features in (256, 64, 64):
            layer = bnb.nn.Linear4bit(256, out_features, bias=False, quant_type="nf4", compress_statistics=False,
                                      compute_dtype=torch.bfloat16)
            layer.weight = bnb.nn.Params4bit((torch.randn(out_features, 256) * 0.05).to(torch.bfloat16),
                                             requires_grad=False, quant_type="nf4", compress_statistics=False)
            made.append(layer.cuda())
        return made

    plain = layers(7)
    fused = FusedNF4(layers(7))
    for rows in (1, 5, 8, 40):
        x = torch.randn(rows, 256, dtype=torch.bfloat16, device="cuda")
        for got, layer in zip(fused(x), plain):
            want = layer(x).float()
            torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_the_tensor_core_kernel_says_why_it_cannot_run_where_it_cannot(monkeypatch):
    """Older GPUs (a T4 is 7.5) and CPUs get bitsandbytes' kernels, with the reason logged."""
    from serving import nf4

    assert nf4.mma_unavailable(torch.device("cpu")) == "not a CUDA device"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "7.5 has no bf16 tensor-core mma" in nf4.mma_unavailable(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert nf4.mma_unavailable(torch.device("cuda", 0)) is None
    monkeypatch.delattr(torch.cuda, "_compile_kernel")
    assert "no runtime CUDA compiler" in nf4.mma_unavailable(torch.device("cuda", 0))
