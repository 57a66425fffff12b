import pytest
import torch

from serving.chat_format import split_thinking
from tests.conftest import make_lora_adapter
from webapp.models import (
    GenerationParams,
    GenerationResult,
    ModelService,
    ModelSpec,
    discover_adapters,
    load_base_model,
    quantization_config,
)

GREEDY = GenerationParams(max_new_tokens=8, temperature=0.0)


def generate(service, prompt, adapter=None, params=GREEDY):
    result = GenerationResult()
    text = "".join(service.stream(prompt, params, adapter, result))
    return text, result


@pytest.mark.slow  # converts the real model (about 30 s)
def test_embedded_model_is_real_and_answers(embedded_model_dir):
    model, tokenizer = load_base_model(str(embedded_model_dir), ModelSpec(str(embedded_model_dir)))
    service = ModelService(model, tokenizer, "SmolLM2-135M-Instruct")
    assert service.max_context == 8192
    prompt = service.render_prompt(
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France?"}]
    )
    assert "You are a helpful assistant." in prompt and "SmolLM" not in prompt  # our system prompt, not its own
    text, result = generate(service, prompt, params=GenerationParams(max_new_tokens=20, temperature=0.0))
    assert "Paris" in text
    assert result.finish_reason == "stop" and 0 < result.completion_tokens < 20


@pytest.mark.slow
def test_conversion_is_reused(embedded_model_dir, tmp_path):
    from webapp.models import ensure_embedded_model

    marker = embedded_model_dir / "config.json"
    before = marker.stat().st_mtime_ns
    assert ensure_embedded_model(embedded_model_dir.parent) == embedded_model_dir
    assert marker.stat().st_mtime_ns == before


def test_adapters_switch_per_request_without_touching_the_base(tiny_model, tiny_model_dir, tmp_path):
    prompt = tiny_model.render_prompt([{"role": "user", "content": "hello"}])
    base_text, _ = generate(tiny_model, prompt)
    base_weight = tiny_model.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    make_lora_adapter(tiny_model_dir, tmp_path / "adapters" / "finance" / "v1", seed=1)
    make_lora_adapter(tiny_model_dir, tmp_path / "adapters" / "hr" / "v3", seed=2)
    for adapter in discover_adapters(tmp_path / "adapters"):
        tiny_model.load_adapter(adapter.name, adapter.path, adapter.version)
    assert {a: i.version for a, i in tiny_model.adapters.items()} == {"finance": "v1", "hr": "v3"}

    finance, _ = generate(tiny_model, prompt, "finance")
    hr, _ = generate(tiny_model, prompt, "hr")
    again_base, _ = generate(tiny_model, prompt, None)
    assert finance != base_text and hr != base_text and finance != hr
    assert again_base == base_text  # base requests see no adapter
    assert generate(tiny_model, prompt, "finance")[0] == finance  # deterministic per adapter
    base_layer = tiny_model.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert torch.equal(base_layer.weight, base_weight)


def test_active_version_pointer_and_replacing_an_adapter(tiny_model, tiny_model_dir, tmp_path):
    root = tmp_path / "adapters" / "finance"
    make_lora_adapter(tiny_model_dir, root / "v1", seed=1)
    make_lora_adapter(tiny_model_dir, root / "v2", seed=2)
    assert discover_adapters(tmp_path / "adapters")[0].version == "v2"  # latest by default
    (root / "ACTIVE").write_text("v1\n")
    (info,) = discover_adapters(tmp_path / "adapters")
    assert info.version == "v1"
    prompt = tiny_model.render_prompt([{"role": "user", "content": "hello"}])
    tiny_model.load_adapter("finance", root / "v1", "v1")
    v1, _ = generate(tiny_model, prompt, "finance")
    tiny_model.load_adapter("finance", root / "v2", "v2")  # a promotion: same name, new weights
    v2, _ = generate(tiny_model, prompt, "finance")
    assert v1 != v2 and tiny_model.adapters["finance"].version == "v2"


def test_closing_the_stream_stops_generation(tiny_model):
    prompt = tiny_model.render_prompt([{"role": "user", "content": "tell me a long story"}])
    result = GenerationResult()
    stream = tiny_model.stream(prompt, GenerationParams(max_new_tokens=400, temperature=0.0), None, result)
    next(stream)
    stream.close()
    assert result.finish_reason == "cancelled" and result.completion_tokens < 400
    # the lock was released: the next request runs
    assert generate(tiny_model, prompt)[1].finish_reason in ("stop", "length")


def test_length_limit_is_reported(tiny_model):
    prompt = tiny_model.render_prompt([{"role": "user", "content": "hi"}])
    _, result = generate(tiny_model, prompt, params=GenerationParams(max_new_tokens=5, temperature=0.0))
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    assert result.prompt_tokens == tiny_model.count_tokens(prompt)


def test_quantization_config_is_nf4_double_quant_bf16():
    assert quantization_config(False, torch.float32) is None
    config = quantization_config(True, torch.float32)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


def test_missing_local_model_names_the_setting(tmp_path):
    from webapp.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="--model"):
        load_base_model(str(tmp_path / "no-model-here"), ModelSpec(str(tmp_path / "no-model-here")))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("plain answer", ("", "plain answer")),
        ("<think>\nlet me see</think>\n\nIt is 42.", ("let me see", "It is 42.")),
        ("<think>still thinking", ("still thinking", "")),
        ("  <think></think>answer", ("", "answer")),
    ],
)
def test_thinking_is_split_from_the_answer(raw, expected):
    assert split_thinking(raw) == expected


@pytest.mark.gpu
def test_4bit_base_with_lora_adapters_on_gpu(tiny_model_dir, tmp_path):
    """The production path: NF4 base on CUDA, department adapters chosen per request."""
    spec = ModelSpec(str(tiny_model_dir), load_in_4bit=True)
    assert spec.resolved_device() == "cuda" and spec.resolved_dtype() == torch.bfloat16
    model, tokenizer = load_base_model(str(tiny_model_dir), spec)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    service = ModelService(model, tokenizer, "tiny-4bit")
    prompt = service.render_prompt([{"role": "user", "content": "hi"}])
    base_text, result = generate(service, prompt)
    assert result.completion_tokens > 0 and next(model.parameters()).is_cuda
    make_lora_adapter(tiny_model_dir, tmp_path / "finance" / "v1", seed=1)
    service.load_adapter("finance", tmp_path / "finance" / "v1", "v1")
    adapted, _ = generate(service, prompt, "finance")
    assert adapted != base_text and generate(service, prompt)[0] == base_text


def test_batched_decoding_serves_what_generate_serves_and_follows_promotions(tiny_model, tiny_model_dir, tmp_path):
    """The app's batched path (static KV cache, adapters per row) gives the same greedy
    answers as generate(), for the base and each adapter, sees a replaced adapter at once,
    and stops when the listener leaves."""
    import concurrent.futures

    root = tmp_path / "adapters"
    make_lora_adapter(tiny_model_dir, root / "finance" / "v1", seed=1)
    make_lora_adapter(tiny_model_dir, root / "finance" / "v2", seed=3)
    make_lora_adapter(tiny_model_dir, root / "hr" / "v1", seed=2)
    tiny_model.load_adapter("finance", root / "finance" / "v1", "v1")
    tiny_model.load_adapter("hr", root / "hr" / "v1", "v1")
    params = GenerationParams(max_new_tokens=24, temperature=0.0)
    prompts = [tiny_model.render_prompt([{"role": "user", "content": text}]) for text in ("hello", "你好，介绍一下")]
    cases = [(p, a) for p in prompts for a in (None, "finance", "hr")]
    expected = [generate(tiny_model, p, a, params=params) for p, a in cases]

    tiny_model.enable_batched_decoding(max_batch=4, max_len=512)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # six users at once, four slots
            served = list(pool.map(lambda case: generate(tiny_model, case[0], case[1], params=params), cases))
        assert [text for text, _ in served] == [text for text, _ in expected]
        assert [(r.finish_reason, r.completion_tokens) for _, r in served] == \
            [(r.finish_reason, r.completion_tokens) for _, r in expected]
        v1 = served[1][0]
        tiny_model.load_adapter("finance", root / "finance" / "v2", "v2")  # a promotion
        assert generate(tiny_model, prompts[0], "finance", params=params)[0] != v1

        result = GenerationResult()
        stream = tiny_model.stream(prompts[0], GenerationParams(max_new_tokens=300, temperature=0.0), None, result)
        next(stream)
        stream.close()
        assert result.finish_reason == "cancelled" and result.completion_tokens < 300
    finally:
        tiny_model.close()
    assert tiny_model.engine is None


def test_a_streamed_answer_comes_in_fewer_pieces_no_closer_than_the_interval(tiny_model):
    """--stream-interval-ms: the tokens decoded meanwhile come as one piece (less Python per
    token next to the decode loop), and the answer reads the same."""
    import time

    params = GenerationParams(max_new_tokens=40, temperature=0.0)
    prompt = tiny_model.render_prompt([{"role": "user", "content": "写一段关于销售的话"}])
    tiny_model.enable_batched_decoding(max_batch=2, max_len=256)
    try:
        every = list(tiny_model.stream(prompt, params))
    finally:
        tiny_model.close()
    tiny_model.enable_batched_decoding(max_batch=2, max_len=256, stream_interval_ms=60)
    try:
        pieces, arrivals = [], []
        for piece in tiny_model.stream(prompt, params):
            pieces.append(piece)
            arrivals.append(time.monotonic())
    finally:
        tiny_model.close()
        tiny_model.stream_interval_s = 0.0
    assert "".join(pieces) == "".join(every)
    assert len(pieces) < len(every)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:-1])]  # the last piece may follow at once
    assert all(gap >= 0.055 for gap in gaps), gaps


def test_a_turn_larger_than_the_batched_cache_is_answered_by_generate_and_logged(tiny_model, caplog):
    """A 256-token cache: a turn that needs more is not refused or cut; generate() answers it
    alone, as it would without batching, and the log tells the operator which setting to raise."""
    params = GenerationParams(max_new_tokens=16, temperature=0.0)
    prompt = tiny_model.render_prompt([{"role": "user", "content": "季度销售报告：" + "华东区收入增长，成本下降。" * 40}])
    assert tiny_model.count_tokens(prompt) + 16 > 256
    expected = generate(tiny_model, prompt, params=params)
    tiny_model.enable_batched_decoding(max_batch=2, max_len=1024, kv_tokens=256)
    try:
        with caplog.at_level("WARNING", logger="webapp.models"):
            served = generate(tiny_model, prompt, params=params)
    finally:
        tiny_model.close()
    assert served[0] == expected[0] and served[0]
    assert "larger than the batched decoder holds" in caplog.text


@pytest.mark.parametrize("batched", [False, True], ids=["generate", "batched decoder"])
def test_an_answer_may_be_kept_from_opening_with_a_token_and_only_its_first_step_is_held(tiny_model, batched):
    """What a turn asks when the answer copied the tool definitions back: the same prompt, the
    model's next choice for the first token, the rest decoded as usual."""
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    prompt = tiny_model.render_prompt([{"role": "user", "content": "上季度华东区的销售额是多少？"}])
    ids = tiny_model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        first_two = torch.topk(tiny_model.model(input_ids=ids).logits[0, -1], 2).indices.tolist()
    if batched:
        tiny_model.enable_batched_decoding(max_batch=2, max_len=512)
    try:
        text, result = generate(tiny_model, prompt, params=params)
        assert result.first_token == first_two[0]
        again = GenerationResult()
        other = "".join(tiny_model.stream(prompt, params, None, again, not_first=frozenset({first_two[0]})))
    finally:
        tiny_model.close()
    assert again.first_token == first_two[1] and other != text
    # from the second token on, the answer is the greedy continuation of its new opening
    continued = tiny_model.tokenizer.decode([first_two[1]]) + generate(
        tiny_model, prompt + tiny_model.tokenizer.decode([first_two[1]]),
        params=GenerationParams(max_new_tokens=11, temperature=0.0))[0]
    assert other == continued
