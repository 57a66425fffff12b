"""Batched decoding with a paged KV cache, for serving many users from one GPU (the app) and
for answering the refresh's evaluation cases in one batch (the recipe).

`StaticDecoder` runs a Qwen3/Llama-family model's layers itself over a pool of KV pages of a
fixed size (`kv_tokens` in all, shared by every user). A request is given the pages its prompt
and answer need when it is admitted, not a worst case per user, so one 32k-token report and a
few short chats share the memory of eight 8k slots. A decode step's shapes depend only on its
batch size (each row reads its own pages, up to its own length), so a step is captured once per
batch size as a CUDA graph: the ~50 ms of Python and kernel launches per token of `generate()`
become one graph replay. A
prompt's prefill is a graph too, one per padded length (64 to 2,048 tokens); longer prompts are
prefilled in chunks between the other users' decode steps. LoRA adapters are applied per row
(stacked per layer, a 0/1 mask per row), so users of different departments share one batch and
one graph.

`BatchingEngine` is the thread that owns the decoder: requests join free slots between
steps (continuous batching) once their pages are free, every step decodes all active slots
together, tokens stream back through each request's queue.

On CPU the same code runs without graphs; `generate()` stays the default there.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.nn.attention.bias import causal_lower_right

from serving.guided import mask_rows
from serving.paged_attention import gathered_pages, paged_attention

log = logging.getLogger(__name__)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _is_lora(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama/Qwen3 compute it (in fp32, weight applied in the input dtype)."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _add_norm(hidden: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next RMSNorm: (new hidden, its norm)."""
    hidden = hidden + update
    return hidden, _rms_norm(hidden, weight, eps)


def _gated(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def _norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_eps: float,
               k_eps: float, cos: torch.Tensor, sin: torch.Tensor):
    """Qwen3's per-head norms of q and k, then the rotation, heads first: (batch, heads, length, dim)."""
    q = _rms_norm(q, q_weight, q_eps).transpose(1, 2)
    k = _rms_norm(k, k_weight, k_eps).transpose(1, 2)
    return _rope(q, k, cos, sin)


def _add_lora(base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor):
    """base + each row's own LoRA: (x A^T, masked to the row's rank block) B^T, the add inside the matmul."""
    low = (x @ a.T) * mask
    return torch.addmm(base.reshape(-1, base.shape[-1]), low.reshape(-1, low.shape[-1]), b.T).view(base.shape)


def causal_lm_of(model):
    """The causal LM itself under a peft wrapper (or the model, unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model):
    """The decoder stack and the output projection under a (peft-wrapped) causal LM."""
    causal_lm = causal_lm_of(model)
    return causal_lm.model, causal_lm.lm_head


def stop_token_ids(tokenizer, model) -> frozenset[int]:
    """The tokens that end an answer: the tokenizer's end and the model's generation config
    (Qwen3 ends a turn with <|im_end|> and a text with <|endoftext|>), as generate() stops."""
    ids = set()
    for eos in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids |= set(eos if isinstance(eos, list) else [eos])
    return frozenset(i for i in ids if i is not None)


def flatten_nested_scales(decoder) -> int:
    """bitsandbytes' double quantisation stores each 4-bit layer's scales in 8 bits and
    dequantises them on every call: one more kernel per layer per token. Dequantised once
    here (fp32: +0.5 bytes per 64 weights, 0.7 GiB at 14B). Returns the layers changed."""
    changed = 0
    for module in decoder.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not getattr(state, "nested", False):
            continue
        import bitsandbytes.functional as bnb_functional

        state.absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        state.nested, state.state2, state.offset = False, None, None
        changed += 1
    return changed


def layer_groups(layer) -> dict[str, tuple[Any, ...]]:
    """A decoder layer's projections grouped by their input: each group is one product when joined."""
    attention, mlp = layer.self_attn, layer.mlp
    return {"qkv": (attention.q_proj, attention.k_proj, attention.v_proj), "o": (attention.o_proj,),
            "gate_up": (mlp.gate_proj, mlp.up_proj), "down": (mlp.down_proj,)}


def fuse_layers(layers) -> dict[tuple[int, str], Any]:
    """(layer number, group) -> FusedNF4 for every group whose layers are all flat NF4 4-bit
    (after flatten_nested_scales); other groups stay as they are."""
    from serving.nf4 import FusedNF4, fusable

    def base(module):
        return module.base_layer if _is_lora(module) else module

    fused = {}
    for number, layer in enumerate(layers):
        for group, modules in layer_groups(layer).items():
            bases = [base(m) for m in modules]
            if all(fusable(b) for b in bases):
                try:
                    fused[(number, group)] = FusedNF4(bases)
                except ValueError as exc:  # e.g. still double-quantised: bitsandbytes' own path
                    log.info("layer %d %s not fused: %s", number, group, exc)
    return fused


class StaticDecoder:
    """The model's forward over a paged KV cache; decode steps replayed as CUDA graphs.

    `kv_tokens` is the cache's size in tokens (default: every slot at `max_len`); it is cut
    into pages of `page_size` tokens, plus page 0, where idle rows and padding write and no
    request reads. `max_len` is the longest prompt + answer one request may have."""

    def __init__(self, model, max_batch: int = 8, max_len: int = 4096, kv_tokens: int | None = None,
                 page_size: int = 128, fused_nf4: bool | None = None, graph_prefill: bool | None = None,
                 join_lora: bool = True,
                 prefill_lengths: Sequence[int] = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)):
        self.model = model
        self.decoder, self.head = decoder_and_head(model)
        config = self.decoder.config
        self.layers = list(self.decoder.layers)
        self._layer_groups = [layer_groups(layer) for layer in self.layers]
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device = self.decoder.embed_tokens.weight.device
        self.dtype = self.decoder.embed_tokens.weight.dtype
        self.max_batch, self.max_len, self.page_size = max_batch, max_len, page_size
        self.table_width = -(-max_len // page_size)  # pages of the longest request
        kv_tokens = kv_tokens or max_batch * self.table_width * page_size
        self.total_pages = -(-kv_tokens // page_size)
        self.kv_tokens = self.total_pages * page_size
        shape = (len(self.layers), self.total_pages + 1, self.kv_heads, page_size, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Pages by slot: a live request's, or a finished one's kept as a prompt start to share
        # (parked) until their pages are needed. Page 0 is nobody's. A prompt start computed
        # with the same adapter is shared, not copied: its full pages are listed by every slot
        # that uses it (_refs counts them) and written by none, so a step reads each once
        # (paged_attention) and the pool holds it once.
        self._row_pages: list[list[int]] = [[] for _ in range(max_batch)]
        self._parked: list[int] = []  # slots with parked pages, least recently parked first
        self._free: list[int] = list(range(self.total_pages, 0, -1))
        self._refs = [0] * (self.total_pages + 1)  # how many slots list each page
        self.use_graphs = self.device.type == "cuda"
        self.batch_sizes = sorted({b for b in (1, 2, 4, 8, 16, 32) if b < max_batch} | {max_batch})
        # Each slot's pages in order, on the device for the attention kernels: written when a
        # request is given its pages (all of them at once), cleared when they are taken back
        self._table = torch.zeros(max_batch, self.table_width, dtype=torch.int32, device=self.device)
        # A step's inputs (tokens, positions, where each row writes, how far each row reads),
        # copied in with one transfer from a pinned staging buffer (two blocking copies and a
        # fill were ~0.1 ms of an 11 ms step with the GPU idle)
        self._step_inputs = torch.zeros(5, max_batch, dtype=torch.long, device=self.device)
        # zeros, not torch.empty: a batch bucket's idle rows are embedded too, and an uninitialised id
        # there is out of the vocabulary (an IndexError on CPU, a device assert on CUDA)
        self._staging = torch.zeros(5, max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda")
        # recorded after each transfer: the staging buffer is written again only once it is done
        self._staged = torch.cuda.Event() if self.device.type == "cuda" else None
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._pool = None
        # A prompt's prefill replayed as a CUDA graph too, padded to the next of these lengths:
        # eager, a 512-token prefill at 14B is ~1,200 kernel launches from Python (60-110 ms,
        # host-bound). Longer prompts than the largest length run eagerly, in chunks. (Without
        # graphs, graph_prefill=True runs the same padded prefill eagerly: how the CPU tests check it.)
        self.graph_prefill = self.use_graphs if graph_prefill is None else graph_prefill
        self.prefill_lengths = sorted(n for n in set(prefill_lengths) if n < max_len)
        self._prefill_runs: dict[int, tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor]] = {}
        self._prefill_pages = torch.zeros(self.table_width, dtype=torch.long, device=self.device)
        self._prefill_last = torch.zeros(1, dtype=torch.long, device=self.device)
        # (adapter, prompt) a slot's pages hold, complete: a source others may share from
        self._slot_prompts: list[tuple[str | None, tuple[int, ...]] | None] = [None] * max_batch
        # what a slot given a new request still holds of its last prompt: a start for that slot
        # alone, since it may write over it
        self._own_start: list[tuple[str | None, tuple[int, ...]] | None] = [None] * max_batch
        self.reused_tokens = 0  # prompt tokens taken from another slot (shared or copied) instead of computed
        cuda = self.device.type == "cuda"
        # Norms and rotary embeddings are a dozen tiny kernels each; compiled, a few fused ones.
        elementwise = (_rms_norm, _rope, _add_norm, _gated, _norm_rope)
        if cuda:
            elementwise = tuple(torch.compile(f, dynamic=False) for f in elementwise)
        self._norm, self._rope, self._add_norm, self._gated, self._norm_rope = elementwise
        if cuda:
            self.flattened_scales = flatten_nested_scales(self.decoder)
        # 4-bit layers with one input joined (q/k/v, gate/up): 4 products per layer, not 7.
        # Decode steps (up to 8 rows) multiply on the tensor cores with serving/nf4_mma.cu
        # (bitsandbytes' GEMV where it cannot run). Prefills use bitsandbytes' dequantize + matmul.
        self._fused: dict[tuple[int, str], Any] = {}
        self.join_lora = join_lora  # a joined product's LoRA as one pair of matmuls (see _stack_groups)
        if cuda if fused_nf4 is None else fused_nf4:
            self._fused = fuse_layers(self.layers)
        self.refresh_adapters()

    # -- pages ---------------------------------------------------------------------------

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def can_hold(self, tokens: int) -> bool:
        """Whether one request of `tokens` (prompt + answer) fits this decoder at all."""
        return tokens < self.max_len - 1 and self.pages_for(tokens) <= self.total_pages

    def reserve(self, slot: int, tokens: int) -> bool:
        """Give `slot` the pages for a request of `tokens`, if the pool has them now: free pages
        first, then the pages other finished requests left parked (least recently finished
        first). The slot's own parked pages stay first in its list: they may hold the start of
        its next prompt. False (and nothing changed) when the pool cannot hold it yet."""
        need = self.pages_for(tokens)
        own = self._row_pages[slot]
        # Pages another slot lists too are never written: a slot that shares some keeps none
        # of its old pages (its prompt start stays with the others, to be shared again).
        keep = all(self._refs[page] == 1 for page in own)
        holders = collections.Counter(page for other in self._parked if other != slot
                                      for page in self._row_pages[other])
        if not keep:
            holders.update(own)
        reclaimable = sum(1 for page, count in holders.items() if count == self._refs[page])
        if need > (len(own) if keep else 0) + len(self._free) + reclaimable:
            return False
        if slot in self._parked:
            self._parked.remove(slot)
        if not keep:
            self._evict(slot)
            own = self._row_pages[slot]
        elif len(own) > need:  # the pages given back held the rest of the old prompt
            for page in reversed(own[need:]):
                self._drop(page)
            del own[need:]
            if self._slot_prompts[slot] is not None:
                adapter, prompt = self._slot_prompts[slot]
                self._slot_prompts[slot] = (adapter, prompt[:need * self.page_size])
        self._own_start[slot], self._slot_prompts[slot] = self._slot_prompts[slot], None
        for other in list(self._parked):
            if len(own) + len(self._free) >= need:
                break
            self._evict(other)
        while len(own) < need:
            page = self._free.pop()
            self._refs[page] = 1
            own.append(page)
        self._write_table(slot)
        return True

    def slot_for(self, free: Sequence[int]) -> int:
        """Of the free slots, the one to give a new request: one that holds no pages, so the
        parked prompts stay to be shared (the same user's next turn takes its last one from
        there); else one whose pages nobody else lists (reserve() would give up a shared one
        whole); the lowest first."""
        return min(free, key=lambda slot: (bool(self._row_pages[slot]),
                                           any(self._refs[page] > 1 for page in self._row_pages[slot]), slot))

    def _write_table(self, slot: int) -> None:
        own = self._row_pages[slot]
        self._table[slot] = torch.tensor(own + [0] * (self.table_width - len(own)), dtype=torch.int32)

    def _drop(self, page: int) -> None:
        self._refs[page] -= 1
        if not self._refs[page]:
            self._free.append(page)

    def release(self, slot: int) -> None:
        """The request in `slot` is done: its pages stay parked, as a prompt start another
        request may share, until the pool needs them."""
        if self._row_pages[slot] and self._slot_prompts[slot] is not None:
            self._parked.append(slot)
        else:
            self._evict(slot)

    def _evict(self, slot: int) -> None:
        if slot in self._parked:
            self._parked.remove(slot)
        self._slot_prompts[slot] = self._own_start[slot] = None
        for page in reversed(self._row_pages[slot]):
            self._drop(page)
        self._row_pages[slot] = []
        self._table[slot] = 0

    # -- adapters ------------------------------------------------------------------------

    def refresh_adapters(self) -> None:
        """Re-read which LoRA adapters are loaded (after a load, replace or unload). Each
        adapted layer gets its adapters' A matrices stacked (sum of ranks x in) and B
        matrices side by side with the scaling folded in, so all adapters of all rows cost
        two matmuls; a 0/1 mask per row keeps each row's own rank block. The graphs hold
        the old weights' addresses, so they are captured again."""
        names: set[str] = set()
        self._stacks: dict[Any, tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self._group_stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        for module in self.decoder.modules():
            if not _is_lora(module):
                continue
            present = [n for n in sorted(module.lora_A.keys()) if n in module.lora_B]
            names |= set(present)
            if not present:
                continue
            a = torch.cat([module.lora_A[n].weight for n in present]).to(self.dtype)
            b = torch.cat([module.lora_B[n].weight * module.scaling[n] for n in present], dim=1).to(self.dtype)
            signature = tuple((n, module.lora_A[n].weight.shape[0]) for n in present)
            self._stacks[module] = (a.contiguous(), b.contiguous(), signature)
            self._add_mask(signature, a.shape[0])
        self._stack_groups()
        self.adapter_index = {name: i for i, name in enumerate(sorted(names))}
        # cached prompts were computed with the old weights
        self._slot_prompts, self._own_start = [None] * self.max_batch, [None] * self.max_batch
        for slot in list(self._parked):  # so their pages hold nothing worth keeping
            self._evict(slot)
        # rows in flight keep their adapter (its new weights, after a promotion)
        previous = getattr(self, "_row_adapter", [None] * self.max_batch)
        self._row_adapter = [None] * self.max_batch
        for row, adapter in enumerate(previous):
            self.set_row_adapter(row, adapter if adapter in self.adapter_index else None)
        self._graphs.clear()
        self._prefill_runs.clear()
        # Every graph of the old pool is gone, so the allocator has released the pool: a capture
        # into its handle would trip its "pool is live" assert (it did, at the first promotion
        # on a GPU, bench/app_gpu.py). The next capture starts a new pool.
        self._pool = None

    def _stack_groups(self) -> None:
        """For each joined 4-bit product with LoRA on more than one of its layers (q/k/v,
        gate/up): the layers' A stacks on top of each other and their B stacks as one block
        diagonal, so the group's LoRA is two matmuls added to the joined output, not two per
        layer (8 fewer kernels per layer in a decode step with q/k/v adapted)."""
        if not self.join_lora:
            return
        for (number, group), fused in self._fused.items():
            modules = self._layer_groups[number][group]
            stacks = [self._stacks.get(m) for m in modules]
            if sum(stack is not None for stack in stacks) < 2:
                continue
            ranks = [stack[0].shape[0] if stack else 0 for stack in stacks]
            a = torch.cat([stack[0] for stack in stacks if stack])
            b = torch.zeros(sum(fused.sizes), sum(ranks), dtype=self.dtype, device=a.device)
            row = column = 0
            for stack, size, rank in zip(stacks, fused.sizes, ranks):
                if stack:
                    b[row:row + size, column:column + rank] = stack[1]
                row, column = row + size, column + rank
            signature = tuple(entry for stack in stacks if stack for entry in stack[2])
            self._group_stacks[(number, group)] = (a, b, signature)
            self._add_mask(signature, a.shape[0])
            for module in modules:  # the group's stack replaces theirs
                self._stacks.pop(module, None)

    def _add_mask(self, signature: tuple, ranks: int) -> None:
        """A 0/1 mask per row over the rank blocks of `signature` (set by set_row_adapter)."""
        if signature not in self._masks:
            self._masks[signature] = torch.zeros(self.max_batch, 1, ranks, dtype=self.dtype, device=self.device)

    def set_row_adapter(self, row: int, adapter: str | None) -> None:
        self._row_adapter[row] = adapter
        for signature, mask in self._masks.items():
            mask[row] = 0
            start = 0
            for name, rank in signature:
                if name == adapter:
                    mask[row, :, start:start + rank] = 1
                start += rank

    def _linear(self, module, x: torch.Tensor) -> torch.Tensor:
        return self._with_lora(module, x, module.base_layer(x) if _is_lora(module) else module(x))

    def _with_lora(self, module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        stack = self._stacks.get(module)
        if stack is None:
            return base
        a, b, signature = stack
        return _add_lora(base, x, a, b, self._masks[signature][: x.shape[0]])

    def _project(self, number: int, group: str, x: torch.Tensor) -> list[torch.Tensor]:
        """The layers of one input (q/k/v; gate/up; o; down): one fused 4-bit product, then the
        LoRA (the group's, or each layer's); without fused weights, layer by layer."""
        modules = self._layer_groups[number][group]
        fused = self._fused.get((number, group))
        if fused is None:
            return [self._linear(module, x) for module in modules]
        stack = self._group_stacks.get((number, group))
        if stack is not None:
            a, b, signature = stack
            joined = _add_lora(fused.joined(x), x, a, b, self._masks[signature][: x.shape[0]])
            return list(joined.split(fused.sizes, dim=-1))
        return [self._with_lora(module, x, base) for module, base in zip(modules, fused(x))]

    # -- the forward ---------------------------------------------------------------------

    @staticmethod
    def _eps(norm) -> float:
        return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slot_pages: torch.Tensor | None = None,
                 start: int = 0, last: torch.Tensor | None = None, step: tuple | None = None) -> torch.Tensor:
        """Logits of each row's last token (or of token `last`).
        Decode: `step` = (page, offset) each row writes its token at, and how many positions each
        row reads (its slot's pages, from the table): rows 0..B-1, one token each.
        Prefill: one row into the pages `slot_pages` (the slot's, in order), from position `start`
        on (its pages already hold the positions before it); padding sits at position max_len-1,
        never read."""
        rows, length = ids.shape
        hidden = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        groups = self.heads // self.kv_heads
        if step is not None:
            write_page, write_offset, lengths = step
            table = self._table[:rows]
        else:
            write_page = slot_pages[positions[0] // self.page_size]
            write_offset = positions[0] % self.page_size
            context = slot_pages[: self.pages_for(start + length)] if start else None
        # decode steps run the compiled elementwise kernels; a prefill's shapes vary
        norm, rope, add_norm, gated, norm_rope = (
            (self._norm, self._rope, self._add_norm, self._gated, self._norm_rope) if step is not None
            else (_rms_norm, _rope, _add_norm, _gated, _norm_rope))
        update = None  # the last MLP output, not yet added to hidden
        for number, layer in enumerate(self.layers):
            attention = layer.self_attn
            # the previous layer's MLP output is added here, with this layer's norm
            if update is not None:
                hidden, x = add_norm(hidden, update, layer.input_layernorm.weight, self._eps(layer.input_layernorm))
            else:
                x = norm(hidden, layer.input_layernorm.weight, self._eps(layer.input_layernorm))
            q, k, v = self._project(number, "qkv", x)
            q = q.reshape(rows, length, self.heads, self.head_dim)
            k = k.reshape(rows, length, self.kv_heads, self.head_dim)
            v = v.reshape(rows, length, self.kv_heads, self.head_dim)
            if hasattr(attention, "q_norm"):  # Qwen3 normalises each head (with the rotation: one kernel)
                q, k = norm_rope(q, k, attention.q_norm.weight, attention.k_norm.weight, self._eps(attention.q_norm),
                                 self._eps(attention.k_norm), cos, sin)
            else:
                q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            keys, values = self.keys[number], self.values[number]
            if step is not None:
                # each row writes its token at its own page and offset, then reads its pages
                keys[write_page, :, write_offset] = k[:, :, 0]
                values[write_page, :, write_offset] = v[:, 0]
                out = paged_attention(q[:, :, 0], keys, values, table, lengths)
                out = out.reshape(rows, 1, self.heads * self.head_dim)
            else:
                keys[write_page, :, write_offset] = k[0].transpose(0, 1)
                values[write_page, :, write_offset] = v[0]
                v = v.transpose(1, 2)
                if context is not None:  # the new tokens also see the positions before them
                    k = gathered_pages(keys, context)[None, :, :start + length]
                    v = gathered_pages(values, context)[None, :, :start + length]
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), is_causal=not start,
                    attn_mask=causal_lower_right(length, start + length) if start else None)
                out = out.transpose(1, 2).reshape(rows, length, self.heads * self.head_dim)
            hidden, x = add_norm(hidden, self._project(number, "o", out)[0], layer.post_attention_layernorm.weight,
                                 self._eps(layer.post_attention_layernorm))
            gate, up = self._project(number, "gate_up", x)
            update = self._project(number, "down", gated(layer.mlp.act_fn, gate, up))[0]
        hidden = hidden + update
        final = hidden[:, -1] if last is None else hidden.index_select(1, last)[:, 0]
        return self.head(self.decoder.norm(final)).float()

    # A shared prompt start shorter than this is recomputed: taking it would not pay.
    MIN_REUSED_PREFIX = 16

    def _reusable_prefix(self, prompt_ids: Sequence[int], adapter: str | None,
                         asking: int | None = None) -> tuple[int, int | None]:
        """The longest start of this prompt already in some slot's cache with the same
        adapter (a department's system prompt and tool schemas; the gate's cases), and that
        slot; for slot `asking`, its own last prompt too. At least one token is left to
        compute: its logits are the answer's first token."""
        best, source = 0, None
        mine = [] if asking is None else [(asking, self._own_start[asking])]
        for slot, cached in [*enumerate(self._slot_prompts), *mine]:
            if cached is None or cached[0] != adapter:
                continue
            previous = cached[1]
            limit = min(len(previous), len(prompt_ids) - 1, len(self._row_pages[slot]) * self.page_size)
            same = 0
            while same < limit and previous[same] == prompt_ids[same]:
                same += 1
            if same > best:
                best, source = same, slot
        return (best, source) if best >= self.MIN_REUSED_PREFIX else (0, None)

    @torch.inference_mode()
    def prefill(self, slot: int, prompt_ids: Sequence[int], adapter: str | None, done: int = 0,
                limit: int | None = None) -> tuple[int, torch.Tensor | None]:
        """Run the prompt into the slot's pages (reserve() first) from token `done` on, at most
        `limit` tokens (all by default). Returns the prompt's tokens now in the cache and, once
        all of them are, the logits for the first new token (else None). On the first call a
        start of the prompt that another slot computed with the same adapter is not computed
        again: its full pages are shared, a page it fills in part is copied."""
        total = len(prompt_ids)
        if total >= self.max_len:
            raise ValueError(f"the prompt has {total} tokens; the decoder holds {self.max_len - 1}")
        if len(self._row_pages[slot]) < self.pages_for(total):
            raise ValueError(f"slot {slot} has no pages for a {total}-token prompt: reserve() it first")
        length = None
        if not done:
            length = self._prefill_length(total) if limit is None or total <= limit else None
            # looked up before the slot's own entry is cleared: a slot may reuse its previous prompt
            done, source = (0, None) if length else self._reusable_prefix(prompt_ids, adapter, slot)
            self._slot_prompts[slot] = self._own_start[slot] = None  # not a source until complete
            if source is not None and source != slot:
                self._share(source, slot, done)
            self.reused_tokens += done
        stop = total if limit is None else min(total, done + limit)
        # the prefill is one row: row 0 of the masks carries this slot's adapter meanwhile
        row_zero = self._row_adapter[0]
        self.set_row_adapter(0, adapter)
        try:
            if length:  # a graph replay computes the whole prompt faster than eager code copies a start
                logits = self._graphed_prefill(slot, prompt_ids, length)
            else:
                logits = self._eager_prefill(slot, prompt_ids[done:stop], done)
        finally:
            self.set_row_adapter(0, row_zero)
            self.set_row_adapter(slot, adapter)
        if stop < total:
            return stop, None
        self._slot_prompts[slot] = (adapter, tuple(prompt_ids))
        return total, logits

    def _share(self, source: int, slot: int, tokens: int) -> None:
        """`slot` takes the first `tokens` positions of `source`'s pages: the full pages listed
        (its own, which reserve() left it alone with, given back), the last one copied: the
        slot writes the rest of it."""
        full, own, theirs = tokens // self.page_size, self._row_pages[slot], self._row_pages[source]
        for index in range(full):
            if own[index] != theirs[index]:
                self._drop(own[index])
                own[index] = theirs[index]
                self._refs[own[index]] += 1
        if tokens % self.page_size:
            self.keys[:, own[full]] = self.keys[:, theirs[full]]
            self.values[:, own[full]] = self.values[:, theirs[full]]
        self._write_table(slot)

    def _eager_prefill(self, slot: int, part: Sequence[int], start: int) -> torch.Tensor:
        """The tokens `part` at positions start.. (the slot's pages already hold those before)."""
        ids = torch.tensor([list(part)], device=self.device)
        positions = torch.arange(start, start + len(part), device=self.device)[None, :]
        return self._forward(ids, positions, self._table[slot].long(), start)[0]

    def _prefill_length(self, tokens: int) -> int | None:
        if not self.graph_prefill:
            return None
        return next((n for n in self.prefill_lengths if n >= tokens), None)

    def _graphed_prefill(self, slot: int, prompt_ids: Sequence[int], length: int) -> torch.Tensor:
        if length not in self._prefill_runs:
            self._prefill_runs[length] = self._prefill_run(length)
        run, ids, positions = self._prefill_runs[length]
        tokens = len(prompt_ids)
        ids[0, :tokens] = torch.tensor(list(prompt_ids), device=self.device)
        ids[0, tokens:] = 0
        positions[0, :tokens] = torch.arange(tokens, device=self.device)
        positions[0, tokens:] = self.max_len - 1
        self._prefill_pages.copy_(self._table[slot])
        self._prefill_last.fill_(tokens - 1)
        return run()[0].clone()

    def _prefill_run(self, length: int):
        """(run, its token ids, their positions): a prefill of `length` tokens over fixed
        tensors, captured as a CUDA graph where graphs are on (warm-up writes into page 0,
        which no request reads)."""
        ids = torch.zeros(1, length, dtype=torch.long, device=self.device)
        positions = torch.full((1, length), self.max_len - 1, dtype=torch.long, device=self.device)
        self._prefill_pages.zero_()
        self._prefill_last.zero_()

        def step():
            return self._forward(ids, positions, self._prefill_pages, last=self._prefill_last)

        if not self.use_graphs:
            return step, ids, positions
        graph, logits = self._graph(step)

        def replay():
            graph.replay()
            return logits

        return replay, ids, positions

    def _graph(self, step: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Warm `step` up on a side stream, then capture it into the decoder's graph pool."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = step()
        return graph, output

    def bucket(self, rows: int) -> int:
        return next(b for b in self.batch_sizes if b >= rows)

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One step for rows 0..len(tokens)-1: token i sits at positions[i] of slot i's pages (a
        row at position max_len-1 is idle: it writes into page 0 and reads one position).
        Returns (rows, vocab) float logits."""
        rows, size, idle = len(tokens), self.page_size, self.max_len - 1
        batch = self.bucket(rows)
        places = [positions[row] if row < rows else idle for row in range(batch)]
        live = [row < rows and places[row] < idle for row in range(batch)]
        inputs = [[tokens[row] if row < rows else 0 for row in range(batch)],  # idle rows: a valid id
                  places,
                  [self._row_pages[row][places[row] // size] if live[row] else 0 for row in range(batch)],
                  [places[row] % size if live[row] else 0 for row in range(batch)],
                  [places[row] + 1 if live[row] else 1 for row in range(batch)]]
        if self._staged is not None:
            self._staged.synchronize()
        self._staging[:, :batch] = torch.tensor(inputs)
        self._step_inputs[:, :batch].copy_(self._staging[:, :batch], non_blocking=True)
        if self._staged is not None:
            self._staged.record()
        if not self.use_graphs:
            return self._step(batch)[:rows]
        if batch not in self._graphs:
            self._capture(batch)
        graph, logits = self._graphs[batch]
        graph.replay()
        return logits[:rows]

    def _step(self, batch: int) -> torch.Tensor:
        ids, places, writes, offsets, lengths = (self._step_inputs[i, :batch] for i in range(5))
        return self._forward(ids[:, None], places[:, None], step=(writes, offsets, lengths))

    def _capture(self, batch: int) -> None:
        """Warm up on a side stream, then capture one decode step for this batch size. Warm-up
        rows are idle: they write into page 0 and read one position."""
        saved = self._step_inputs[:, :batch].clone()
        self._step_inputs[:, :batch] = 0
        self._step_inputs[1, :batch] = self.max_len - 1
        self._step_inputs[4, :batch] = 1
        self._graphs[batch] = self._graph(lambda: self._step(batch))
        self._step_inputs[:, :batch] = saved


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> int:
    """Greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(-1) - ordered < top_p
    ordered = ordered * keep
    choice = torch.multinomial(ordered / ordered.sum(), 1, generator=generator)
    return int(order[choice])


def ban_first(logits: torch.Tensor, tokens: frozenset[int]) -> torch.Tensor:
    """The answer's first-step logits with those of `tokens` at -inf, unless nothing else is
    allowed (a guide may allow only one token)."""
    if not tokens:
        return logits
    kept = logits.index_fill(-1, torch.tensor(sorted(tokens), device=logits.device), float("-inf"))
    return kept if torch.isfinite(kept).any() else logits


class FirstTokenBan:
    """transformers LogitsProcessor for generate(): ban_first at the answer's first step."""

    def __init__(self, tokens: frozenset[int], prompt_tokens: int):
        self.tokens, self.prompt_tokens = tokens, prompt_tokens

    def __call__(self, input_ids, scores):
        return ban_first(scores, self.tokens) if input_ids.shape[1] == self.prompt_tokens else scores


@dataclass
class DecodeRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    adapter: str | None = None
    stop_ids: frozenset[int] = frozenset()
    guide: Any = None  # a guided.GuidedSession: tool calls kept valid while decoded
    not_first: frozenset[int] = frozenset()  # tokens the answer may not open with (a copy that went wrong)
    tokens: "queue.Queue[int | None | BaseException]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finish_reason: str = ""
    generated: int = 0
    first_token_at: float = 0.0  # time.perf_counter() when the first token was ready

    def drain(self, timeout: float = 600) -> list[int | None | BaseException]:
        """The next item and every one already waiting behind it: a listener that fell behind
        the decode steps catches up in one go instead of paying per token."""
        items = [self.tokens.get(timeout=timeout)]
        while items[-1] is not None and not isinstance(items[-1], BaseException):
            try:
                items.append(self.tokens.get_nowait())
            except queue.Empty:
                break
        return items

    def collect(self, timeout: float = 600) -> list[int]:
        """Every token of the answer once it is finished; the engine's error if it failed."""
        tokens = []
        while (item := self.tokens.get(timeout=timeout)) is not None:
            if isinstance(item, BaseException):
                raise item
            tokens.append(item)
        return tokens


class BatchingEngine:
    """The thread that owns a StaticDecoder: admits requests into free slots between steps,
    in the order they came, once the decoder has their pages; prefills them, at most
    `prefill_chunk` prompt tokens between two decode steps (a 32k-token report is prefilled in
    pieces while the others keep receiving tokens); decodes every active slot in one step.
    `guard` is held around each step, so whoever swaps adapters (holding the same lock) never
    does it mid-step."""

    def __init__(self, decoder: StaticDecoder, guard: threading.Lock | None = None, prefill_chunk: int = 2048):
        self.decoder = decoder
        self.guard = guard or threading.Lock()
        self.prefill_chunk = prefill_chunk
        self._waiting: "queue.Queue[DecodeRequest]" = queue.Queue()
        self._pending: "collections.deque[DecodeRequest]" = collections.deque()  # arrived, not yet given pages
        self._slots: list[DecodeRequest | None] = [None] * decoder.max_batch
        self._prefilled: dict[int, int] = {}  # slot -> prompt tokens in its cache, while it is prefilled
        self._positions = [0] * decoder.max_batch
        self._last = [0] * decoder.max_batch
        self._advances: list[tuple[Any, int]] = []  # (guide, token) emitted, not yet followed by the guide
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()
        self._stop = threading.Event()
        self.on_step: Callable[[int], None] | None = None  # rows decoded per step (for benchmarks)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether the decoder can hold this request at all (it may wait for pages)."""
        return self.decoder.can_hold(prompt_tokens + max_new_tokens)

    def submit(self, request: DecodeRequest) -> DecodeRequest:
        if not self.fits(len(request.prompt_ids), request.max_new_tokens):
            raise ValueError("the request does not fit the decoder's cache")
        # concurrent first requests must start one engine thread, not several; queued under the same
        # lock, so a dying engine either ends this request too or has already made way for a new one
        with self._starting:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="batching-engine", daemon=True)
                self._thread.start()
            self._waiting.put(request)
        return request

    def close(self) -> None:
        """Stop the engine thread; requests it still holds or has queued end as cancelled."""
        with self._starting:
            thread = self._thread
            self._stop.set()
            if thread is not None:
                self._waiting.put(None)  # type: ignore[arg-type]
        if thread is not None:
            thread.join(timeout=10)

    def _vacate(self, slot: int) -> None:
        """The slot is free again; its pages are parked or freed."""
        self._slots[slot] = None
        self._prefilled.pop(slot, None)
        self._positions[slot] = self.decoder.max_len - 1
        with self.guard:
            self.decoder.release(slot)

    def _finish(self, slot: int, reason: str) -> None:
        request = self._slots[slot]
        self._vacate(slot)
        if request is not None:
            request.finish_reason = request.finish_reason or reason
            request.tokens.put(None)

    def _fail(self, slot: int | None, request: DecodeRequest, exc: BaseException) -> None:
        if slot is not None:
            self._vacate(slot)
        request.finish_reason = "error"
        request.tokens.put(exc)

    @staticmethod
    def _pick(request: DecodeRequest, logits: torch.Tensor, greedy_token: int | None = None) -> int:
        """The row's next token from its logits (already masked by its guide, if any)."""
        if greedy_token is not None and request.temperature <= 0:
            return greedy_token
        return sample(logits, request.temperature, request.top_p)

    def _emit(self, slot: int, token: int) -> None:
        request = self._slots[slot]
        if request.guide is not None:  # advanced once the next step is launched, while the GPU computes it
            self._advances.append((request.guide, token))
        request.generated += 1
        if request.generated == 1:
            request.first_token_at = time.perf_counter()
        if token in request.stop_ids:
            self._finish(slot, "stop")
            return
        request.tokens.put(token)
        if request.generated >= request.max_new_tokens:
            self._finish(slot, "length")
            return
        self._last[slot] = token

    def _admit(self, block: bool) -> bool:
        """Move arrivals behind the pending ones; give the first pending requests free slots and
        their pages, in order (a long request at the head waits for pages; those behind it wait
        too, so it is not passed forever). False once close() was called."""
        while True:
            try:
                arrived = self._waiting.get(block=block and not self._pending, timeout=None)
            except queue.Empty:
                break
            if arrived is None:  # close()
                return False
            self._pending.append(arrived)
            block = False
        while self._pending:
            request = self._pending[0]
            if request.cancelled.is_set():
                self._pending.popleft()
                request.finish_reason = "cancelled"
                request.tokens.put(None)
                continue
            if None not in self._slots:
                break
            with self.guard:  # refresh_adapters() evicts parked pages from another thread, under the guard
                slot = self.decoder.slot_for([i for i, held in enumerate(self._slots) if held is None])
                reserved = self.decoder.reserve(slot, len(request.prompt_ids) + request.max_new_tokens)
            if not reserved:
                break
            self._pending.popleft()
            self._slots[slot] = request
            self._prefilled[slot] = 0
        return True

    def _prefill_some(self) -> None:
        """Prefill the admitted requests in order, about prefill_chunk prompt tokens in all: a
        short prompt whole, a long one a chunk at a time."""
        budget = self.prefill_chunk
        for slot in list(self._prefilled):
            if budget <= 0:
                break
            request, done = self._slots[slot], self._prefilled[slot]
            left = len(request.prompt_ids) - done
            limit = None if left <= budget else budget
            try:
                with self.guard:
                    done, logits = self.decoder.prefill(slot, request.prompt_ids, request.adapter, done, limit)
            except Exception as exc:  # this request fails; the others go on
                self._fail(slot, request, exc)
                continue
            budget -= left if limit is None else limit
            if logits is None:
                self._prefilled[slot] = done
                continue
            del self._prefilled[slot]
            self._positions[slot] = len(request.prompt_ids)
            if request.guide is not None:  # a session may begin inside a call (a continued answer)
                mask_rows(logits.view(1, -1), {0: request.guide})
            self._emit(slot, self._pick(request, ban_first(logits, request.not_first)))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never leave requests waiting on a dead thread
            log.exception("the batching engine stopped")
            self._abandon(exc)
            raise
        self._abandon(None)

    def _abandon(self, exc: BaseException | None) -> None:
        """End every request the engine holds or has queued (with `exc`, or cancelled after
        close()), and let the next submit start a new engine thread."""
        with self._starting:
            held = [(slot, request) for slot, request in enumerate(self._slots) if request is not None]
            queued = list(self._pending)
            self._pending.clear()
            while True:
                try:
                    queued.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            self._thread = None
        for slot, request in held:
            if exc is None:
                self._finish(slot, "cancelled")
            else:
                self._fail(slot, request, exc)
        for request in queued:
            if request is None:
                continue
            if exc is None:
                request.finish_reason = "cancelled"
                request.tokens.put(None)
            else:
                self._fail(None, request, exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = any(r is not None for r in self._slots)
            if not self._admit(block=not busy):
                return
            for slot, request in enumerate(self._slots):
                if request is not None and request.cancelled.is_set():
                    self._finish(slot, "cancelled")
            if self._prefilled:
                self._prefill_some()
            active = [i for i, r in enumerate(self._slots) if r is not None and i not in self._prefilled]
            if not active:
                continue
            rows = max(active) + 1
            idle = self.decoder.max_len - 1
            tokens = [self._last[i] if i in active else 0 for i in range(rows)]
            positions = [self._positions[i] if i in active else idle for i in range(rows)]
            try:
                with self.guard:
                    logits = self.decoder.decode(tokens, positions)
            except Exception as exc:
                log.exception("decode step failed")
                self._advances.clear()  # every row with a token to follow has failed
                for slot in active:
                    self._fail(slot, self._slots[slot], exc)
                continue
            if self.on_step:
                self.on_step(len(active))
            # the guides follow the last step's tokens while the GPU computes this one (their masks apply to it)
            for guide, token in self._advances:
                guide.advance(token)
            self._advances.clear()
            guides = {slot: self._slots[slot].guide for slot in active if self._slots[slot].guide is not None}
            if guides:  # rows inside a tool call keep only the tokens that keep it valid
                mask_rows(logits, guides)
            greedy = logits.argmax(dim=-1).tolist()  # one device sync for the whole batch
            for slot in active:
                request = self._slots[slot]
                self._positions[slot] += 1
                self._emit(slot, self._pick(request, logits[slot], greedy[slot]))
