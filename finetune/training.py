"""The training step of the refresh recipe, fast and lean on a GPU: how the model is prepared,
how samples are batched, how the loss is computed, how the 4-bit layers are compiled. Each a
plain function, so the recipe and the GPU benchmark (bench/gpu_train.py) run the same code:

- no fp32 upcast: peft's prepare_model_for_kbit_training turns embeddings, lm_head and
  norms into fp32 (+2.9 GiB at 14B) for no gain under bf16 autocast-free training;
- non-reentrant activation checkpointing on every decoder layer;
- several samples per forward: one per row, padded, with plain causal attention (rows_loss:
  SDPA's flash kernel, as on CUDA), or packed into one row with positions restarting at 0,
  so transformers builds a block-diagonal causal mask (no attention across samples);
- the loss from hidden states in chunks, so the 151,936-wide logits of a long micro-batch
  never exist at once (fp32: 2.4 GiB per 4k tokens), each chunk's gradient computed in
  forward (fused_lm_loss) or its logits recomputed in backward (chunked_lm_loss);
- optionally the frozen input embedding kept in host memory (1.45 GiB at 14B): a lookup of
  a few thousand rows is cheap, and only those rows travel to the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from serving.decoding import causal_lm_of, decoder_and_head


def prepare_for_lora_training(model, checkpointing: bool = True) -> None:
    """Freeze the base as loaded (bf16 and 4-bit stay as they are) and checkpoint layers."""
    for param in model.parameters():
        param.requires_grad_(False)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class PackedBatch:
    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]  # already shifted: labels[t] is the token position t must predict, or -100
    weights: list[float]  # per position: 1 / (learned tokens of its sample); 0 where not learned
    samples: int


def pack(examples: Sequence[dict[str, list[int]]]) -> PackedBatch:
    """Samples side by side in one row. Each sample's positions restart at 0, which is how
    transformers recognises packed sequences and masks attention between them. Labels are
    shifted here, per sample, so no sample learns to predict the next one's first token."""
    ids, positions, labels, weights = [], [], [], []
    for example in examples:
        tokens, targets = example["input_ids"], example["labels"]
        shifted = list(targets[1:]) + [-100]
        learned = sum(t != -100 for t in shifted)
        ids += tokens
        positions += range(len(tokens))
        labels += shifted
        weights += [1.0 / learned if t != -100 else 0.0 for t in shifted] if learned else [0.0] * len(tokens)
    return PackedBatch(ids, positions, labels, weights, len(examples))


def group_by_tokens(examples: Sequence[dict[str, list[int]]], max_tokens: int) -> list[list[dict[str, list[int]]]]:
    """Consecutive examples grouped so that each group stays within max_tokens (a longer
    example goes alone)."""
    groups: list[list[dict[str, list[int]]]] = []
    used = 0
    for example in examples:
        length = len(example["input_ids"])
        if groups and used + length <= max_tokens:
            groups[-1].append(example)
            used += length
        else:
            groups.append([example])
            used = length
    return groups


def group_as_rows(examples: Sequence[dict[str, list[int]]], max_tokens: int) -> list[list[dict[str, list[int]]]]:
    """Examples grouped for `rows_loss`: longest first, a group's rows padded to its longest,
    at most max_tokens with the padding; a row at least half the longest (padding is compute
    spent on nothing). A longer example goes alone."""
    groups: list[list[dict[str, list[int]]]] = []
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
        length = len(example["input_ids"])
        if groups:
            longest = len(groups[-1][0]["input_ids"])
            if (len(groups[-1]) + 1) * longest <= max_tokens and 2 * length >= longest:
                groups[-1].append(example)
                continue
        groups.append([example])
    return groups


def rows_loss(model, examples: Sequence[dict[str, list[int]]], device, chunk_tokens: int = 512,
              fused: bool = True):
    """The weighted loss of `examples` (each sample's mean over its learned tokens, summed),
    one sample per row, padded on the right, with plain causal attention and no mask: a real
    token never sees the padding after it, and padding learns nothing. Unlike samples packed in
    one row, whose block-diagonal mask keeps SDPA off its flash kernel (5x slower attention at
    two 2,048-token samples on an H200), this runs the flash kernel; the price is the padding.
    `fused`: the loss and its gradient in one pass (fused_lm_loss), else chunked_lm_loss."""
    decoder, head = decoder_and_head(model)
    width = max(len(e["input_ids"]) for e in examples)
    rows = [pack([e]) for e in examples]  # per row: labels shifted, weights 1 / learned tokens
    ids = token_ids(model, [r.input_ids + [0] * (width - len(r.input_ids)) for r in rows], device)
    # no position ids: transformers then counts 0, 1, ... itself. Given ids, it looks for packed
    # samples in them, and that check reads a GPU tensor, so the host would wait for the queue
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    labels = [label for r in rows for label in r.labels + [-100] * (width - len(r.labels))]
    weights = [weight for r in rows for weight in r.weights + [0.0] * (width - len(r.weights))]
    loss = fused_lm_loss if fused else chunked_lm_loss
    return loss(hidden.reshape(-1, hidden.shape[-1]), head, labels, weights, chunk_tokens)


def queued_tensor(values, device, dtype=None):
    """`values` as a tensor on `device` without making the host wait: copied from pageable
    memory, a tensor reaches a GPU only after every queued kernel has run (torch synchronizes
    the stream), and the GPU then idles while the host queues the next work; from pinned
    memory the copy is queued like a kernel."""
    import torch

    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def chunked_lm_loss(hidden, lm_head, labels: list[int], weights: list[float], chunk_tokens: int = 512):
    """sum_t weights[t] * cross_entropy(lm_head(hidden[t]), labels[t]), computed chunk by
    chunk with each chunk's logits recomputed in backward instead of stored. At Qwen3's
    151,936-token vocabulary a 512-token chunk's fp32 logits are 0.3 GB, and the loss is where
    a 14B step peaks: with 1,024 the compiled recipe reserved 12.03 GiB. Labels and weights
    come as lists: which chunks learn nothing is known on the host, without asking the GPU."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h, y, w):
        logits = lm_head(h).float()
        return (F.cross_entropy(logits, y, ignore_index=-100, reduction="none") * w).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    targets = queued_tensor(labels, hidden.device)
    weighting = queued_tensor(weights, hidden.device, torch.float32)
    for start, learned in zip(range(0, hidden.shape[0], chunk_tokens), learned_chunks(weights, chunk_tokens)):
        end = start + chunk_tokens
        if not learned:
            continue  # no learned token here: skip the vocabulary projection entirely
        total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], weighting[start:end],
                                   use_reentrant=False)
    return total


def fused_lm_loss(hidden, lm_head, labels: list[int], weights: list[float], chunk_tokens: int = 512):
    """What chunked_lm_loss computes, for a frozen lm_head, with its gradient taken in the same
    pass: each chunk's logits exist once, in forward, where the gradient for its hidden states
    is computed and kept (tokens x hidden, 42 MB at 4,096 tokens of Qwen3-14B); backward only
    scales it. The chunked loss runs the vocabulary projection again in backward: a third of
    the head's products. This is what liger-kernel's fused linear cross-entropy does; it has no
    per-token weights, which the recipe's per-sample means need."""
    import torch

    if lm_head.weight.requires_grad or getattr(lm_head, "bias", None) is not None:
        return chunked_lm_loss(hidden, lm_head, labels, weights, chunk_tokens)
    return _loss_with_gradient().apply(hidden, lm_head.weight, queued_tensor(labels, hidden.device),
                                       queued_tensor(weights, hidden.device, torch.float32), chunk_tokens,
                                       learned_chunks(weights, chunk_tokens))


def learned_chunks(weights: list[float], chunk_tokens: int) -> list[bool]:
    """Per chunk of `chunk_tokens` positions, whether any token in it is learned (weight > 0),
    read from the host's list: a chunk that learns nothing needs no vocabulary projection."""
    return [any(weight > 0 for weight in weights[start:start + chunk_tokens])
            for start in range(0, len(weights), chunk_tokens)]


@functools.cache  # the class is made at first use: torch is imported then, not with this module
def _loss_with_gradient():
    import torch

    class LossWithGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, weights, chunk_tokens, learned):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            gradient = torch.zeros_like(hidden)
            for number, start in enumerate(range(0, hidden.shape[0], chunk_tokens)):
                if not learned[number]:
                    continue  # no learned token here: no vocabulary projection at all
                h, y, w = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens], \
                    weights[start:start + chunk_tokens]
                logits = (h @ weight.t().to(h.dtype)).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = y.clamp(min=0)  # -100 rows have weight 0: any column will do
                rows = torch.arange(len(y), device=y.device)
                total += ((lse - logits[rows, picked]) * w).sum()
                # d/dlogits of w * cross-entropy: w * (softmax - one-hot), in place on the logits
                probabilities = logits.sub_(lse[:, None]).exp_()
                probabilities[rows, picked] -= 1
                probabilities.mul_(w[:, None])
                gradient[start:start + chunk_tokens] = probabilities.to(h.dtype) @ weight.to(h.dtype)
            ctx.save_for_backward(gradient)
            return total

        @staticmethod
        def backward(ctx, grad_output):
            (gradient,) = ctx.saved_tensors
            return gradient * grad_output.to(gradient.dtype), None, None, None, None, None

    return LossWithGradient


def dequantize_nf4(packed, quant_state):
    """bitsandbytes' NF4 weight as a bf16 (or its own dtype) matrix, in plain torch operations
    so torch.compile fuses it into one kernel; equal bit for bit to bitsandbytes'
    dequantize_4bit (tests). Double-quantized absmax (8-bit, one fp32 scale per 256, plus an
    offset) is decoded on the way."""
    values = nf4_codes(packed, quant_state)
    return (values * nf4_absmax(quant_state).view(-1, 1)).to(quant_state.dtype).view(quant_state.shape)


def nf4_codes(packed, quant_state):
    """The NF4 weight's code values (in [-1, 1]), one row per block of `blocksize` values."""
    import torch

    byte = packed.reshape(-1).int()
    code = quant_state.code  # the even element of a pair sits in the high nibble
    return torch.stack((code[byte >> 4], code[byte & 15]), dim=-1).view(-1, quant_state.blocksize)


def nf4_absmax(quant_state):
    """The NF4 weight's scale per block of `blocksize` values, fp32; double-quantized absmax
    (8-bit, one fp32 scale per 256, plus an offset) decoded."""
    from finetune import nf4

    return nf4.BlockScales.of(quant_state).decoded()


@functools.cache  # the class is made at first use: torch is imported then, not with this module
def _nf4_product(operator: bool, fp8_recompute: bool, fp8_input_gradients: bool):
    import torch

    from finetune import nf4

    nf4.linear_op()  # the operators registered here, outside compiled code, for compiled code to call

    class Nf4Product(torch.autograd.Function):
        """x @ W.t() for a frozen NF4 weight (nf4.FrozenNF4), the forward in bf16. With
        `operator`, the product is one operator (nf4.linear_op: decoded by a kernel at memory
        speed, not by the compiler's fusion), which with fp8_recompute runs in fp8 when an
        activation checkpoint recomputes it in backward. With fp8_input_gradients, x's gradient
        comes from an fp8 product (the gradient scaled per row, the weight as a whole).
        fp8 runs on the tensor cores at about twice bf16's rate on an H100/H200, each value about
        4% off. Only the packed weight is saved for backward, which decodes it again."""

        @staticmethod
        def forward(ctx, x, packed, frozen):
            ctx.save_for_backward(packed)
            ctx.frozen = frozen
            x = x.to(frozen.dtype)
            if operator:
                return frozen.product(x, fp8_recompute)
            return x @ dequantize_nf4(packed, frozen.quant_state).t()

        @staticmethod
        def backward(ctx, grad_output):
            (packed,) = ctx.saved_tensors
            frozen = ctx.frozen
            if not fp8_input_gradients:
                weight = frozen.decoded() if operator else dequantize_nf4(packed, frozen.quant_state)
                return grad_output.to(frozen.dtype) @ weight.to(frozen.dtype), None, None
            grad8, grad_scale = nf4.fp8_rows_now(grad_output.reshape(-1, grad_output.shape[-1]))
            weight8 = frozen.decoded(fp8=True, transposed=True)
            grad = torch._scaled_mm(grad8, weight8.t(), scale_a=grad_scale, scale_b=frozen.fp8_scale_channels,
                                    out_dtype=grad_output.dtype)
            return grad.view(*grad_output.shape[:-1], -1), None, None

    return Nf4Product


def _compilable_4bit_forward(linear, operator: bool = False, fp8_input_gradients: bool = False,
                             fp8_recompute: bool = False):
    """A forward for a bitsandbytes Linear4bit that torch.compile can see into: the NF4
    dequantization fused into one generated kernel and a plain matmul, instead of
    bitsandbytes' ops, each a Python call into its library (a compiled 14B step's wall time
    exceeded its GPU time by 0.8 s with them, by 0.3 s without). `operator`: the product as one
    operator that decodes with a kernel of its own; `fp8_input_gradients`, `fp8_recompute`: those
    parts of backward in fp8 (_nf4_product). The forward, and so the loss, stay as without."""
    import torch.nn.functional as F

    from finetune import nf4

    if linear.in_features % 16 or linear.out_features % 16:  # fp8 products take multiples of 16 only
        fp8_input_gradients = fp8_recompute = False
    own = (operator or fp8_input_gradients) and linear.bias is None
    product = _nf4_product(operator, fp8_recompute, fp8_input_gradients) if own else None
    frozen = nf4.FrozenNF4.of(linear.weight.data, linear.weight.quant_state) if own else None

    def forward(x):
        weight = linear.weight
        if product is not None:
            return product.apply(x, weight.data, frozen).to(x.dtype)
        out = F.linear(x.to(weight.quant_state.dtype), dequantize_nf4(weight.data, weight.quant_state), linear.bias)
        return out.to(x.dtype)

    return forward


def _hand_out_down_projection(layer) -> dict | None:
    """Make the layer's MLP hand its down projection's input out instead of projecting it:
    down_proj returns zeros (so the layer returns its residual stream without the MLP) and
    puts its input in the returned dict ("x") for the caller to project. Only for a frozen
    down_proj (no LoRA on it): its backward then needs no saved activation, so it can run
    outside the activation checkpoint and is not computed a second time in backward."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if down is None or not hasattr(down, "out_features") or any(p.requires_grad for p in down.parameters()):
        return None
    handed: dict = {}

    def hand_out(x):
        handed["x"] = x
        return x.new_zeros(*x.shape[:-1], down.out_features)

    down.forward = hand_out
    return handed


def _decode_absmax_once(quant_state) -> None:
    """Replace a double-quantized absmax by its fp32 values (4 bytes per block of 64 instead of
    about 1). Compiled on CPU, nf4_absmax's `arange(n) // 256` indexing loses its last partial
    block (inductor's C++ code of torch 2.13 loops over 256 of 300 values and leaves the rest
    unwritten), so a CPU model with such a weight (SmolLM2-135M: 5,184 blocks) trained on
    garbage scales; CUDA's code is right, and keeps the 8-bit absmax."""
    if quant_state.nested:
        quant_state.absmax = nf4_absmax(quant_state)
        quant_state.nested, quant_state.state2, quant_state.offset = False, None, None


def compile_decoder_layers(model, nf4: str = "bitsandbytes", backend="inductor", down_outside: bool = False,
                           fp8_input_gradients: bool = False, fp8_recompute: bool = False) -> int:
    """Compile every decoder layer and keep its activation checkpoint; returns the layers
    compiled. Eager, a 2,048-token step at 14B spends 1.3 of its 3.7 s of GPU time in small
    elementwise kernels (norms in fp32, the rotation, SiLU x up, LoRA's dropout and scaling);
    compiled, 0.27 s. The checkpoint is an eager one around the compiled layer, which drops what
    the compiled forward saves and runs it again in backward. nf4="torch": 4-bit layers dequantize in torch operations the compiler fuses
    (dequantize_nf4) instead of calling bitsandbytes; nf4="kernel": each 4-bit product is one
    operator that decodes in a Triton kernel (nf4.linear_op). With `fp8_input_gradients` too,
    those layers' input gradients come from fp8 products; with nf4="kernel" and `fp8_recompute`
    the checkpoint's recompute runs them in fp8 (_nf4_product). A layer compiled under transformers' own checkpointing escapes it: nothing is
    recomputed and the memory grows (README, Performance). down_outside: a frozen down_proj runs after the checkpointed part, eagerly, which
    saves only the 4-bit weight; backward then recomputes the layer without it, a quarter of its
    products. With nf4="kernel" it is the same product as the layer's others (so its input
    gradient is fp8 too with fp8_input_gradients), else bitsandbytes' op (dequantize + matmul, bf16). A layer the compiler fails on
    (an old GPU, no working Triton) runs eagerly, with torch's warning: a nightly refresh must
    not fail for want of a faster path."""
    import torch
    import torch._dynamo
    import torch.utils.checkpoint

    if nf4 not in ("bitsandbytes", "torch", "kernel"):
        raise ValueError(f"nf4 'bitsandbytes', 'torch' or 'kernel'; not {nf4!r}")
    if fp8_input_gradients and nf4 == "bitsandbytes":
        raise ValueError("fp8_input_gradients needs nf4='torch' or 'kernel'")
    if fp8_recompute and nf4 != "kernel":
        raise ValueError("fp8_recompute needs nf4='kernel'")
    causal_lm = causal_lm_of(model)
    causal_lm.gradient_checkpointing_disable()  # ours replaces transformers' checkpoint
    torch._dynamo.config.suppress_errors = True  # compile errors: the eager layer instead
    layers = list(causal_lm.model.layers)
    for layer in layers:
        if getattr(layer, "_compiled_with_checkpoint", False):  # compiling twice would nest checkpoints
            continue
        layer._compiled_with_checkpoint = True
        if nf4 != "bitsandbytes":
            import bitsandbytes as bnb

            for module in layer.modules():  # (peft's LoRA wrapper shows its base layer's weight: not it)
                if isinstance(module, bnb.nn.Linear4bit):
                    if module.weight.device.type == "cpu":
                        _decode_absmax_once(module.weight.quant_state)
                    module.forward = _compilable_4bit_forward(module, nf4 == "kernel", fp8_input_gradients,
                                                              fp8_recompute)
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        own_down_forward = down.__dict__.get("forward") if down is not None and nf4 == "kernel" else None
        handed = _hand_out_down_projection(layer) if down_outside else None
        if handed is not None:
            if own_down_forward is None:
                own_down_forward = functools.partial(type(down).forward, down)  # the class's own: bitsandbytes'

            def front(*args, _forward=layer.forward, _handed=handed, **kwargs):  # the layer up to down_proj's input
                residual = _forward(*args, **kwargs)
                return residual, _handed.pop("x")

            compiled_front = torch.compile(front, backend=backend)

            def checkpointed_then_down(*args, _front=compiled_front, _down=own_down_forward, **kwargs):
                residual, product = torch.utils.checkpoint.checkpoint(_front, *args, use_reentrant=False, **kwargs)
                return residual + _down(product)

            layer.forward = checkpointed_then_down
            continue
        def checkpointed(*args, _forward=torch.compile(layer.forward, backend=backend), **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
    return len(layers)


def has_fp8_tensor_cores(device) -> bool:
    """Whether this CUDA device multiplies fp8 on its tensor cores (compute capability 8.9 and
    up: Ada, Hopper, Blackwell), as the fp8 products of compile_decoder_layers need."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def uncompile_decoder_layers(model) -> None:
    """Undo compile_decoder_layers (before decoding with the trained model: its layers then run
    with a KV cache, in shapes the compiled training graphs were not made for)."""
    causal_lm = causal_lm_of(model)
    for layer in causal_lm.model.layers:
        if layer.__dict__.pop("_compiled_with_checkpoint", False):
            for module in layer.modules():
                module.__dict__.pop("forward", None)  # the class's own forward shows again


def layers_checkpointed(model) -> bool:
    """Whether the decoder layers recompute their activations in backward (transformers'
    checkpointing, or compile_decoder_layers)."""
    return any(getattr(m, "gradient_checkpointing", False) or getattr(m, "_compiled_with_checkpoint", False)
               for m in model.modules())


def packed_loss(model, batch: PackedBatch, device, chunk_tokens: int = 512, loss=None, fused: bool = True):
    """The micro-batch's weighted loss (each sample's mean over its learned tokens, summed):
    fused_lm_loss, or with `fused=False` chunked_lm_loss. `loss(hidden, head, labels, weights)`
    replaces both (the GPU benchmark compares others)."""
    import torch

    decoder, head = decoder_and_head(model)
    ids = token_ids(model, [batch.input_ids], device)
    positions = queued_tensor([batch.position_ids], device)
    # use_cache=False matters: with a cache transformers does not look for packed samples
    hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
    if loss is not None:
        return loss(hidden, head, queued_tensor(batch.labels, device), queued_tensor(batch.weights, device, torch.float32))
    return (fused_lm_loss if fused else chunked_lm_loss)(hidden, head, batch.labels, batch.weights, chunk_tokens)


def token_ids(model, rows: list[list[int]], device):
    """Token ids as the model's input embedding wants them: on the host where the embedding is
    kept there (keep_embedding_on_host). Ids on the GPU would be copied back for the lookup,
    and that copy waits for every queued kernel: the GPU then idles while the host queues the
    next forward (0.37 s of a 3.0 s step at 14B, before this)."""
    import torch

    decoder, _ = decoder_and_head(model)
    return torch.tensor(rows) if hasattr(decoder.embed_tokens, "host") else queued_tensor(rows, device)


class HostEmbedding:
    """A frozen input embedding whose table stays in (pinned) host memory; looked-up rows
    are copied to the GPU. Installed with `keep_embedding_on_host`."""

    def __init__(self, embedding, device):
        import torch

        self.weight = embedding.weight.detach().to("cpu").pin_memory() if torch.cuda.is_available() else \
            embedding.weight.detach().to("cpu")
        self.device = device

    def __call__(self, input_ids):
        import torch

        ids = input_ids.to("cpu")  # (from the GPU this waits for its queue: pass host ids, token_ids)
        # looked up into pinned memory, so the copy to the GPU is queued, not waited for
        rows = torch.empty((*ids.shape, self.weight.shape[1]), dtype=self.weight.dtype,
                           pin_memory=self.weight.is_pinned())
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows.view(-1, self.weight.shape[1]))
        return rows.to(self.device, non_blocking=True)


def keep_embedding_on_host(model, device) -> int:
    """Move the frozen input embedding to host memory; returns the bytes freed on the GPU."""
    import torch

    decoder, _ = decoder_and_head(model)
    embedding = decoder.embed_tokens
    if not hasattr(embedding, "weight"):  # already on the host
        return 0
    freed = embedding.weight.numel() * embedding.weight.element_size()
    host = HostEmbedding(embedding, device)

    class _Lookup(torch.nn.Module):
        def forward(self, input_ids):
            return host(input_ids)

    lookup = _Lookup()
    lookup.host = host
    decoder.embed_tokens = lookup
    del embedding
    return freed


def restore_embedding(model, device) -> None:
    """Put a host-kept embedding back on the device (for decoding after training)."""
    import torch

    decoder, _ = decoder_and_head(model)
    host = getattr(decoder.embed_tokens, "host", None)
    if host is not None:
        decoder.embed_tokens = torch.nn.Embedding.from_pretrained(host.weight.to(device), freeze=True)


def key_cost(config) -> int:
    """A suffix token's work outside attention (its linear layers, forward and backward, its
    share of the vocabulary projection, the elementwise work around them), as the attention
    of one query over how many keys. From the model's shape: the products' FLOPs (forward and
    the input gradient of frozen weights: 4 per weight) over attention's per key (forward 4,
    backward 10 with the scores recomputed, per head dimension), times 2.25, which fits step
    times of one to six rows on CPU (measured on SmolLM2-135M, whose cost this gives as about
    5,000 keys, over a 1,141-token prefix); FLOPs undercount what a token costs there
    (dropout's random numbers, norms and casts, a padded token's logits)."""
    text = getattr(config, "text_config", None) or config
    hidden, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_layer = (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
                 + 3 * hidden * getattr(text, "intermediate_size", 4 * hidden)
                 + text.vocab_size * hidden / text.num_hidden_layers)
    return round(2.25 * 4 * per_layer / (14 * heads * head_dim))
