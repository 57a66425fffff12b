"""The refresh recipe: one department's LoRA adapter trained on its approved samples.

Runs as its own process (`python -m finetune.recipe --config run.json`): the app keeps the
database; this process gets its samples as a JSONL file and reports progress as JSON lines
in a file the app reads. Reads top to bottom; the order of setup matters where noted.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

log = logging.getLogger("hangjia.recipe")


@dataclass(kw_only=True)
class Hyperparameters:
    """How to train: the seed's defaults. The app's settings and the recipe share these."""

    load_in_4bit: bool = True  # QLoRA where CUDA + bitsandbytes exist; else plain LoRA (logged)
    # None: by the base model's size (lora_defaults_for), resolved once the model is loaded
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    epochs: int = 2
    learning_rate: float | None = None
    gradient_accumulation: int = 8
    warmup_ratio: float = 0.05
    max_seq_len: int = 2048
    # The shared prefix (system prompt + tool schemas) run without gradient and without dropout:
    # about 2x faster on CPU; LoRA then learns from the question and answer tokens only (the
    # prefix's keys and values are computed with the current weights, as served, but not
    # trained through).
    detach_shared_prefix: bool = True
    cpu_bf16: bool = True  # bf16 autocast on CPUs with native bf16 (AVX512-BF16, AMX); weights stay fp32
    # QLoRA on CUDA: every decoder layer compiled (torch.compile), its 4-bit weights dequantized
    # by generated kernels, checkpointed around it; LoRA's products in bf16 (README, Performance).
    # Compiling takes about 50 s (Qwen3-14B, H200) and saves 64-223 us per token against the eager
    # recipe: it pays from a few hundred thousand tokens, so shorter runs stay eager.
    compile_layers: bool = True
    compile_min_tokens: int = 500_000  # tokens one process trains (epochs x its samples' tokens)
    # With compiled layers on a GPU with fp8 tensor cores (compute capability 8.9+): backward's
    # 4-bit products (the checkpoint's recompute, the input gradients) in fp8, the forward and
    # so the loss in bf16. +18% at 14B (2.3-2.5x the stock recipe), losses within 0.001 of bf16's
    # (README, Performance).
    fp8_backward: bool = True
    eval_max_new_tokens: int = 96
    guided_tool_calls: bool = True  # evaluation decodes tool calls as serving does (serving/guided.py)
    # Replay samples (marked "replay": true) trained on the model's own answer to their prompt,
    # as it stands before training, instead of the answer written in the replay file: replay
    # then holds the answers where they are instead of pulling them toward the file's style.
    # Kept from the file: an answer that calls a tool. One still going at replay_answer_tokens
    # is learned that far, without an end. Short on purpose: a sample's loss is the mean over
    # its learned tokens, so the first one (call a tool or answer) weighs 1/length; at 96 tokens
    # the "answer, do not call" of the replay was too faint against the corrections' calls
    # (5 stray calls of 26 on one night, none at 32).
    replay_own_answers: bool = True
    replay_answer_tokens: int = 32
    thinking: bool = False  # as the server renders prompts (--thinking): Qwen3's empty think block or not
    seed: int = 0


# Models below this size get the small-model LoRA shape and learning rate (lora_defaults_for).
SMALL_MODEL_PARAMETERS = 1_000_000_000
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_defaults_for(parameters: int) -> dict[str, Any]:
    """The LoRA shape and peak learning rate for a base model of this many parameters.

    From 1B: the QLoRA paper's recipe (r=64, alpha=16, lr 2e-4; here on q/k/v), the stock
    recipe issue #9 measures against. Below 1B (the embedded 135M model): r=16, alpha=32 on
    every linear layer at lr 1e-3. With the large-model recipe one night of corrections taught
    the 135M model nothing (final loss 1.24, malformed calls); with this one it reached 95%
    held-out exact match (README, Does it learn?).
    """
    if parameters < SMALL_MODEL_PARAMETERS:
        return {"lora_r": 16, "lora_alpha": 32, "target_modules": list(ALL_LINEAR), "learning_rate": 1e-3}
    return {"lora_r": 64, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"], "learning_rate": 2e-4}


def with_lora_defaults(cfg: Hyperparameters, parameters: int) -> Hyperparameters:
    """``cfg`` with every LoRA setting left unset (None) taken from ``lora_defaults_for``."""
    defaults = lora_defaults_for(parameters)
    return replace(cfg, **{name: value for name, value in defaults.items() if getattr(cfg, name) is None})


@dataclass(kw_only=True)
class RecipeConfig(Hyperparameters):
    base_model: str  # a local model folder or hub id (the same base the app serves)
    dataset: str  # JSONL of {"messages": [...], "tools": [...]}
    output_dir: str  # where the adapter appears, complete, at the end
    progress_file: str  # JSON lines: {"event": "step", "step", "total_steps", "loss", "lr", "eta_s"}
    init_adapter: str | None = None  # continue from the active adapter, or None for fresh
    eval_cases: str | None = None  # JSONL of EvalCase; answered by candidate and active after training
    active_adapter: str | None = None  # the adapter serving now (None: the base model)


def recipe_command(config: Path, gpus: int = 1) -> list[str]:
    """The training process: the recipe itself, or under torch's own launcher (what
    `accelerate launch` runs too) with one process per GPU."""
    recipe = ["-m", "finetune.recipe", "--config", str(config)]
    if gpus <= 1:
        return [sys.executable, *recipe]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", *recipe]


def report(cfg: RecipeConfig, event: str, **fields: Any) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # data parallel: the first process speaks for all
        return
    line = json.dumps({"event": event, "time": time.time(), **fields})
    with open(cfg.progress_file, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    print(line, flush=True)


class UnrenderableSample(ValueError):
    """A sample whose assistant turns cannot be told apart from their context."""


def learned_turns(tokenizer, messages: list[dict], tools: list[dict] | None,
                  thinking: bool = False) -> list[tuple[str, str]]:
    """(context, target) for each assistant turn: the context exactly as the server renders it
    when it generates that turn (chat_format.render_chat with the generation prompt), the target
    that turn's text with its end-of-turn marker. Qwen3's template writes an empty think block
    before the latest assistant turn only, so a turn's context is not a prefix of the whole
    conversation's text; rendered this way it is what the model saw when it answered."""
    from serving.chat_format import render_chat

    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = render_chat(tokenizer, messages[:i], tools, add_generation_prompt=True, thinking=thinking)
        whole = render_chat(tokenizer, messages[: i + 1], tools, add_generation_prompt=False, thinking=thinking)
        if not whole.startswith(context):
            raise UnrenderableSample(f"assistant turn {i} does not follow the prompt the template gives for it")
        turns.append((context, whole[len(context):]))
    return turns


def tokenize_sample(tokenizer, sample: dict, max_seq_len: int, thinking: bool = False) -> list[dict[str, list[int]]]:
    """The sample as training examples: token ids and labels (-100: context, not learned).
    Each assistant turn is learned after exactly the tokens the server gives the model before
    it; turns whose contexts extend each other token for token share one example (any ChatML
    template, and Qwen3's within earlier exchanges), others start their own (Qwen3's tool round
    trips: the call is learned after the empty think block, the answer after the call without
    it). A sample marked "unfinished" (an own replay answer cut at its token budget) learns its
    last answer without the end-of-turn marker. Examples longer than max_seq_len are left out."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    examples: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    turns = learned_turns(tokenizer, sample["messages"], sample.get("tools"), thinking)
    if turns and sample.get("unfinished"):  # the last answer was cut: learn its text, not an end
        context, target = turns[-1]
        content = sample["messages"][-1].get("content") or ""
        if content and content in target:
            turns[-1] = (context, target[:target.index(content) + len(content)])
    for context, target in turns:
        context_ids = encode(context)
        if ids and context_ids[:len(ids)] != ids:  # this turn's context is not the example so far
            examples.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        labels += [-100] * (len(context_ids) - len(ids))
        ids = context_ids
        target_ids = encode(target)
        ids, labels = ids + target_ids, labels + target_ids
    if ids:
        examples.append({"input_ids": ids, "labels": labels})
    return [e for e in examples if len(e["input_ids"]) <= max_seq_len]


# A shared prefix shorter than this is not worth the second forward pass.
MIN_SHARED_PREFIX = 32


def shared_prefix_length(examples: list[dict[str, list[int]]]) -> int:
    """How many leading tokens every example of a micro-batch has in common and does not
    learn. A department's samples share the system prompt and the tool schemas (often
    1,000+ tokens against 50 of question and answer), so that prefix is run once per
    micro-batch instead of once per sample. The last shared token must not predict a
    learned token: its logit would be lost."""
    if len(examples) < 2:
        return 0
    first, length = examples[0]["input_ids"], len(examples[0]["input_ids"])
    for example in examples[1:]:
        ids = example["input_ids"]
        limit = min(length, len(ids))
        same = 0
        while same < limit and ids[same] == first[same]:
            same += 1
        length = same
    for example in examples:
        length = min(length, _first_learned(example) - 1)
    # every example must keep at least one token after the prefix to predict from
    length = min([length] + [len(e["input_ids"]) - 1 for e in examples])
    return length if length >= MIN_SHARED_PREFIX else 0


def _first_learned(example: dict[str, list[int]]) -> int:
    return next(i for i, label in enumerate(example["labels"]) if label != -100)


def prefix_group(examples: list[dict[str, list[int]]]) -> list[int]:
    """The examples of a micro-batch to run on one shared prefix: the group that saves most
    tokens ((members - 1) x the length they share). A sample served with document passages
    differs from the others right after the system prompt, before the tool schemas; run
    together, one such sample cut every sample's shared prefix down to the system prompt."""
    ids = [example["input_ids"] for example in examples]
    best: list[int] = []
    best_saved = 0
    for pivot in ids:
        shared = [len(os.path.commonprefix([pivot, other])) for other in ids]
        for length in set(shared):
            members = [j for j, common in enumerate(shared) if common >= length]
            if (len(members) - 1) * length > best_saved:
                best, best_saved = members, (len(members) - 1) * length
    return best


def backward_micro_batch(model, examples: list[dict[str, list[int]]], device, max_tokens: int = 4096,
                         detach_prefix: bool = False, rows: bool = False) -> float:
    """Accumulates the gradient of the micro-batch's loss (the mean over its samples of each
    sample's mean loss on learned tokens) and returns that loss; not finite if a part was not.
    The samples that share a prefix: the prefix once, then their suffixes in the rows
    suffix_rows lays out (side by side, each row padded to the longest), each attending to the
    prefix's keys and values and to itself; gradients flow back through both, or only through
    the suffixes with `detach_prefix`. The others: packed
    side by side, up to max_tokens per forward; with `detach_prefix`, one with a long prompt
    runs that prompt without gradient too (a sample served with passages: ~1,100 prompt
    tokens before its ~60 learned ones). With `rows`, the others go one per row, padded
    (training.rows_loss): SDPA's flash kernel instead of a block-diagonal mask, as on CUDA."""
    import torch

    from finetune.training import group_as_rows, group_by_tokens, layers_checkpointed, pack, packed_loss, rows_loss

    # A checkpointed model keeps no cache, so the shared prefix needs one without.
    checkpointed = layers_checkpointed(model)
    sharing = [] if checkpointed or len(examples) < 2 else prefix_group(examples)
    prefix = shared_prefix_length([examples[i] for i in sharing])
    if not prefix:
        sharing = []
    others = [example for i, example in enumerate(examples) if i not in sharing]
    alone: list[dict[str, list[int]]] = []
    if detach_prefix and not checkpointed:  # a long prompt of its own (with passages): without gradient too
        alone = [e for e in others if _first_learned(e) - 1 >= MIN_SHARED_PREFIX]
        others = [e for e in others if _first_learned(e) - 1 < MIN_SHARED_PREFIX]

    def losses():  # each part's share of the micro-batch's loss, computed when its turn comes (memory)
        for example in alone:
            yield _suffixes_loss(model, [example], _first_learned(example) - 1, device, True) / len(examples)
        if rows:
            for group in group_as_rows(others, max_tokens):
                yield rows_loss(model, group, device) / len(examples)
        else:
            for group in group_by_tokens(others, max_tokens):
                yield packed_loss(model, pack(group), device) / len(examples)
        if sharing:
            shared = _suffixes_loss(model, [examples[i] for i in sharing], prefix, device, detach_prefix)
            yield shared * (len(sharing) / len(examples))

    # the loss is read once, at the end: reading it after each forward would make the host wait
    # for the GPU there, and the GPU then wait for the host to queue the backward
    total = torch.zeros((), device=device)
    for loss in losses():
        loss.backward()
        total += loss.detach()
    return total.item()  # NaN or inf when a part was not finite: the caller stops the run


def suffix_rows(lengths: list[int], prefix: int, key_cost: int) -> list[list[int]]:
    """The suffixes (by their lengths) laid out in rows over one shared prefix: the layout
    that costs least, each query attending to the prefix and to every key of its row (the
    block-diagonal mask is computed, not skipped) and each row padded to the longest. One
    row wastes attention on the other samples' keys (~45% of a CPU step at 1,100 prefix
    tokens); one sample a row wastes it on padding. `key_cost`: a token's linear layers
    as many keys' attention (training's key_cost). Returns each row's sample indices."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, best_cost = [order], math.inf
    for count in range(1, len(lengths) + 1):
        rows: list[list[int]] = [[] for _ in range(count)]
        filled = [0] * count
        for i in order:  # longest first, each into the row filled least
            row = filled.index(min(filled))
            rows[row].append(i)
            filled[row] += lengths[i]
        width = max(filled)
        cost = count * width * (prefix + width + key_cost)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def _suffixes_loss(model, examples: list[dict[str, list[int]]], prefix: int, device, detach_prefix: bool):
    """The mean over `examples` of each one's mean loss, their first `prefix` tokens run once.
    A prefix without gradient runs without dropout too: nothing learns from it there, and
    the answers are served from keys and values computed without."""
    import torch
    import torch.nn.functional as F

    from finetune.training import key_cost, queued_tensor, token_ids
    from serving.decoding import decoder_and_head

    # the prefix's keys and values only: the decoder stack without the vocabulary projection,
    # whose logits for every prompt token nobody reads (~10% of the embedded model's prompt forward)
    decoder, _ = decoder_and_head(model)
    quiet = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training] if detach_prefix else []
    try:
        for module in quiet:
            module.train(False)
        with torch.set_grad_enabled(not detach_prefix):
            head = decoder(input_ids=token_ids(model, [examples[0]["input_ids"][:prefix]], device), use_cache=True)
    finally:
        for module in quiet:
            module.train(True)
    tails = [example["input_ids"][prefix:] for example in examples]
    rows = suffix_rows([len(tail) for tail in tails], prefix, key_cost(model.config))
    filled = [sum(len(tails[i]) for i in row) for row in rows]
    width = max(filled)
    # Each row: its suffixes side by side, then padding; each token sees the prefix and its own
    # suffix. Padding sees the prefix only (a query that sees nothing gives NaN) and predicts nothing.
    ids, positions, segments, targets = [], [], [], []
    for row, used in zip(rows, filled):
        pad = width - used
        ids.append([token for i in row for token in tails[i]] + [0] * pad)
        positions.append([prefix + j for i in row for j in range(len(tails[i]))] + [prefix] * pad)
        segments.append([i for i in row for _ in tails[i]] + [-1] * pad)
        # position prefix + j predicts token prefix + j + 1; a suffix's last token predicts nothing
        targets.append([label for i in row for label in examples[i]["labels"][prefix + 1:] + [-100]] + [-100] * pad)
    if len(rows) > 1:
        head.cache.batch_repeat_interleave(len(rows))
    segment = torch.tensor(segments, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    own = (segment[:, :, None] == segment[:, None, :]) & causal & (segment[:, None, :] >= 0)
    visible = torch.cat([torch.ones(len(rows), width, prefix, dtype=torch.bool, device=device), own], dim=2)
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":  # eager attention adds its mask
        dtype = head.cache.layers[0].keys.dtype
        visible = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    logits = model(input_ids=token_ids(model, ids, device), attention_mask=visible[:, None],
                   position_ids=torch.tensor(positions, device=device), cache=head.cache).logits
    targets = queued_tensor(targets, device).reshape(-1)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100,
                                reduction="none")
    owner = segment.reshape(-1).clamp(min=0)  # padding's loss is 0 (ignored), counted nowhere
    learned = torch.zeros(len(tails), device=device).index_add_(0, owner, (targets != -100).float())
    sums = torch.zeros(len(tails), device=device).index_add_(0, owner, per_token)
    return (sums / learned).mean()


def average_across_processes(trainable: list, loss: float, weight: float, device) -> float:
    """Data parallel: each process's gradient is of the mean loss over its share of the step's
    samples; weighted by its share and summed over processes, it is the gradient of the mean
    over all of them, as on one GPU. One all-reduce of all LoRA gradients and the loss together.
    Returns the step's loss."""
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=device)]) * weight
    torch.distributed.all_reduce(flat)
    offset = 0
    for param, grad in zip(trainable, grads):
        param.grad = flat[offset:offset + grad.numel()].view_as(param).to(param.dtype)
        offset += grad.numel()
    return float(flat[-1])


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively; elsewhere bf16 autocast is slower than fp32."""
    import torch

    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def compiles_layers(cfg: Hyperparameters, quantized: bool, examples: list[dict[str, list[int]]], world: int) -> bool:
    """Whether this run compiles its decoder layers: QLoRA on CUDA, with enough tokens per
    process for the compile time to pay."""
    tokens = cfg.epochs * sum(len(e["input_ids"]) for e in examples) // max(world, 1)
    return quantized and cfg.compile_layers and tokens >= cfg.compile_min_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = RecipeConfig(**json.loads(args.config.read_text()))

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1. Seeds first, so that data order and LoRA initialisation repeat run to run.
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    report(cfg, "start", config=asdict(cfg), pid=os.getpid())

    # 2. Tokenizer and data before the model: a bad dataset fails in seconds, not after
    #    minutes of loading weights.
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    samples = [json.loads(line) for line in Path(cfg.dataset).read_text(encoding="utf-8").splitlines() if line.strip()]

    def trainable(samples, announce: bool = True) -> tuple[list[dict], int]:
        """The samples' examples that fit and have a labelled token, and how many samples gave
        none. A sample that cannot be tokenized is left out with its reason in the run's log
        (announce); it never ends the run."""
        examples, skipped = [], 0
        for number, sample in enumerate(samples):
            try:
                made = tokenize_sample(tokenizer, sample, cfg.max_seq_len, cfg.thinking)
                reason = f"longer than max_seq_len={cfg.max_seq_len} tokens, or no assistant turn"
            except Exception as exc:  # a template error, a malformed message: this sample only
                made, reason = [], f"{type(exc).__name__}: {exc}"[:300]
            made = [e for e in made if any(t != -100 for t in e["labels"])]
            if not made:
                skipped += 1
                if announce:
                    report(cfg, "sample_skipped", sample=number, reason=reason)
            examples.extend(made)
        return examples, skipped

    examples, skipped = trainable(samples)
    if not examples:
        report(cfg, "failed", error="no trainable samples (all too long, unrenderable or without an assistant turn)")
        return 2

    # 3. The base model: 4-bit NF4 (QLoRA) where CUDA and bitsandbytes allow, else plain LoRA.
    #    Under `accelerate launch` or torchrun (WORLD_SIZE > 1): one process per GPU, data parallel.
    cuda = torch.cuda.is_available()
    world, rank, gpu = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
    if world > 1:  # (gloo on CPU: slower than one process, but how the tests check the arithmetic)
        if cuda:
            torch.cuda.set_device(gpu)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    quantized = cfg.load_in_4bit and cuda
    if quantized:
        from serving.quantization import nf4_config

        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, device_map={"": gpu},
                                                     quantization_config=nf4_config(), dtype=torch.bfloat16)
        mode = "QLoRA: 4-bit NF4 base on CUDA"
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.bfloat16 if cuda else torch.float32)
        model.to(f"cuda:{gpu}" if cuda else "cpu")
        mode = f"plain LoRA on a {'bf16' if cuda else 'fp32'} base ({'CUDA' if cuda else 'CPU: no 4-bit training here'})"
    # 4-bit weights count half (two values a byte): the size is the model's, not its storage's
    parameters = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    cfg = with_lora_defaults(cfg, parameters)
    cpu_bf16 = not cuda and cfg.cpu_bf16 and cpu_has_bf16()
    compiled = compiles_layers(cfg, quantized, examples, world)
    # bf16 products for LoRA too (its weights stay fp32), as the stock Trainer's bf16=True does
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cpu_bf16 or compiled)
    if cpu_bf16:
        mode += ", bf16 autocast (the CPU has native bf16)"
    if compiled:
        mode += ", decoder layers compiled, bf16 autocast"
    from finetune.training import has_fp8_tensor_cores

    fp8_backward = compiled and cfg.fp8_backward and has_fp8_tensor_cores(gpu)
    if fp8_backward:
        mode += ", fp8 in backward"
    if cuda:
        from finetune.training import prepare_for_lora_training

        # frozen base as loaded (no fp32 upcast of embeddings/norms), layers checkpointed
        prepare_for_lora_training(model, checkpointing=True)
    if world > 1:
        mode += f", data parallel over {world} {'GPUs' if cuda else 'processes'}"

    # 4. The adapter: continue the active one, or start fresh with the configured LoRA shape.
    #    Base weights stay frozen either way; only LoRA matrices train.
    if cfg.init_adapter:
        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
    # the shape trained (the active adapter's, or set, or by model size), where the admin reads the run
    lora = model.peft_config["default"]
    lora_shape = {"r": lora.r, "alpha": lora.lora_alpha, "target_modules": sorted(lora.target_modules),
                  "learning_rate": cfg.learning_rate}
    mode += (f"; LoRA r={lora.r} alpha={lora.lora_alpha} on {','.join(lora_shape['target_modules'])}, "
             f"lr {cfg.learning_rate:g}")
    log.info("training mode: %s", mode)
    report(cfg, "mode", mode=mode, samples=len(examples), skipped=skipped, parameters=parameters, lora=lora_shape)
    if cfg.replay_own_answers and any(s.get("replay") for s in samples):
        samples = with_own_replay_answers(cfg, model, tokenizer, samples, rank, world)
        examples, _ = trainable(samples, announce=False)
    model.train()
    device = next(p for p in model.parameters() if p.requires_grad).device
    if cuda:
        from finetune.training import keep_embedding_on_host

        # the frozen input embedding in host memory: 1.45 GiB less on the GPU at 14B, at no
        # measured cost (bench/gpu_train.py, variant "lean"); back on the GPU for evaluation
        keep_embedding_on_host(model, device)
    if compiled:
        from finetune.training import compile_decoder_layers

        # the step's many small kernels fused, and no Python call per 4-bit product
        # (bench/gpu_train.py, variant "lean-compiled-outside-nf4"); compiled at the first steps.
        # The frozen down projection runs outside the recomputed part: +10% at 14B (README,
        # Performance). fp8 in backward: each 4-bit product one operator that decodes in a kernel
        # of its own and multiplies in fp8 when recomputed, the down projection after the
        # checkpoint too, its weights' constants computed once.
        compile_decoder_layers(model, nf4="kernel" if fp8_backward else "torch",
                               down_outside=True, fp8_recompute=fp8_backward, fp8_input_gradients=fp8_backward)

    # 5. Optimizer and schedule over optimizer steps (not micro-batches).
    trainable = [p for p in model.parameters() if p.requires_grad]
    if world > 1:  # every process starts from the first one's LoRA weights
        for param in trainable:
            torch.distributed.broadcast(param.data, src=0)
    if quantized:  # 8-bit optimizer states (bitsandbytes is there): 0.35 GiB less at r=64 on 14B
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    # tokens per forward: more is faster, but on a GPU each forward's activations count toward
    # the peak. 4,096 (two 2,048-token samples, one per row) keeps 14B at 11.84 GiB reserved, and
    # gives the host time to queue ahead: with one sample per forward it fell behind the GPU
    # (bench/gpu_train.py, variants ...-rows and ...-rows2)
    tokens_per_forward = max(cfg.max_seq_len, 4096)
    total_steps = cfg.epochs * math.ceil(len(examples) / cfg.gradient_accumulation)
    warmup = max(1, int(total_steps * cfg.warmup_ratio))

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.learning_rate * (step + 1) / warmup
        return cfg.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    # 6. The loop: micro-batches of `gradient_accumulation` samples, one optimizer step each;
    #    loss only on assistant tokens, each sample weighted alike.
    started = time.monotonic()
    step = 0
    losses = []
    order = list(range(len(examples)))
    for epoch in range(cfg.epochs):
        random.shuffle(order)
        for first in range(0, len(order), cfg.gradient_accumulation):
            batch = [examples[i] for i in order[first:first + cfg.gradient_accumulation]]
            share = batch[rank::world]  # this process's samples of the step (all of them on one GPU)
            loss = 0.0
            if share:
                with autocast:
                    loss = backward_micro_batch(model, share, device, max_tokens=tokens_per_forward,
                                                detach_prefix=cfg.detach_shared_prefix, rows=cuda)
            if world > 1:
                loss = average_across_processes(trainable, loss, len(share) / len(batch), device)
            if not math.isfinite(loss):
                report(cfg, "failed", error=f"loss became {loss} at step {step}")
                return 3
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            elapsed = time.monotonic() - started
            report(cfg, "step", step=step, total_steps=total_steps, epoch=epoch + 1, loss=round(losses[-1], 5),
                   lr=lr_at(step - 1), elapsed_s=round(elapsed, 2),
                   eta_s=round(elapsed / step * (total_steps - step), 1))

    if world > 1:  # the first process saves and evaluates on its own
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0

    trained_s, trained_tokens = time.monotonic() - started, cfg.epochs * sum(len(e["input_ids"]) for e in examples)

    # 7. Save next to the target and rename: the adapter appears complete or not at all.
    target = Path(cfg.output_dir)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    (partial / "hangjia-run.json").write_text(json.dumps({"losses": losses, "mode": mode, "steps": step,
                                                          "samples": len(examples)}))
    os.replace(partial, target)

    # 8. Evaluation on held-out cases, here where the base is already loaded: the candidate
    #    and the adapter serving now answer the same prompts, greedily.
    if cfg.eval_cases:
        if cuda:
            from finetune.training import restore_embedding, uncompile_decoder_layers

            del optimizer
            restore_embedding(model, device)
            uncompile_decoder_layers(model)
        evaluate(cfg, model, tokenizer)
    report(cfg, "done", steps=step, final_loss=losses[-1], seconds=round(time.monotonic() - started, 2),
           train_seconds=round(trained_s, 2), trained_tokens=trained_tokens,
           output_dir=str(target),
           peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None)
    return 0


def greedy_engine(model, prompts: list[list[int]], new_tokens: int, requests: int):
    """A batching engine over a paged-cache decoder sized for `requests` answers of up to
    `new_tokens` after the longest of `prompts`. All answers share
    one batch where memory allows: on CPU a step costs about the weights' read, so 16 rows take
    ~1.3x the time of 8; the 14B KV cache of 16 rows would crowd a 24 GB GPU."""
    from serving.decoding import BatchingEngine, StaticDecoder

    rows = 8 if next(model.parameters()).is_cuda else 16
    decoder = StaticDecoder(model, max_batch=min(rows, requests), max_len=max(len(p) for p in prompts) + new_tokens + 2)
    return BatchingEngine(decoder)


def served_answers(engine, tokenizer, requests: Sequence[Callable[[frozenset[int]], Any]],
                   tools: Sequence[Sequence[dict] | None], done: Callable[[int], None] | None = None,
                   unasked: Sequence[Collection[str]] | None = None,
                   spelled: Sequence[Callable[[], Any] | None] | None = None) -> list[tuple[list[int], str, bool]]:
    """The greedy answer to each request as the app serves it (webapp/turn.py): one that copies
    its offered tools' definitions back is stopped as soon as that is certain, and one that is
    nothing but a call of a tool in `unasked[i]` (nothing the user said asks for it) is read
    when it ends; both are decoded again without their first token while
    serving.degeneration.decode_again allows, and the decodings again join the batch still
    running. An answer with no call (after its thinking) and no loop, where `spelled[i]` builds
    one (the question spells a whole call of one tool), is decoded again from that request, whose
    prompt opens the call; its tokens are returned after the opening's, or the prose where that
    gave no valid call. `requests[i](not_first)` builds request i.
    Returns (tokens, finish reason, whether it still copies) per request, in order;
    `done(count)` as each answer is final."""
    from finetune.evaluate import calls_in, calls_unasked
    from serving.chat_format import split_thinking
    from serving.degeneration import DegenerationWatch, copies_tools, decode_again, tool_copies
    from serving.guided import CALL_OPENING

    copies = [tool_copies(offered or ()) for offered in tools]
    opening = tokenizer(CALL_OPENING, add_special_tokens=False)["input_ids"]
    # (request index, attempt, banned first tokens, whether its prompt opened a call, the answer in
    # prose it replaces (tokens, finish reason), the request)
    waiting = collections.deque((i, 0, frozenset(), False, None, engine.submit(make(frozenset())))
                                for i, make in enumerate(requests))
    out: list[tuple[list[int], str, bool] | None] = [None] * len(requests)
    final = 0
    while waiting:
        i, attempt, banned, opened, prose, request = waiting.popleft()
        tokens, copying, ended = [], None, False
        while not ended:
            for item in request.drain(timeout=3600):
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    ended = True
                else:
                    tokens.append(item)
            if copying is None and not opened:
                copying = copies_tools(tokenizer.decode(tokens, skip_special_tokens=True), copies[i])
                if copying:  # certain: the rest of it is not worth decoding
                    request.cancelled.set()
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        made_up = not copying and not opened and unasked is not None and calls_unasked(text, unasked[i])
        if (copying or made_up) and decode_again(text, tokens[0], banned, attempt):
            banned = banned | {tokens[0]}
            waiting.append((i, attempt + 1, banned, False, None, engine.submit(requests[i](banned))))
            continue
        if not copying and not opened and spelled is not None and spelled[i] is not None and not any(
                calls_in(split_thinking(text)[1])) and not DegenerationWatch().degenerate(text):
            waiting.append((i, attempt + 1, banned, True, (tokens, request.finish_reason),
                            engine.submit(spelled[i]())))
            continue
        if opened and (not (called := calls_in(text))[0] or called[1]):  # no valid call: the prose stands
            tokens, finish = prose
        else:
            tokens, finish = ([*opening, *tokens] if opened else tokens), request.finish_reason
        out[i] = (tokens, finish, bool(copying))
        final += 1
        if done is not None:
            done(final)
    return out


def with_own_replay_answers(cfg: RecipeConfig, model, tokenizer, samples: list[dict], rank: int = 0,
                            world: int = 1) -> list[dict]:
    """`samples` with each replay sample's last answer replaced by the model's own greedy answer
    to the same prompt (the adapter as it starts: the active one, or none). Replay written by
    hand pulls the answers toward its own, shorter style (the gate's keyword recall fell from
    0.67 to 0.36 on one night's refresh); the model's own answers keep them where they were.
    An answer still going at replay_answer_tokens is kept as far as it went, marked
    "unfinished" (learned without an end): the file's answer in its place pulled the policy
    answers away from the passages' figures (general recall 0.58 -> 0.33 on one night).
    An answer that calls a tool, or copies the tools back as the app would still serve it
    (served_answers), keeps the file's.
    Data parallel (`world` processes): each decodes every world-th prompt, and all of them get
    all the answers."""
    import torch

    from serving.chat_format import render_chat
    from serving.decoding import DecodeRequest, stop_token_ids

    replay = {}  # distinct prompt -> the samples that ask it (the replay file is cycled)
    for number, sample in enumerate(samples):
        if sample.get("replay") and sample["messages"][-1].get("role") == "assistant":
            prompt = render_chat(tokenizer, sample["messages"][:-1], sample.get("tools"), add_generation_prompt=True,
                                 thinking=cfg.thinking)
            replay.setdefault(prompt, []).append(number)
    prompts = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in replay]
    offered = [samples[numbers[0]].get("tools") for numbers in replay.values()]  # the same prompt, the same tools
    mine = list(range(rank, len(prompts), world))
    # prompt index -> (the own answer, whether it was cut at the token budget), or None (the file's stays)
    answers: dict[int, tuple[str, bool] | None] = {}
    was_training = model.training
    model.eval()
    try:
        if mine:
            engine = greedy_engine(model, [prompts[i] for i in mine], cfg.replay_answer_tokens, len(mine))
            stop = stop_token_ids(tokenizer, model)

            def request(index: int, not_first: frozenset[int]) -> DecodeRequest:
                return DecodeRequest(prompts[index], cfg.replay_answer_tokens, adapter="default", stop_ids=stop,
                                     not_first=not_first)

            try:
                own = served_answers(engine, tokenizer, [functools.partial(request, i) for i in mine],
                                     [offered[i] for i in mine],
                                     lambda done: report(cfg, "replay_answers", prompt=done, prompts=len(mine)))
                for index, (tokens, finish, copies) in zip(mine, own):
                    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    keep = answer and "<tool_call>" not in answer and not copies
                    answers[index] = (answer, finish != "stop") if keep else None
            finally:
                engine.close()
    finally:
        model.train(was_training)
    if world > 1:
        shares: list[dict | None] = [None] * world
        torch.distributed.all_gather_object(shares, answers)
        answers = {index: answer for share in shares for index, answer in share.items()}
    out = list(samples)
    for index, numbers in enumerate(replay.values()):
        if answers.get(index) is not None:
            answer, cut = answers[index]
            for number in numbers:
                out[number] = {**samples[number], "unfinished": cut,
                               "messages": [*samples[number]["messages"][:-1], {"role": "assistant", "content": answer}]}
    kept = sum(answer is not None for answer in answers.values())
    cut = sum(answer is not None and answer[1] for answer in answers.values())
    log.info("replay: the model's own answers for %d of %d prompts (%d cut at %d tokens; the others kept the file's)",
             kept, len(prompts), cut, cfg.replay_answer_tokens)
    report(cfg, "replay_answers_done", own=kept, cut=cut, prompts=len(prompts))
    return out


def evaluate(cfg: RecipeConfig, model, tokenizer) -> None:
    """Candidate and active adapter answer every case greedily, all in one batch through the
    paged-cache decoder (each row with its own adapter): the cases share their decode steps."""
    from serving.chat_format import render_chat
    from serving.decoding import DecodeRequest, stop_token_ids
    from serving.guided import CALL_OPENING, GuideVocabulary, ToolCallGuide

    cases = [json.loads(line) for line in Path(cfg.eval_cases).read_text(encoding="utf-8").splitlines() if line.strip()]
    model.eval()
    if cfg.active_adapter:
        model.load_adapter(cfg.active_adapter, adapter_name="active")
    texts = [render_chat(tokenizer, case["messages"], case.get("tools"), add_generation_prompt=True,
                         thinking=cfg.thinking) for case in cases]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    # a case whose question spells a whole call of one tool: its prompt with that call opened
    spelled = [next((tool for tool in case.get("tools") or () if tool["function"]["name"] == case.get("spelled_tool")),
                    None) for case in cases]
    opened = [tokenizer(text + CALL_OPENING, add_special_tokens=False)["input_ids"] if tool else None
              for text, tool in zip(texts, spelled)]
    stop = stop_token_ids(tokenizer, model)
    engine = greedy_engine(model, prompts + [p for p in opened if p], cfg.eval_max_new_tokens, 2 * len(cases))
    guides = [ToolCallGuide.from_tools(case["tools"]) if cfg.guided_tool_calls and case.get("tools") else None
              for case in cases]
    one_tool = [ToolCallGuide.from_tools([tool]) if cfg.guided_tool_calls and tool else None for tool in spelled]
    try:  # as serving does: where the grammar cannot be built, calls are decoded unguided
        vocabulary = GuideVocabulary.for_model(tokenizer, model) if any(guides) else None
    except Exception as exc:
        print(f"tool calls evaluated unguided: {exc}", file=sys.stderr)
        guides = one_tool = [None] * len(cases)

    def request(number: int, who: str, not_first: frozenset[int] = frozenset(), call: bool = False) -> DecodeRequest:
        guide = one_tool[number].opened() if call and one_tool[number] else None if call else guides[number]
        return DecodeRequest(opened[number] if call else prompts[number], cfg.eval_max_new_tokens,
                             adapter="default" if who == "candidate" else ("active" if cfg.active_adapter else None),
                             stop_ids=stop, not_first=not_first, guide=guide.session(vocabulary) if guide else None)

    order = [(number, who) for number in range(len(cases)) for who in ("candidate", "active")]
    try:
        answers = served_answers(engine, tokenizer, [functools.partial(request, n, who) for n, who in order],
                                 [cases[n].get("tools") for n, _ in order],
                                 lambda done: report(cfg, "eval_progress", case=(done + 1) // 2, cases=len(cases)),
                                 [cases[n].get("unasked_tools") or () for n, _ in order],
                                 [functools.partial(request, n, who, call=True) if spelled[n] else None
                                  for n, who in order])
    finally:
        engine.close()
    outputs: dict[str, list[str]] = {"candidate": [], "active": []}
    for (_, who), (tokens, _, _) in zip(order, answers):  # a copy still there is scored as the app cuts it
        outputs[who].append(tokenizer.decode(tokens, skip_special_tokens=True))
    report(cfg, "eval", **outputs)


if __name__ == "__main__":
    sys.exit(main())
