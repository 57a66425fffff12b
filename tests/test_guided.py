"""Tool calls guided while decoded (serving/guided.py), with the embedded model's and Qwen3's
real tokenizers: a model that would write a value the tool refuses writes an accepted one, and
nothing outside a tool call changes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from serving.decoding import BatchingEngine, DecodeRequest
from serving.guided import GuideLogitsProcessor, TokenBytes, ToolCallGuide
from webapp.models import GenerationParams

SALES = {"type": "function", "function": {"name": "query_sales", "parameters": {
    "type": "object", "required": ["region", "period"], "additionalProperties": False, "properties": {
        "region": {"type": "string", "enum": ["华东", "华南", "华北", "西南", "华中"]},
        "period": {"type": "string", "pattern": "^.*$"},
        "metric": {"type": "string", "enum": ["revenue", "units"], "default": "revenue"}}}}}
LOOKUP = {"type": "function", "function": {"name": "lookup_customer", "parameters": {
    "type": "object", "properties": {"name_or_id": {"type": "string"}}}}}
ALIASES = {"query_sales": {"region": {"North China": "华北"}, "metric": {"销量": "units"}}}

GOOD = '<tool_call>\n{"name": "query_sales", "arguments": {"region": "华北", "period": "last_month", "metric": "units"}}\n</tool_call>'


@pytest.fixture(scope="module", params=["embedded", "qwen3"])
def tokenizer(request, test_tokenizer_dir):
    """The embedded model's tokenizer and Qwen3's real one (151,669 tokens, <tool_call> a token
    of its own): the guide reads bytes, whatever the vocabulary."""
    if request.param == "qwen3":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("qwen3_tokenizer_dir"))
    return AutoTokenizer.from_pretrained(test_tokenizer_dir)


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
            session.restrict(scores, greedy=True)
        ids.append(int(scores.argmax()))
        if session is not None:
            session.advance(ids[-1])
    return tokenizer.decode(ids)


def test_token_bytes_rebuild_the_text_byte_for_byte(tokenizer):
    text = 'Sure.\n<tool_call>\n{"name": "lookup_customer", "arguments": {"name_or_id": "龘鱻贸易 华北地区", "metric": "销量"}}\n</tool_call>'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    token_bytes = TokenBytes(tokenizer)
    assert b"".join(token_bytes(i) for i in ids) == text.encode()

    def whole_characters(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    # rarer Chinese characters span several byte tokens in both: the guide must compare bytes, not text
    assert not all(whole_characters(token_bytes(i)) for i in ids)


@pytest.mark.parametrize("bad", [
    GOOD.replace('"units"', '"units Sold"'),  # the enum value with the question's words after it
    GOOD.replace('"华北"', '"Span China"'),  # not a value and not a spelling the tool file maps
    GOOD.replace('"query_sales"', '"sales_query"'),  # no such tool
    GOOD.replace('"metric"', '"metrics"'),  # no such parameter, and the schema allows no others
])
def test_a_refused_value_is_steered_to_the_next_valid_choice(tokenizer, guide, bad):
    wanted = [bad, GOOD]
    assert decode(tokenizer, wanted, None) == bad  # what the model writes unguided
    assert decode(tokenizer, wanted, guide.session(TokenBytes(tokenizer))) == GOOD


def test_valid_calls_aliases_and_text_are_left_alone(tokenizer, guide):
    token_bytes = TokenBytes(tokenizer)
    for text in [
        GOOD,
        GOOD.replace('"华北"', '"North China"'),  # an alias from the tool file
        GOOD.replace('"units"', '"销量"'),  # open values and other keys where the schema allows them, below
        GOOD.replace('"units"', '"Units"'),  # the executor matches spellings case-insensitively
        'The region "Span China" is not ours. ' + GOOD + ' And "metric": "units Sold" outside a call.',
        '<tool_call>\n{"name": "lookup_customer", "arguments": {"name_or_id": "ACME 有限公司", "note": {"nested": ["any", 1]}}}\n</tool_call>',
        '<tool_call>\n```json\n{"name": "anything"}\n```\n</tool_call>',  # a fenced call is not guided
    ]:
        session = guide.session(token_bytes)
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            assert session.allows(token), (text, tokenizer.decode([token]))
            session.advance(token)


def test_a_closed_value_must_be_a_string(tokenizer, guide):
    session = guide.session(TokenBytes(tokenizer))
    prefix = '<tool_call>\n{"name": "query_sales", "arguments": {"metric": '
    for token in tokenizer(prefix, add_special_tokens=False)["input_ids"]:
        session.advance(token)
    assert not session.allows(tokenizer("1", add_special_tokens=False)["input_ids"][0])
    assert not session.allows(tokenizer("[", add_special_tokens=False)["input_ids"][0])
    assert session.allows(tokenizer(' "', add_special_tokens=False)["input_ids"][0])


def test_the_batching_engine_and_generate_paths_apply_the_guide(tokenizer, guide):
    bad = GOOD.replace('"units"', '"units Sold"')
    wanted = [bad, GOOD]
    token_bytes = TokenBytes(tokenizer)
    # the batching engine's choice for one row
    request = DecodeRequest([1], 80, guide=guide.session(token_bytes))
    ids: list[int] = []
    for _ in range(80):
        if tokenizer.decode(ids) in wanted:
            break
        ids.append(BatchingEngine._pick(request, scripted_scores(tokenizer, wanted, ids)))
        request.guide.advance(ids[-1])
    assert tokenizer.decode(ids) == GOOD
    # transformers' generate(): the processor follows the row after the prompt
    processor = GuideLogitsProcessor(guide.session(token_bytes), prompt_tokens=3, greedy=True)
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
    employee = services.auth.current_user("finance-employee")
    guide = services.engine.turns.guide(services.engine.turns.tools_for(employee))
    assert b"query_sales" in guide.names
    region = guide.values[(b"query_sales", b"region")]
    assert {"华北".encode(), b"north china"} <= region and b"span china" not in region
