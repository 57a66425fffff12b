"""Streamed text (serving/detokenize.py): pieces pushed a few tokens at a time read exactly as
the whole answer decoded at once, with the embedded model's and Qwen3's real tokenizers, and
no piece shows half a character."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from serving.detokenize import IncrementalText

TEXTS = [
    "上季度华东区的销售额是 1,234.5 万元，同比增长 12%。😀 Revenue rose; see [1].",
    "  leading spaces, tabs\tand\nnew lines\n\n- a list\n- 第二项：华北\n",
    "<tool_call>\n{\"name\": \"query_sales\", \"arguments\": {\"region\": \"华南\"}}\n</tool_call>",
    "混合 mixed 文本 with emoji 🎉🎉 and 日本語 and Ünïcödé.",
]


@pytest.fixture(scope="module", params=["embedded", "qwen3"])
def tokenizer(request, test_tokenizer_dir):
    if request.param == "qwen3":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("qwen3_tokenizer_dir"))
    return AutoTokenizer.from_pretrained(test_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_join_to_the_whole_answer(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    for seed in range(3):  # one token at a time, and in bursts as a lagging listener drains them
        rng = random.Random(seed)
        stream, pieces, at = IncrementalText(tokenizer), [], 0
        while at < len(ids):
            step = 1 if seed == 0 else rng.randint(1, 5)
            pieces.append(stream.push(ids[at:at + step]))
            at += step
        pieces.append(stream.flush())
        assert "".join(pieces) == whole
        assert not any("\ufffd" in p for p in pieces)


def split_character(tokenizer) -> tuple[str, list[int]]:
    """A character the vocabulary writes in more than one token (its bytes split)."""
    for char in "𠀀𪚥🦜🎉":
        ids = tokenizer(char, add_special_tokens=False)["input_ids"]
        if len(ids) > 1:
            return char, ids
    pytest.fail("every candidate character is one token")


def test_a_character_cut_between_tokens_is_held_back_until_whole(tokenizer):
    char, ids = split_character(tokenizer)
    stream = IncrementalText(tokenizer)
    assert stream.push(ids[:1]) == ""
    assert stream.push(ids[1:]) == char


def test_special_tokens_and_an_answer_cut_mid_character(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer("好的", add_special_tokens=False)["input_ids"] + [eos]
    stream = IncrementalText(tokenizer)
    assert stream.push(ids) == "好的"
    cut = split_character(tokenizer)[1][:1]
    stream.push(cut)
    assert stream.flush() == tokenizer.decode(cut, skip_special_tokens=True)  # shown as it is, once, at the end
