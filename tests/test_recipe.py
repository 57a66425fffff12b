"""The refresh recipe on a tiny random Qwen3: it trains LoRA only, on assistant tokens only."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import recipe
from finetune.recipe import RecipeConfig, recipe_command, tokenize_sample
from finetune.samples import tool_call_message

SYSTEM = {"role": "system", "content": "You are hangjia."}


def samples():
    out = []
    for region, period in [("华东", "last_quarter"), ("华南", "2026-Q2"), ("华北", "last_month")]:
        out.append({"messages": [SYSTEM, {"role": "user", "content": f"{region} {period} 销售额？"},
                                 tool_call_message("query_sales", {"region": region, "period": period}, "c1")],
                    "tools": [{"type": "function", "function": {"name": "query_sales", "parameters": {"type": "object"}}}]})
    out.append({"messages": [SYSTEM, {"role": "user", "content": "What is EBITDA?"},
                             {"role": "assistant", "content": "Earnings before interest, taxes, depreciation and amortisation."}]})
    return out


def test_labels_cover_only_the_assistant_turns(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    [example] = tokenize_sample(tokenizer, samples()[3], 2048)
    learned = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert learned.strip() == "Earnings before interest, taxes, depreciation and amortisation.<|im_end|>"
    [tool] = tokenize_sample(tokenizer, samples()[0], 2048)
    learned = tokenizer.decode([t for t, label in zip(tool["input_ids"], tool["labels"]) if label != -100])
    assert learned.startswith("<tool_call>") and "华东" in learned and "销售额" not in learned
    assert tokenize_sample(tokenizer, samples()[0], 10) == []  # too long: left out, not cut


def run_recipe(tiny_model_dir, tmp_path, eval_cases: list[dict] | None = None, gpus: int = 1,
               replay: bool = False, **overrides) -> list[dict]:
    """The recipe as the app runs it: a subprocess with a config file (`gpus` processes, as
    --train-gpus starts them); its progress events. `replay`: the last sample is general replay."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    dataset = tmp_path / "train.jsonl"
    rows = samples()
    if replay:
        rows[-1]["replay"] = True
    dataset.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in rows))
    cases = None
    if eval_cases:
        cases = tmp_path / "eval.jsonl"
        cases.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in eval_cases))
    cfg = RecipeConfig(**{**dict(
        base_model=str(tiny_model_dir), dataset=str(dataset), output_dir=str(tmp_path / "v1"),
        progress_file=str(tmp_path / "progress.jsonl"), lora_r=4, lora_alpha=8, epochs=2, gradient_accumulation=2,
        target_modules=["q_proj", "k_proj", "v_proj"],
        learning_rate=1e-2, load_in_4bit=True, eval_max_new_tokens=8, eval_cases=str(cases) if cases else None),
        **overrides})
    config = tmp_path / "run.json"
    config.write_text(json.dumps(cfg.__dict__))
    done = subprocess.run(recipe_command(config, gpus), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_unset_lora_settings_follow_the_base_model_size_and_set_ones_win(tiny_model_dir, tmp_path):
    """The app's defaults leave LoRA's shape and learning rate unset: a small base (the embedded
    model) gets the wide, fast recipe that learns a night's corrections, a 14B base the QLoRA
    paper's. A setting the admin gave is kept, and the run says what it trained."""
    from finetune.recipe import ALL_LINEAR, lora_defaults_for

    assert lora_defaults_for(135_000_000) == {"lora_r": 16, "lora_alpha": 32, "target_modules": ALL_LINEAR,
                                              "learning_rate": 1e-3}
    assert lora_defaults_for(14_800_000_000) == {"lora_r": 64, "lora_alpha": 16,
                                                 "target_modules": ["q_proj", "k_proj", "v_proj"],
                                                 "learning_rate": 2e-4}
    events = run_recipe(tiny_model_dir, tmp_path, lora_r=4, lora_alpha=None, target_modules=None,
                        learning_rate=None, epochs=1)
    mode = next(e for e in events if e["event"] == "mode")
    assert mode["lora"] == {"r": 4, "alpha": 32, "target_modules": sorted(ALL_LINEAR), "learning_rate": 1e-3}
    assert "LoRA r=4 alpha=32 on down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj, lr 0.001" in mode["mode"]
    adapter = json.loads((tmp_path / "v1" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (4, 32, sorted(ALL_LINEAR))
    assert max(e["lr"] for e in events if e["event"] == "step") == pytest.approx(1e-3)


def run_mode(folder) -> str:
    """The training mode a recipe run in `folder` reported."""
    events = [json.loads(line) for line in (folder / "progress.jsonl").read_text().splitlines()]
    return next(e["mode"] for e in events if e["event"] == "mode")


@pytest.mark.slow
def test_recipe_trains_every_lora_weight_and_nothing_else(tiny_model_dir, tmp_path):
    events = run_recipe(tiny_model_dir, tmp_path)
    assert [e["event"] for e in events][:2] == ["start", "mode"] and events[-1]["event"] == "done"
    assert "plain LoRA" in events[1]["mode"] and "CPU" in events[1]["mode"]  # said plainly on CPU
    steps = [e for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["total_steps"] == 4 for s in steps)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns the four samples
    assert not (tmp_path / "v1.partial").exists()

    trained = load_file(str(tmp_path / "v1" / "adapter_model.safetensors"))
    assert trained and all("lora_" in key for key in trained)  # only LoRA weights are saved
    # the same seed gives the initial LoRA weights: every one of them moved
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    initial = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                              target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    init_lora = {k.replace(".default", ""): v for k, v in initial.state_dict().items() if "lora_" in k}
    assert set(init_lora) == set(trained)
    assert all(not torch.equal(init_lora[k], trained[k]) for k in trained)
    # and the base weights on disk are untouched by training
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(reloaded[k], before[k]) for k in before)


@pytest.mark.slow
def test_data_parallel_training_gives_the_adapter_of_one_process(tiny_model_dir, tmp_path):
    """--train-gpus 2: two processes each take half of every step's samples and average their
    LoRA gradients (gloo here on CPU; NCCL on GPUs). The losses and the adapter are those of
    one process training all samples (dropout off: its masks are random per process; the gradient
    through the prompt kept: which prompts a process shares depends on its samples)."""
    same = dict(lora_dropout=0.0, cpu_bf16=False, gradient_accumulation=4, detach_shared_prefix=False)
    one = run_recipe(tiny_model_dir, tmp_path / "one", **same)
    two = run_recipe(tiny_model_dir, tmp_path / "two", gpus=2, **same)
    assert "data parallel over 2" in two[1]["mode"] and "data parallel" not in one[1]["mode"]
    # only the first process reports: one event per step, as from one process
    losses = {name: [e["loss"] for e in events if e["event"] == "step"] for name, events in (("one", one), ("two", two))}
    assert len(losses["two"]) == len(losses["one"]) == 2
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-4)
    alone = load_file(str(tmp_path / "one" / "v1" / "adapter_model.safetensors"))
    parallel = load_file(str(tmp_path / "two" / "v1" / "adapter_model.safetensors"))
    assert set(alone) == set(parallel)
    # each process lays out only its own samples, so the vocabulary products run over other
    # shapes: rounding-level differences, which AdamW's division by sqrt(v) enlarges where a
    # gradient is near zero (one weight of 256 moved 7e-5 apart with the fused loss)
    for key in alone:
        torch.testing.assert_close(parallel[key], alone[key], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.gpu
def test_qlora_on_a_4bit_base_on_gpu(tiny_model_dir, tmp_path):
    """The production recipe: NF4 base on CUDA, LoRA trained on top (embedding kept on the
    host, 8-bit optimizer states), adapter written, then candidate and base evaluated."""
    cases = [{"messages": s["messages"][:2], "tools": s.get("tools")} for s in samples()[:2]]
    events = run_recipe(tiny_model_dir, tmp_path, eval_cases=cases, compile_min_tokens=0, replay=True)
    assert "QLoRA: 4-bit NF4" in events[1]["mode"] and "decoder layers compiled" in events[1]["mode"]
    assert ("fp8 in backward" in events[1]["mode"]) == (torch.cuda.get_device_capability() >= (8, 9))
    # the replay sample's own answer decoded on the 4-bit base before training
    assert next(e for e in events if e["event"] == "replay_answers_done")["prompts"] == 1
    evaluation = next(e for e in events if e["event"] == "eval")  # decoding after compiled training
    assert len(evaluation["candidate"]) == len(evaluation["active"]) == 2
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 4 and steps[-1]["loss"] < steps[0]["loss"]
    assert all("lora_" in key for key in load_file(str(tmp_path / "v1" / "adapter_model.safetensors")))
    # the compiled layers train as the eager ones do: the first step's loss (before any update)
    # agrees, and so does the trend
    eager = [e["loss"] for e in run_recipe(tiny_model_dir, tmp_path / "eager", compile_layers=False)
             if e["event"] == "step"]
    assert "decoder layers compiled" not in run_mode(tmp_path / "eager")
    assert eager[0] == pytest.approx(steps[0]["loss"], rel=2e-3)
    assert eager[-1] == pytest.approx(steps[-1]["loss"], rel=0.05)


def micro_batch_trainer(model_dir, batch, attention="sdpa"):
    """run(detach_prefix) -> (loss, gradients) of `batch` on a tiny model with a LoRA on q/k/v
    whose B is not zero (it starts at zero: A would get no gradient), without dropout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    model = get_peft_model(base, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def run(detach_prefix=False):
        for p in trainable.values():
            p.grad = None
        loss = recipe.backward_micro_batch(model, batch, "cpu", detach_prefix=detach_prefix)
        return loss, {n: p.grad.clone() for n, p in trainable.items()}

    return run


def test_a_shared_prefix_runs_once_and_gives_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    """Samples sharing the system prompt and tool schemas are trained with the prefix run
    once per micro-batch, and a sample that shares less (served without tools, or with
    document passages) beside them; that must be the same arithmetic as one sample at a time."""
    from transformers import AutoTokenizer

    from finetune import recipe

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = [tokenize_sample(tokenizer, s, 2048)[0] for s in samples()[:3]]
    prefix = recipe.shared_prefix_length(batch)
    assert prefix >= recipe.MIN_SHARED_PREFIX
    assert all(label == -100 for e in batch for label in e["labels"][:prefix + 1])
    batch.append(tokenize_sample(tokenizer, samples()[3], 2048)[0])
    grounded = {"messages": [{"role": "system", "content": "You are hangjia. " + "[1] Travel policy: meals up to "
                              "150 CNY a day in China and 60 USD abroad. " * 3},
                             {"role": "user", "content": "Meal allowance abroad?"},
                             {"role": "assistant", "content": "Up to 60 USD a day [1]."}]}
    batch.append(tokenize_sample(tokenizer, grounded, 2048)[0])  # a long prompt of its own, as with passages
    assert recipe.shared_prefix_length(batch) < prefix
    # the three with tools share the prefix; the other two run on their own
    assert recipe.prefix_group(batch) == [0, 1, 2]

    run = micro_batch_trainer(tiny_model_dir, batch)

    shared_loss, shared_grads = run()
    # Without gradient through the prefix: the same loss, and a gradient that keeps the
    # direction of the full one (the question and answer tokens' share of it) but misses the part
    # that flows back through the prefix's keys and values.
    detached_loss, detached_grads = run(detach_prefix=True)
    assert abs(detached_loss - shared_loss) < 1e-5 * abs(shared_loss)
    flat = torch.cat([g.flatten() for g in shared_grads.values()])
    flat_detached = torch.cat([g.flatten() for g in detached_grads.values()])
    assert 0.3 < torch.nn.functional.cosine_similarity(flat, flat_detached, dim=0) < 0.9999
    monkeypatch.setattr(recipe, "MIN_SHARED_PREFIX", 10**9)  # one sample at a time
    single_loss, single_grads = run()
    assert abs(shared_loss - single_loss) < 1e-5 * abs(single_loss)
    for name, grad in single_grads.items():
        assert torch.allclose(shared_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_suffixes_laid_out_in_rows_train_as_one_sample_at_a_time(tiny_model_dir, monkeypatch):
    """However the suffixes over one shared prefix are laid out (one row, or several padded
    rows each seeing the prefix), the loss and gradients are those of one sample at a time;
    and the prefix run without gradient runs without dropout too (nothing learns from it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import recipe

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = [tokenize_sample(tokenizer, s, 2048)[0] for s in samples()[:3]]
    prefix = recipe.shared_prefix_length(batch)
    assert prefix >= recipe.MIN_SHARED_PREFIX
    run = micro_batch_trainer(tiny_model_dir, batch)

    layouts = {"one row": [[0, 1, 2]], "two rows": [[2], [0, 1]], "a row each": [[1], [0], [2]]}
    results = {}
    for name, rows in layouts.items():
        monkeypatch.setattr(recipe, "suffix_rows", lambda lengths, prefix, cost, rows=rows: rows)
        results[name] = run(detach_prefix=True), run(detach_prefix=False)
    # eager attention takes the mask as additive floats
    monkeypatch.setattr(recipe, "suffix_rows", lambda lengths, prefix, cost: layouts["two rows"])
    results["two rows, eager attention"] = (micro_batch_trainer(tiny_model_dir, batch, "eager")(True),
                                            micro_batch_trainer(tiny_model_dir, batch, "eager")(False))
    monkeypatch.setattr(recipe, "MIN_SHARED_PREFIX", 10**9)  # one sample at a time, gradient everywhere
    single_loss, single_grads = run(detach_prefix=False)
    for name, ((detached_loss, detached_grads), (loss, grads)) in results.items():
        assert abs(loss - single_loss) < 1e-5 * abs(single_loss), name
        assert abs(detached_loss - single_loss) < 1e-5 * abs(single_loss), name
        for param, grad in single_grads.items():
            assert torch.allclose(grads[param], grad, rtol=1e-4, atol=1e-7), (name, param)
        for param, grad in results["one row"][0][1].items():
            assert torch.allclose(detached_grads[param], grad, rtol=1e-4, atol=1e-7), (name, param)

    # dropout: on for the suffixes that learn, off for the prefix that does not
    monkeypatch.undo()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.train()
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[-2], m.training)))
    recipe.backward_micro_batch(model, batch, "cpu", detach_prefix=True)
    assert seen and {training for length, training in seen if length == prefix} == {False}
    assert {training for length, training in seen if length != prefix} == {True}
    assert model.training


def test_suffix_rows_balance_long_and_short_suffixes_and_keep_every_sample_once():
    from finetune.recipe import suffix_rows

    lengths = [400, 30, 40, 390, 35, 380, 25, 45]
    rows = suffix_rows(lengths, prefix=1141, key_cost=5000)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    # three long answers and five short ones: not one row, where each query reads every other
    # sample's keys, and not a row each, where the short rows are mostly padding
    assert 1 < len(rows) < len(lengths)
    widths = [sum(lengths[i] for i in row) for row in rows]
    assert max(widths) - min(widths) <= max(lengths)
    # where a token's other work dwarfs attention, padding costs more than it saves: one row
    assert len(suffix_rows(lengths, prefix=1141, key_cost=10**9)) == 1
    assert suffix_rows([7], prefix=50, key_cost=5000) == [[0]]


def test_packed_samples_do_not_see_each_other_and_the_chunked_loss_is_the_plain_one(tiny_model_dir):
    """Packing several samples into one row must give each sample the loss it has alone
    (block-diagonal attention, positions restarting), and the chunked loss must equal
    transformers' own loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import training

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [e for s in samples() for e in tokenize_sample(tokenizer, s, 2048)]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    alone = [model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item()
             for e in examples]
    packed = training.pack(examples)
    assert packed.samples == 4 and len(packed.input_ids) == sum(len(e["input_ids"]) for e in examples)
    together = training.packed_loss(model, packed, "cpu", chunk_tokens=7).item()
    assert abs(together - sum(alone)) < 1e-4 * sum(alone)
    # attention across samples would change the later samples' losses: the check has teeth
    leaky = training.PackedBatch(packed.input_ids, list(range(len(packed.input_ids))), packed.labels,
                              packed.weights, packed.samples)
    assert abs(training.packed_loss(model, leaky, "cpu").item() - sum(alone)) > 1e-3

    budget = len(examples[0]["input_ids"]) + len(examples[1]["input_ids"])
    groups = training.group_by_tokens(examples, max_tokens=budget)
    assert len(groups[0]) == 2 and sum(groups, []) == examples
    assert all(sum(len(e["input_ids"]) for e in g) <= budget for g in groups)


def test_samples_in_padded_rows_train_as_samples_packed_in_one_row(tiny_model_dir):
    """The CUDA layout: one sample per row, padded on the right, no attention mask (SDPA's
    flash kernel). Padding must change no sample's loss or any gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import recipe, training

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [e for s in samples() for e in tokenize_sample(tokenizer, s, 2048)]
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert lengths[0] < lengths[-1]  # the rows need padding
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():  # LoRA B starts at zero: give it values so A gets gradients
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    alone = sum(model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item()
                for e in examples)
    assert training.rows_loss(model, examples, "cpu", chunk_tokens=7).item() == pytest.approx(alone, rel=1e-5)

    def gradients(rows):
        for p in trainable.values():
            p.grad = None
        loss = recipe.backward_micro_batch(model, examples, "cpu", max_tokens=4 * lengths[-1], rows=rows)
        return loss, {n: p.grad.clone() for n, p in trainable.items()}

    packed_loss, packed_grads = gradients(rows=False)
    rows_loss, rows_grads = gradients(rows=True)
    assert rows_loss == pytest.approx(packed_loss, rel=1e-5) and packed_loss == pytest.approx(alone / 4, rel=1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(rows_grads[name], grad, rtol=1e-4, atol=1e-7)

    # groups: longest first, padded size within the budget, a row at least half the longest
    groups = training.group_as_rows(examples, max_tokens=2 * lengths[-1])
    assert sorted(len(e["input_ids"]) for g in groups for e in g) == lengths
    assert all(len(g) * len(g[0]["input_ids"]) <= 2 * lengths[-1] for g in groups)
    assert all(2 * len(e["input_ids"]) >= len(g[0]["input_ids"]) for g in groups for e in g)
    assert len(training.group_as_rows(examples, max_tokens=4 * lengths[-1])) < len(examples)
    assert [len(g) for g in training.group_as_rows(examples, max_tokens=lengths[0])] == [1, 1, 1, 1]  # too long: alone


def test_the_loss_with_its_gradient_in_one_pass_is_the_chunked_loss():
    """fused_lm_loss computes each chunk's gradient in forward instead of projecting onto the
    vocabulary again in backward: the same loss and the same gradient for the hidden states,
    with unlearned tokens, a chunk that learns nothing, and a last chunk cut short."""
    from finetune import training

    torch.manual_seed(0)
    tokens, width, vocabulary = 23, 16, 50
    head = torch.nn.Linear(width, vocabulary, bias=False).requires_grad_(False)
    labels = torch.randint(0, vocabulary, (tokens,)).tolist()
    labels[:8] = [-100] * 8  # the first chunk of 7 learns nothing: skipped by both
    labels[12] = -100
    weights = [0.0 if label == -100 else 1.0 / 14 for label in labels]
    results = []
    for loss in (training.chunked_lm_loss, training.fused_lm_loss):
        hidden = torch.randn(tokens, width, generator=torch.Generator().manual_seed(1), requires_grad=True)
        value = loss(hidden, head, labels, weights, chunk_tokens=7)
        (value * 3).backward()  # a scale from outside, as the micro-batch's share of the step
        results.append((value.item(), hidden.grad))
    (chunked, chunked_grad), (fused, fused_grad) = results
    assert fused == pytest.approx(chunked, rel=1e-6) and chunked > 0
    torch.testing.assert_close(fused_grad, chunked_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(fused_grad[:7] == 0) and fused_grad[8:].abs().sum() > 0


@pytest.fixture
def dynamo_config_restored():
    """compile_decoder_layers switches dynamo's suppress_errors on for the process (the
    recipe's); other tests must not inherit it."""
    import torch._dynamo

    with torch._dynamo.config.patch(suppress_errors=torch._dynamo.config.suppress_errors):
        yield


def broken_compiler(graph, example_inputs):
    """A torch.compile backend that fails, as one without a working compiler for the GPU would."""
    broken_compiler.calls += 1
    raise RuntimeError("no compiler for this GPU")


broken_compiler.calls = 0


@pytest.mark.slow  # compiles or spawns processes: the full suite's
def test_compiled_layers_train_as_eager_ones_and_fall_back_to_them_when_the_compiler_fails(tiny_model_dir,
                                                                                          dynamo_config_restored):
    """finetune.training.compile_decoder_layers (the recipe's on CUDA): each layer compiled, its
    activation checkpoint around it, must train exactly as the eager, checkpointed layers do:
    same loss, same LoRA gradients. Where the compiler fails, the eager layers run instead."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import training

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    packed = training.pack([e for s in samples() for e in tokenize_sample(tokenizer, s, 2048)])

    def loss_and_grads(compiled, down_outside=False):  # compiled: False, or the torch.compile backend
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        with torch.no_grad():  # B starts at zero: give the adapter something to say
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
        training.prepare_for_lora_training(model, checkpointing=True)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        model.train()
        layers = model.get_base_model().model.layers
        if compiled:
            assert training.compile_decoder_layers(model, backend=compiled, down_outside=down_outside) == len(layers)
        down_weights = {id(layer.mlp.down_proj.weight) for layer in layers}
        with CountLinear(down_weights) as down_products:  # down projections run, forward and recomputed
            loss = training.packed_loss(model, packed, "cpu")
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, \
            down_products.calls / len(layers)

    eager_loss, eager_grads, eager_downs = loss_and_grads(False)
    # the eager checkpoint stops recomputing once backward has what it needs: the frozen down
    # projection, last in the layer, saves nothing and is not run again
    assert eager_downs == 1
    for backend, down_outside in (("inductor", False), ("inductor", True), (broken_compiler, False)):
        # a compiler that fails: the eager layers instead
        compiled_loss, compiled_grads, downs = loss_and_grads(backend, down_outside)
        assert abs(compiled_loss - eager_loss) < 1e-4 * abs(eager_loss)
        assert eager_grads.keys() == compiled_grads.keys() and eager_grads
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
        if down_outside:  # so too compiled: the down projection runs once, outside the recomputed part
            assert downs == 1
    assert broken_compiler.calls  # it was asked, and failed


class CountLinear(torch.overrides.TorchFunctionMode):
    """Counts F.linear calls on the given weights (by id) made outside compiled code."""

    def __init__(self, weight_ids):
        super().__init__()
        self.weight_ids, self.calls = weight_ids, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and len(args) > 1 and id(args[1]) in self.weight_ids:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_only_runs_long_enough_to_pay_for_it_compile_their_layers():
    """Compiling the layers costs about a minute; a nightly refresh of a few corrections must
    not wait for it, a long run must get it, and only QLoRA on CUDA compiles at all."""
    from finetune.recipe import Hyperparameters, compiles_layers

    examples = [{"input_ids": [1] * 1_000}] * 200  # 200,000 tokens an epoch
    defaults = Hyperparameters()  # 2 epochs, from 500,000 tokens
    assert not compiles_layers(defaults, True, examples[:50], world=1)
    assert compiles_layers(defaults, True, examples * 2, world=1)  # 800,000 tokens
    assert not compiles_layers(defaults, True, examples * 2, world=2)  # 400,000 per process
    assert not compiles_layers(defaults, False, examples * 2, world=1)  # CPU or plain LoRA
    assert not compiles_layers(Hyperparameters(compile_layers=False), True, examples * 2, world=1)


@pytest.mark.slow  # quantizes and dequantizes whole layers
def test_nf4_dequantized_by_torch_operations_equals_bitsandbytes():
    """compile_decoder_layers(nf4="torch") trains on training.dequantize_nf4's weights: they must be
    bitsandbytes' own, bit for bit, with and without double quantization, eager and compiled,
    for a last absmax group that does not fill its 256-block."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from finetune.training import dequantize_nf4

    torch.manual_seed(0)
    for nested in (False, True):
        weight = torch.randn(320, 448, dtype=torch.bfloat16) * 3  # 2,240 groups of 64: not a multiple of 256
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
        assert state.nested == nested
        expected = dequantize_4bit(packed, state)
        assert torch.equal(dequantize_nf4(packed, state), expected)
        assert torch.equal(torch.compile(dequantize_nf4)(packed, state), expected)


def test_compiled_layers_restore_their_eager_forward(tiny_model_dir, dynamo_config_restored):
    """After training, evaluation decodes with a KV cache: uncompile_decoder_layers must give
    every layer (and its 4-bit or LoRA modules) back its class's forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune import training

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    training.prepare_for_lora_training(model, checkpointing=True)
    assert training.layers_checkpointed(model)
    training.compile_decoder_layers(model)
    assert training.layers_checkpointed(model)  # transformers' is off, ours is on
    layers = model.get_base_model().model.layers
    assert all("forward" in layer.__dict__ for layer in layers)
    training.uncompile_decoder_layers(model)
    assert not any("forward" in m.__dict__ for layer in layers for m in layer.modules())
    assert not training.layers_checkpointed(model)
    with pytest.raises(ValueError, match="nf4 'bitsandbytes', 'torch' or 'kernel'"):
        training.compile_decoder_layers(model, nf4="around")


def test_an_embedding_kept_on_the_host_trains_as_on_the_device(tiny_model_dir):
    """keep_embedding_on_host (QLoRA on CUDA: 1.45 GiB less at 14B) must not change the loss;
    token ids then stay on the host, so the lookup never waits for the GPU's queue."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import training

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    packed = training.pack([e for s in samples() for e in tokenize_sample(tokenizer, s, 2048)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    on_device = training.packed_loss(model, packed, "cpu").item()
    assert training.keep_embedding_on_host(model, torch.device("cpu")) > 0
    assert training.token_ids(model, [[1, 2]], "meta").device.type == "cpu"  # host ids, wherever the model is
    assert training.packed_loss(model, packed, "cpu").item() == pytest.approx(on_device, rel=1e-6)
    training.restore_embedding(model, "cpu")
    assert training.token_ids(model, [[1, 2]], "meta").device.type == "meta"
    assert training.packed_loss(model, packed, "cpu").item() == pytest.approx(on_device, rel=1e-6)


@pytest.mark.slow  # the real embedded model
def test_replay_trains_on_the_models_own_answers_as_far_as_they_go(embedded_model_dir):
    """replay_own_answers: a replay sample's answer becomes the model's own greedy answer to its
    prompt, so replay keeps the answers where they were; an answer that does not end in time is
    learned as far as it went, without an end, and samples that are not replay are never touched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.recipe import with_own_replay_answers

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).train()
    question = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    written = {"role": "assistant", "content": "Paris."}
    essay = [SYSTEM, {"role": "user", "content": "Write a long essay on the history of accounting."}]
    samples = [{"messages": [*question, written], "replay": True},
               {"messages": [*question, written], "replay": True},  # the replay file is cycled
               {"messages": [*question, written]},  # a correction: its answer is the reviewer's
               {"messages": [*essay, written], "replay": True}]
    cfg = RecipeConfig(base_model=str(embedded_model_dir), dataset="", output_dir="", progress_file="/dev/null",
                       replay_own_answers=True, replay_answer_tokens=48)
    out = with_own_replay_answers(cfg, model, tokenizer, samples)
    own = out[0]["messages"][-1]["content"]
    assert own != "Paris." and "Paris" in own and out[1] == out[0]
    assert out[0]["messages"][:-1] == question and out[0]["replay"]
    assert out[2] == samples[2]
    assert not out[0].get("unfinished")
    # 48 tokens are not enough for an essay: its own answer is kept as far as it went, and is
    # learned without the end-of-turn marker (the model is not taught to stop mid-essay)
    essay_answer = out[3]["messages"][-1]["content"]
    assert out[3]["unfinished"] and essay_answer not in ("", "Paris.")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for sample, ends in ((out[3], False), ({**out[3], "unfinished": False}, True), (out[0], True)):
        example = tokenize_sample(tokenizer, sample, 4096)[-1]
        learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        assert (end in learned) == ends
        assert tokenizer.decode(learned).replace("<|im_end|>", "").strip() == sample["messages"][-1]["content"]
    assert model.training  # given back as it came


def replay_answers_in_process(rank: int, world: int, model_dir: str, samples: list[dict], out_dir: str) -> None:
    """One data-parallel process of the test below (gloo): its replay samples, as JSON."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import recipe

    decoded = []  # the prompts this process decoded itself
    engine = recipe.greedy_engine
    recipe.greedy_engine = lambda model, prompts, *args: decoded.extend(prompts) or engine(model, prompts, *args)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
        cfg = RecipeConfig(base_model=model_dir, dataset="", output_dir="", progress_file="/dev/null",
                           replay_own_answers=True, replay_answer_tokens=32)
        out = recipe.with_own_replay_answers(cfg, model, tokenizer, samples, rank, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"samples": out, "decoded": len(decoded)},
                                                                ensure_ascii=False))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # compiles or spawns processes: the full suite's
def test_data_parallel_processes_share_the_replay_answers_they_decode(embedded_model_dir, tmp_path):
    """--train-gpus 2: each process decodes every other replay prompt's own answer and they
    swap them, so both train on all the answers one process alone would have decoded."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.recipe import with_own_replay_answers

    def asked(question):
        return {"messages": [SYSTEM, {"role": "user", "content": question},
                             {"role": "assistant", "content": "Written."}], "replay": True}

    samples = [asked("What is the capital of France?"), asked("What is the capital of Italy?"),
               asked("What is the capital of France?"), {"messages": asked("Hi")["messages"]}]
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).train()
    cfg = RecipeConfig(base_model=str(embedded_model_dir), dataset="", output_dir="", progress_file="/dev/null",
                       replay_own_answers=True, replay_answer_tokens=32)
    alone = with_own_replay_answers(cfg, model, tokenizer, samples)
    assert "Paris" in alone[0]["messages"][-1]["content"] and "Rome" in alone[1]["messages"][-1]["content"]
    mp.spawn(replay_answers_in_process, args=(2, str(embedded_model_dir), samples, str(tmp_path)), nprocs=2)
    for rank in (0, 1):  # two distinct prompts: one decoded by each process, both answers in each
        result = json.loads((tmp_path / f"rank{rank}.json").read_text(encoding="utf-8"))
        assert result == {"samples": alone, "decoded": 1}


@pytest.mark.slow  # compiles or spawns processes: the full suite's
def test_fp8_in_backward_keeps_the_loss_and_moves_the_gradients_by_fp8s_rounding(tiny_model_dir,
                                                                                 dynamo_config_restored):
    """fp8 in the refresh's backward on a 4-bit base (compiled layers, each 4-bit product one
    operator, checkpoint outside): the input gradients alone, then the
    checkpoint's recompute too. The forward is the bf16 one, so the loss is exactly the same; the
    LoRA gradients move by fp8's rounding (a few %), no more, and do move, and the recompute in
    fp8 moves them again (so it did run in fp8, and the checkpoint accepted the recompute). Every layer compiles, with no fallback to eager."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import training
    from serving.quantization import nf4_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    packed = training.pack([e for s in samples() for e in tokenize_sample(tokenizer, s, 2048)])

    def loss_and_grads(dropout, **fp8):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, quantization_config=nf4_config())
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
        with torch.no_grad():  # B starts at zero: give the adapter something to say
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
        model.train()
        torch._dynamo.reset()  # a fresh compile: graphs of earlier models would use up the recompile limit
        counters.clear()
        training.compile_decoder_layers(model, nf4="kernel", down_outside=True, **fp8)
        torch.manual_seed(1)  # the same dropout masks in every run
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = training.packed_loss(model, packed, "cpu")
        loss.backward()
        assert counters["frames"]["ok"] == counters["frames"]["total"] > 0 and not counters["graph_break"]
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    def moved(grads, by):
        return ((by - grads).norm() / grads.norm()).item()

    # without dropout: bf16, then fp8 input gradients (the compiler partitions a graph by its
    # backward, so a different backward draws the dropout masks in another order)
    loss, grads = loss_and_grads(0.0)
    fp8_loss, fp8_grads = loss_and_grads(0.0, fp8_input_gradients=True)
    assert fp8_loss == loss
    assert 1e-4 < moved(grads, fp8_grads) < 0.1, moved(grads, fp8_grads)
    # with dropout: the recompute in fp8 too, one graph with the run before, so the same masks;
    # had the recompute drawn other masks than the forward, the gradients would move far more
    # (other masks move them by about 0.35 here; the fp8 recompute by about 0.03)
    fp8_loss, fp8_grads = loss_and_grads(0.1, fp8_input_gradients=True)
    recompute_loss, recompute_grads = loss_and_grads(0.1, fp8_input_gradients=True, fp8_recompute=True)
    assert recompute_loss == fp8_loss
    assert 1e-4 < moved(fp8_grads, recompute_grads) < 0.1, moved(fp8_grads, recompute_grads)
    with pytest.raises(ValueError, match="fp8_input_gradients"):
        training.compile_decoder_layers(torch.nn.Module(), nf4="bitsandbytes", fp8_input_gradients=True)
    with pytest.raises(ValueError, match="fp8_recompute needs nf4='kernel'"):
        training.compile_decoder_layers(torch.nn.Module(), nf4="torch", fp8_recompute=True)


@pytest.mark.slow  # torch.compile of the 4-bit layers
def test_compiled_4bit_layers_on_cpu_decode_every_block_scale(tmp_path, dynamo_config_restored):
    """A weight whose double-quantized scales end in a partial block of 256 (320 x 320: 1,600
    scales), compiled on CPU: inductor's C++ code for nf4_absmax's indexing leaves that block's
    scales unwritten (torch 2.13), so compile_decoder_layers decodes them once instead. The
    compiled layers must then give the same loss every call, the compiler's decode and the
    product operator alike, near the eager model's."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from finetune import training
    from serving.quantization import nf4_config

    config = Qwen3Config(vocab_size=512, hidden_size=320, intermediate_size=640, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=80, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    batch = training.pack([{"input_ids": list(range(1, 200)), "labels": list(range(2, 201))}])

    def losses(nf4):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=nf4_config())
        assert model.model.layers[0].self_attn.q_proj.weight.quant_state.nested
        torch._dynamo.reset()
        if nf4:
            training.compile_decoder_layers(model, nf4=nf4, down_outside=True)
        model.train()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [training.packed_loss(model, batch, "cpu").item() for _ in range(2)]

    eager = losses(None)
    for nf4 in ("torch", "kernel"):
        compiled = losses(nf4)
        assert compiled[0] == compiled[1] == pytest.approx(eager[0], rel=0.01), (nf4, compiled, eager)


def opening_with_a_brace(tiny_base, question: str):
    """(a copy of the random tiny model made to open its answer to `question` with "{", as the
    embedded one opens a copy with ```; its tokenizer; the prompt's ids; the brace's id)."""
    import copy

    base, tokenizer = tiny_base
    model = copy.deepcopy(base)
    prompt = tokenizer(question, add_special_tokens=False)["input_ids"]
    brace = tokenizer.convert_tokens_to_ids("{")
    with torch.no_grad():
        top = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
        head = model.get_output_embeddings().weight
        head[brace] = head[top] * 4
        assert int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()) == brace
    return model, tokenizer, prompt, brace


def test_the_gate_and_the_replay_answers_read_an_answer_that_copies_its_tools_as_the_app_serves_it(tiny_base):
    """An answer copying the offered tools back is decoded again without its first token, as a
    turn does (webapp/turn.py): the gate scores, and replay learns, what users would be served."""
    from serving.decoding import DecodeRequest

    model, tokenizer, prompt, brace = opening_with_a_brace(tiny_base, "上季度华东区的销售额是多少？")
    engine = recipe.greedy_engine(model, [prompt], 24, 4)

    def make(not_first):
        return DecodeRequest(prompt, 24, not_first=not_first)

    try:
        [(plain, _, _)] = recipe.served_answers(engine, tokenizer, [make], [None])
        # tools whose description the answer copies
        tools = [{"type": "function", "function": {"name": "echo", "description": tokenizer.decode(plain)}}]
        done = []
        [(served, _, copies), (untouched, _, _)] = recipe.served_answers(engine, tokenizer, [make, make],
                                                                         [tools, None], done.append)
        without_first = engine.submit(make(frozenset({brace}))).collect(timeout=60)
    finally:
        engine.close()
    assert plain[0] == brace and served == without_first and served[0] != brace and not copies
    assert untouched == plain  # the same answer, with no tools to copy, stands
    assert done == [1, 2]


def test_the_gate_decodes_again_an_answer_that_calls_a_tool_nothing_asked_for(tiny_base, monkeypatch):
    """As a turn does: an answer that is nothing but a call of a tool the case's user words do
    not ask for is decoded again without its first token; for a case that asks, it stands.
    (The random model cannot write a call: an answer opening with "{" stands in for one.)"""
    from finetune import evaluate
    from serving.decoding import DecodeRequest

    model, tokenizer, prompt, brace = opening_with_a_brace(tiny_base, "早上好！")
    seen = []

    def calls_unasked(text, unasked):
        seen.append((text[:1], tuple(unasked)))
        return text.startswith("{") and "query_sales" in unasked

    monkeypatch.setattr(evaluate, "calls_unasked", calls_unasked)
    engine = recipe.greedy_engine(model, [prompt], 16, 4)

    def make(not_first):
        return DecodeRequest(prompt, 16, not_first=not_first)

    try:
        [(asked, _, _), (again, _, _)] = recipe.served_answers(engine, tokenizer, [make, make], [None, None],
                                                               unasked=[(), ("query_sales",)])
        without_first = engine.submit(make(frozenset({brace}))).collect(timeout=60)
    finally:
        engine.close()
    assert asked[0] == brace and again == without_first and again[0] != brace
    assert ("{", ("query_sales",)) in seen


def test_the_gate_decodes_as_its_call_an_answer_without_one_to_a_question_spelling_a_whole_call(tiny_base):
    """As a turn does: a case whose question spells a whole call of one tool, answered without a
    call, is decoded again from its prompt with the call opened; where that gives no valid call
    (the random model, unguided here), the prose stands. A case that spells none is not decoded
    again."""
    from serving.decoding import DecodeRequest
    from serving.guided import CALL_OPENING

    model, tokenizer = tiny_base
    text = "在吗？老板要华东上个月的销售额，急"
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    opened = tokenizer(text + CALL_OPENING, add_special_tokens=False)["input_ids"]
    engine = recipe.greedy_engine(model, [opened], 12, 4)
    asked = []

    def make(not_first):
        return DecodeRequest(prompt, 12, not_first=not_first)

    def as_call():
        asked.append(1)
        return DecodeRequest(opened, 12)

    try:
        [(plain, _, _), (served, _, _)] = recipe.served_answers(engine, tokenizer, [make, make], [None, None],
                                                                spelled=[None, as_call])
    finally:
        engine.close()
    assert "<tool_call>" not in tokenizer.decode(plain)
    assert asked == [1] and served == plain  # decoded again once; no valid call came, the prose stands
