"""Tool calls held to their whole schema while decoded (serving/guided.py, xgrammar), with the
embedded model's and Qwen3's real tokenizers: a model that would write a call the tool refuses
writes an accepted one, and nothing outside a tool call changes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer

from serving.decoding import BatchingEngine, DecodeRequest
from serving.guided import CALL_OPENING, GuideLogitsProcessor, GuideVocabulary, ToolCallGuide, mask_rows
from webapp.models import GenerationParams

PERIOD = "^(\\d{4}(-Q[1-4]|-(0[1-9]|1[0-2]))?|this_month|last_month|this_quarter|last_quarter|this_year|last_year)$"
SALES = {"type": "function", "function": {"name": "query_sales", "parameters": {
    "type": "object", "required": ["region", "period"], "additionalProperties": False, "properties": {
        "region": {"type": "string", "enum": ["华东", "华南", "华北", "西南", "华中"]},
        "period": {"type": "string", "pattern": PERIOD},
        "metric": {"type": "string", "enum": ["revenue", "units"], "default": "revenue"},
        "top": {"type": "integer", "minimum": 1, "maximum": 20}}}}}
LOOKUP = {"type": "function", "function": {"name": "lookup_customer", "parameters": {
    "type": "object", "properties": {"name_or_id": {"type": "string"}}}}}
ALIASES = {"query_sales": {"region": {"North China": "华北"}, "metric": {"销量": "units"},
                           "period": {"上季度": "last_quarter"}}}

GOOD = '<tool_call>\n{"name": "query_sales", "arguments": {"region": "华北", "period": "last_month", "metric": "units"}}\n</tool_call>'


@pytest.fixture(scope="module", params=["embedded", "qwen3"])
def tokenizer(request, test_tokenizer_dir):
    """The embedded model's tokenizer and Qwen3's real one (151,669 tokens, <tool_call> a token
    of its own): the guide reads bytes, whatever the vocabulary."""
    if request.param == "qwen3":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("qwen3_tokenizer_dir"))
    return AutoTokenizer.from_pretrained(test_tokenizer_dir)


@pytest.fixture(scope="module")
def vocabulary(tokenizer):
    return GuideVocabulary(tokenizer)


@pytest.fixture(scope="module")
def guide():
    return ToolCallGuide.from_tools([SALES, LOOKUP], ALIASES)


def scripted_scores(tokenizer, wanted: list[str], ids: list[int]) -> torch.Tensor:
    """Scores of a model that most wants to write wanted[0], then wanted[1], ...: for each
    text whose tokens the output so far begins, its next token gets a score by that preference."""
    scores = torch.full((len(tokenizer),), -10.0)
    for rank, text in enumerate(wanted):
        target = tokenizer(text, add_special_tokens=False)["input_ids"]
        if target[:len(ids)] == ids and len(target) > len(ids):
            scores[target[len(ids)]] = max(float(scores[target[len(ids)]]), 10.0 - rank)
    return scores


def decode(tokenizer, wanted: list[str], session, limit: int = 80) -> str:
    """Greedy decoding of the scripted model, through the guide if there is one."""
    ids: list[int] = []
    for _ in range(limit):
        if tokenizer.decode(ids) in wanted:
            break
        scores = scripted_scores(tokenizer, wanted, ids)
        if session is not None:
            session.restrict(scores)
        ids.append(int(scores.argmax()))
        if session is not None:
            session.advance(ids[-1])
    return tokenizer.decode(ids)


def follows(tokenizer, session, text: str) -> list[str]:
    """Feed `text` token by token; the tokens the guide would have masked."""
    masked = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        scores = torch.zeros(len(tokenizer))
        session.restrict(scores)
        if scores[token] == float("-inf"):
            masked.append(tokenizer.decode([token]))
        session.advance(token)
    return masked


def test_token_bytes_rebuild_the_text_byte_for_byte(tokenizer, vocabulary):
    text = 'Sure.\n<tool_call>\n{"name": "lookup_customer", "arguments": {"name_or_id": "龘鱻贸易 华北地区", "metric": "销量"}}\n</tool_call>'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(vocabulary.bytes_of(i) for i in ids) == text.encode()

    def whole_characters(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    # rarer Chinese characters span several byte tokens in both: the guide must compare bytes, not text
    assert not all(whole_characters(vocabulary.bytes_of(i)) for i in ids)


@pytest.mark.parametrize("bad", [
    GOOD.replace('"units"', '"units Sold"'),  # the enum value with the question's words after it
    GOOD.replace('"华北"', '"Span China"'),  # not a value and not a spelling the tool file maps
    GOOD.replace('"query_sales"', '"sales_query"'),  # no such tool
    GOOD.replace('"metric"', '"metrics"'),  # no such parameter, and the schema allows no others
    GOOD.replace('"last_month"', '"year-to-date"'),  # the period's pattern refuses it
    GOOD.replace('"last_month"', '"Q1 2026"'),
    GOOD.replace('"last_month"', '["last_month"]'),  # a list where the schema wants a string
    GOOD.replace('"region": "华北", ', ''),  # a required parameter left out
    GOOD.replace('\n{"name"', '\n```json\n{"name"'),  # a fenced call
    # keys in another order than the schema's (xgrammar holds required keys only in order)
    GOOD.replace('{"region": "华北", "period": "last_month"', '{"period": "last_month", "region": "华北"'),
])
def test_a_refused_call_is_steered_to_the_next_valid_choice(tokenizer, vocabulary, guide, bad):
    wanted = [bad, GOOD]
    assert decode(tokenizer, wanted, None) == bad  # what the model writes unguided
    assert decode(tokenizer, wanted, guide.session(vocabulary)) == GOOD


def test_valid_calls_aliases_and_text_are_left_alone(tokenizer, vocabulary, guide):
    for text in [
        GOOD,
        GOOD.replace('"华北"', '"North China"'),  # an alias from the tool file
        GOOD.replace('"units"', '"销量"'),
        GOOD.replace('"last_month"', '"上季度"'),  # an alias beside the pattern
        GOOD.replace('"last_month"', '"2026-Q3"').replace('"units"}', '"units", "top": 5}'),
        'The region "Span China" is not ours. ' + GOOD + ' And "metric": "units Sold" outside a call.',
        '<think>\n先查一下 "period": "year-to-date" 不对\n</think>\n\n' + GOOD + '\n' + GOOD,  # two calls
        '<tool_call>\n{"name": "lookup_customer", "arguments": {"name_or_id": "ACME 有限公司", "note": {"nested": ["any", 1]}}}\n</tool_call>',
    ]:
        assert follows(tokenizer, guide.session(vocabulary), text) == [], text


def test_an_answer_whose_prompt_opened_the_call_is_held_from_its_first_token(tokenizer, vocabulary):
    """A question spelling a whole call, answered in prose, is decoded again with the call's tag
    at the end of its prompt (webapp/turn.py): the guide starts inside the call, for that tool."""
    opened = ToolCallGuide.from_tools([SALES], ALIASES).opened()
    body = GOOD[GOOD.index(CALL_OPENING) + len(CALL_OPENING):]
    wanted = ["The company's sales were strong.", body]
    assert decode(tokenizer, wanted, None) == wanted[0]  # what the model writes unguided
    assert decode(tokenizer, wanted, opened.session(vocabulary)) == body
    assert follows(tokenizer, opened.session(vocabulary), body) == []  # the call itself is left alone
    lookup = body.replace('"query_sales"', '"lookup_customer"')
    assert follows(tokenizer, opened.session(vocabulary), lookup)  # another tool's name is refused


@pytest.mark.parametrize("top, refused", [("12", False), ("50", True), ("0", True), ("-3", True), ("2.5", True)])
def test_numbers_are_held_to_their_type_and_bounds(tokenizer, vocabulary, guide, top, refused):
    call = GOOD.replace('"units"}', f'"units", "top": {top}}}')
    assert bool(follows(tokenizer, guide.session(vocabulary), call)) == refused


def test_outside_a_call_nothing_is_masked_and_inside_only_what_fits(tokenizer, vocabulary, guide):
    session = guide.session(vocabulary)
    for token in tokenizer("好的，我查一下。", add_special_tokens=False)["input_ids"]:
        session.advance(token)
    assert not session.active
    scores = torch.zeros(len(tokenizer))
    session.restrict(scores)
    assert torch.isfinite(scores).all()
    call = '<tool_call>\n{"name": "query_sales", "arguments": {"region": "华北", "period": "last_month", "metric": '
    for token in tokenizer(call, add_special_tokens=False)["input_ids"]:
        session.advance(token)
    assert session.active
    scores = torch.zeros(len(tokenizer) + 64)  # a model's output rows often outnumber its tokens
    session.restrict(scores)
    assert (scores[len(tokenizer):] == float("-inf")).all()
    allowed = {tokenizer.decode([i]) for i in torch.isfinite(scores).nonzero().flatten().tolist()}
    assert allowed and all(piece.strip().startswith('"') or not piece.strip() for piece in allowed), sorted(allowed)[:20]


def test_a_schema_xgrammar_cannot_express_leaves_only_that_tools_arguments_free(tokenizer, vocabulary, caplog):
    name = f"odd_{len(tokenizer)}"  # warned once per schema: one of its own per tokenizer
    odd = {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "(?<=x)y"}}}}}
    with caplog.at_level(logging.WARNING, logger="serving.guided"):
        guide = ToolCallGuide.from_tools([SALES, odd], ALIASES)
    assert name in caplog.text
    assert follows(tokenizer, guide.session(vocabulary),
                   '<tool_call>\n{"name": "%s", "arguments": {"code": "anything", "n": 1}}\n</tool_call>' % name) == []
    bad = GOOD.replace('"last_month"', '"year-to-date"')
    assert decode(tokenizer, [bad, GOOD], guide.session(vocabulary)) == GOOD  # the other tool is still held


def test_the_batching_engine_and_generate_paths_apply_the_guide(tokenizer, vocabulary, guide):
    bad = GOOD.replace('"last_month"', '"current_quarter"')
    wanted = [bad, GOOD]
    # the batching engine's step: guided rows of the batch masked together, then each row's pick,
    # greedy and sampled; a row without a guide beside them is left as it is
    for temperature in (0.0, 0.7):
        request = DecodeRequest([1], 80, temperature=temperature, top_p=0.5, guide=guide.session(vocabulary))
        ids: list[int] = []
        for _ in range(80):
            if tokenizer.decode(ids) in wanted:
                break
            batch = torch.stack([scripted_scores(tokenizer, wanted, ids)] * 3)
            mask_rows(batch, {1: request.guide})
            assert torch.equal(batch[0], scripted_scores(tokenizer, wanted, ids))
            ids.append(BatchingEngine._pick(request, batch[1], int(batch[1].argmax())))
            request.guide.advance(ids[-1])
        assert tokenizer.decode(ids) == GOOD, temperature
    # transformers' generate(): the processor follows the row after the prompt
    processor = GuideLogitsProcessor(guide.session(vocabulary), prompt_tokens=3)
    ids = [7, 8, 9]
    for _ in range(80):
        if tokenizer.decode(ids[3:]) in wanted:
            break
        scores = processor(torch.tensor([ids]), scripted_scores(tokenizer, wanted, ids[3:])[None])
        ids.append(int(scores[0].argmax()))
    assert tokenizer.decode(ids[3:]) == GOOD


def test_a_guided_answer_without_a_call_equals_the_unguided_one(tiny_model, guide):
    prompt = tiny_model.render_prompt([{"role": "user", "content": "上季度华北销量？"}], [SALES, LOOKUP])
    params = GenerationParams(max_new_tokens=24, temperature=0.0)
    plain = "".join(tiny_model.stream(prompt, params))
    assert "".join(tiny_model.stream(prompt, params, guide=guide)) == plain
    tiny_model.enable_batched_decoding(max_batch=2, max_len=1024)
    try:
        assert "".join(tiny_model.stream(prompt, params, guide=guide)) == plain
    finally:
        tiny_model.close()


def test_the_engine_guides_with_the_users_tools_and_their_aliases(services):
    turns = services.engine.turns
    vocabulary = GuideVocabulary(services.model.tokenizer)
    finance = turns.guide(turns.tools_for(services.auth.current_user("finance-employee")))
    call = '<tool_call>\n{"name": "query_sales", "arguments": {"region": "%s", "period": "上季度"}}\n</tool_call>'
    assert follows(services.model.tokenizer, finance.session(vocabulary), call % "North China") == []
    assert follows(services.model.tokenizer, finance.session(vocabulary), call % "Span China")
    hr = turns.guide(turns.tools_for(services.auth.current_user("hr-employee")))
    assert follows(services.model.tokenizer, hr.session(vocabulary), call % "华北")  # not HR's tool


def test_the_engine_holds_a_qwen3_call_from_its_first_step(tiny_qwen3_dir):
    """Qwen3's output layer (151,936 rows) is wider than its tokenizer (151,669), and the engine's
    logits are inference tensors: the mask covers both, and the row beside it is not touched."""
    from transformers import AutoModelForCausalLM

    from serving.decoding import StaticDecoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir).eval()
    session = ToolCallGuide.from_tools([SALES, LOOKUP], ALIASES).session(GuideVocabulary.for_model(tokenizer, model))
    opening = '<tool_call>\n{"name": "query_sales", "arguments": {"region": "'
    for token in tokenizer(opening, add_special_tokens=False)["input_ids"]:
        session.advance(token)
    prompt = tokenizer("上季度华北销量？", add_special_tokens=False)["input_ids"]
    engine = BatchingEngine(StaticDecoder(model, max_batch=2, max_len=64))
    try:
        plain_alone = engine.submit(DecodeRequest(prompt, 12)).collect()
        plain, guided = engine.submit(DecodeRequest(prompt, 12)), engine.submit(DecodeRequest(prompt, 12, guide=session))
        plain, guided = plain.collect(), guided.collect()  # the guided row is the batch's second
    finally:
        engine.close()
    assert plain == plain_alone
    assert all(token < len(tokenizer) for token in guided)
    written = tokenizer.decode(guided)
    assert any(written.startswith(region + '"') for region in ["华东", "华南", "华北", "西南", "华中", "North China"]), written


def test_ids_past_the_tokenizer_are_never_allowed_inside_a_call(tokenizer, guide):
    width = len(tokenizer) + 64  # a model's output rows often outnumber its tokens
    session = guide.session(GuideVocabulary(tokenizer, vocab_size=width))
    for token in tokenizer('<tool_call>\n{"name": "lookup_customer", "arguments": {"name_or_id": "',
                           add_special_tokens=False)["input_ids"]:
        session.advance(token)
    scores = torch.zeros(width)
    session.restrict(scores)
    assert (scores[len(tokenizer):] == float("-inf")).all()
    assert torch.isfinite(scores[:len(tokenizer)]).sum() > len(tokenizer) // 2  # an open string: most tokens fit


def test_a_string_cannot_close_the_call_nor_the_answer_end_inside_it(tokenizer, vocabulary, guide):
    """`</tool_call>` (one token in Qwen3, five in the embedded vocabulary) and the end-of-text
    tokens read as string content to the grammar: they stay masked until the JSON is complete."""
    good = '<tool_call>\n{"name": "lookup_customer", "arguments": {"name_or_id": "ACME"}}\n</tool_call>'
    bad = good.replace('ACME"}}', 'ACME</tool_call>')
    assert decode(tokenizer, [bad, good], None) == bad
    written = decode(tokenizer, [bad, good], guide.session(vocabulary))
    if "</tool_call>" in written:  # closed only once the JSON is whole
        json.loads(written.split("<tool_call>")[1].split("</tool_call>")[0])
    session = guide.session(vocabulary)
    for token in tokenizer(good.split("ACME")[0] + "ACME", add_special_tokens=False)["input_ids"]:
        session.advance(token)
    scores = torch.zeros(len(tokenizer))
    session.restrict(scores)
    ends = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])} - {None}
    assert all(scores[token] == float("-inf") for token in ends if token < len(tokenizer))
    for token in tokenizer('"}}', add_special_tokens=False)["input_ids"]:
        session.advance(token)
    assert not session.active  # complete: the closing tag and the end are the model's again


def test_a_call_written_while_thinking_is_not_guided(tokenizer, vocabulary, guide):
    session = guide.session(vocabulary)
    thinking = '<think>\n<tool_call>\n{"name": "sales_query", "args": 1}\n</tool_call>\n'
    assert follows(tokenizer, session, thinking) == []
    follows(tokenizer, session, '</think>\n\n<tool_call>\n{"name": "')
    assert session.active
