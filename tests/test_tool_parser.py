import json

import pytest

from webapp.tools.parser import ToolCall, parse_output, visible_text

KNOWN = {"query_sales", "send_email"}


def call(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


@pytest.mark.parametrize(
    "raw, text, calls",
    [
        ("Plain answer.", "Plain answer.", []),
        (call("query_sales", region="华东", period="last_quarter"), "",
         [ToolCall("query_sales", {"region": "华东", "period": "last_quarter"})]),
        ("Let me look it up.\n" + call("query_sales", region="华南", period="2026-Q3") + "\nOne moment.",
         "Let me look it up.\n\nOne moment.", [ToolCall("query_sales", {"region": "华南", "period": "2026-Q3"})]),
        (call("query_sales", region="华东", period="2026-Q2") + call("query_sales", region="华东", period="2026-Q3"),
         "", [ToolCall("query_sales", {"region": "华东", "period": "2026-Q2"}),
              ToolCall("query_sales", {"region": "华东", "period": "2026-Q3"})]),
        ("<think>\nThe user wants East China sales.\n</think>\n\n" + call("query_sales", region="华东", period="last_quarter"),
         "", [ToolCall("query_sales", {"region": "华东", "period": "last_quarter"})]),
        ('<tool_call>\n```json\n{"name": "send_email", "arguments": {"to": "李雷@例子.cn", "subject": "销售报告", "body": "你好"}}\n```\n</tool_call>',
         "", [ToolCall("send_email", {"to": "李雷@例子.cn", "subject": "销售报告", "body": "你好"})]),
        ('<tool_call>{"name": "query_sales"}</tool_call>', "", [ToolCall("query_sales", {})]),
    ],
)
def test_well_formed_outputs(raw, text, calls):
    parsed = parse_output(raw, KNOWN)
    assert (parsed.text, parsed.calls, parsed.errors) == (text, calls, [])


def test_thinking_is_kept_apart():
    parsed = parse_output("<think>check the region</think>华东上季度增长 14.8%。", KNOWN)
    assert (parsed.thinking, parsed.text) == ("check the region", "华东上季度增长 14.8%。")


@pytest.mark.parametrize(
    "raw, error",
    [
        ('<tool_call>{"name": "query_sales", "arguments": {"region": "华东"</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "drop_tables", "arguments": {}}</tool_call>', "no tool named 'drop_tables'"),
        ('<tool_call>{"name": "query_sales", "arguments": "region=华东"}</tool_call>', "a string that is not JSON"),
        ('<tool_call>{"name": "query_sales", "arguments": {}, "parameters": {"region": "华东"}}</tool_call>',
         "both"),
        ('<tool_call>{"name": "query_sales", "arguments": [1, 2]}</tool_call>', "got list"),
        ('<tool_call>["query_sales"]</tool_call>', "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'no "name"'),
        ('Sure. <tool_call>{"name": "query_sales", "arguments": {', "was not closed"),
        ("<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", "JSON"),
        ("<tool_call>" + json.dumps({"name": "send_email", "arguments": {"body": "x" * 30_000}}) + "</tool_call>", "limit"),
    ],
)
def test_malformed_calls_become_errors_never_exceptions(raw, error):
    """Each malformation is one error for the model, and no call runs on a guess."""
    parsed = parse_output(raw, KNOWN)
    assert parsed.calls == [] and len(parsed.errors) == 1
    assert error in parsed.errors[0]


def test_a_bad_call_does_not_spoil_a_good_one():
    raw = '<tool_call>{oops}</tool_call>' + call("query_sales", region="华北", period="2026")
    parsed = parse_output(raw, KNOWN)
    assert parsed.calls == [ToolCall("query_sales", {"region": "华北", "period": "2026"})]
    assert len(parsed.errors) == 1


@pytest.mark.parametrize("raw", [None, "", "</tool_call>", "<tool_call></tool_call>", "\x00\x01<think>"])
def test_garbage_never_raises(raw):
    parse_output(raw, KNOWN)


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("Let me check. <tool_call>{\"name\": \"query_sa", "Let me check."),
        ("Let me check. <tool_c", "Let me check."),
        ("<think>hmm", ""),
        ("Done " + call("query_sales", region="华东", period="2026") + " here.", "Done  here."),
    ],
)
def test_streaming_never_shows_tool_call_markup(raw, shown):
    assert visible_text(raw) == shown


def test_arguments_as_parameters_or_as_a_json_string_and_lists_judged_element_by_element():
    """What other engines' parsers accept (vLLM, SGLang): "parameters" for the arguments, and
    arguments sent as a JSON-encoded string (decoded once); a list of calls in one block is
    judged element by element. Never a call with silently empty arguments."""
    parameters = parse_output('<tool_call>{"name": "query_sales", "parameters": {"region": "华东"}}</tool_call>', KNOWN)
    assert parameters.calls == [ToolCall("query_sales", {"region": "华东"})] and not parameters.errors
    encoded = parse_output('<tool_call>{"name": "query_sales", "arguments": "{\\"region\\": \\"华东\\"}"}</tool_call>',
                           KNOWN)
    assert encoded.calls == [ToolCall("query_sales", {"region": "华东"})] and not encoded.errors
    twice = parse_output('<tool_call>{"name": "query_sales", "arguments": "\\"{}\\""}</tool_call>', KNOWN)
    assert twice.calls == [] and "got str" in twice.errors[0], "decoded once, not until it is an object"
    mixed = parse_output('<tool_call>[{"name": "query_sales", "arguments": {"region": "华北"}}, 42]</tool_call>', KNOWN)
    assert mixed.calls == [ToolCall("query_sales", {"region": "华北"})] and len(mixed.errors) == 1
