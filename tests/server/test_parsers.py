"""Reasoning (`qwen3`) and tool-call (`qwen`) parsers: expected results, and streaming == non-streaming.

Every case is streamed whole, in two pieces at every split point, and one character at a time.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from nextserve.server.parsers import (
    ContentDelta,
    Qwen3ReasoningParser,
    QwenToolCallParser,
    ToolCallArgsDelta,
    ToolCallStart,
    finish_reason,
    get_reasoning_parser,
    get_tool_call_parser,
)
from nextserve.server.parsers.tool_calls import _JsonNormalizer

CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def chunkings(text: str) -> list[list[str]]:
    """The text whole, in two pieces at every split point, and one character at a time."""
    return [[text], *([text[:i], text[i:]] for i in range(1, len(text))), list(text)]


def stream_reasoning(parser: Qwen3ReasoningParser, pieces: list[str]) -> tuple[str | None, str | None]:
    stream = parser.stream()
    results = [stream.feed(p) for p in pieces] + [stream.finish()]
    reasoning = "".join(r for r, _ in results)
    content = "".join(c for _, c in results)
    return reasoning or None, content or None


def stream_tools(pieces: list[str]) -> tuple[str | None, list[tuple[str, str]], list]:
    """(content, [(name, arguments)] assembled from the events, events); checks event order on the way."""
    stream = QwenToolCallParser().stream()
    events = [e for p in pieces for e in stream.feed(p)] + stream.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: list[list[str]] = []
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index == len(calls) and CALL_ID.fullmatch(e.id)
            calls.append([e.name, ""])
        elif isinstance(e, ToolCallArgsDelta):
            assert e.index == len(calls) - 1, "argument deltas belong to the latest started call"
            calls[e.index][1] += e.arguments
    completed = stream.tool_calls
    assert [(c.name, c.arguments) for c in completed] == [tuple(c) for c in calls[: len(completed)]]
    assert [c.id for c in completed] == [e.id for e in events if isinstance(e, ToolCallStart)][: len(completed)]
    return content or None, [(c.name, c.arguments) for c in completed], events


def parse_tools(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = QwenToolCallParser().parse(text)
    assert all(CALL_ID.fullmatch(c.id) for c in calls)
    return content, [(c.name, c.arguments) for c in calls]


# ----------------------------------------------------------------------------------------------- reasoning


REASONING_CASES = [
    # (prompt_opened_think, output, expected reasoning, expected content)
    (True, "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    (True, "\nA\n\nB\n\n</think>\n\nC\n\nD\n", "A\n\nB", "C\n\nD\n"),
    (True, "<think>\nstep\n</think>\n\nok", "step", "ok"),
    (True, "still thinking\nabout it\n", "still thinking\nabout it", None),
    (True, "cut at a partial tag </thi", "cut at a partial tag </thi", None),
    (True, "</think>\n\nonly content", None, "only content"),
    (True, "a < b and c </ d\n</think>x</think> <think>y", "a < b and c </ d", "x</think> <think>y"),
    (True, "思考中…\n</think>\n\n答案是 🙂", "思考中…", "答案是 🙂"),
    (False, "<think>\nhmm\n</think>\n\nHi", "hmm", "Hi"),
    (False, "\n <think>r</think>c", "r", "c"),
    (False, "<think>\nnever closed", "never closed", None),
    (False, "\nPlain answer with </think> in it.\n", None, "\nPlain answer with </think> in it.\n"),
    (False, "  <thin", None, "  <thin"),
    (False, "x<think>y</think>z", None, "x<think>y</think>z"),
    (False, "", None, None),
    (True, "", None, None),
]


@pytest.mark.parametrize("opened, text, reasoning, content", REASONING_CASES)
def test_reasoning_parse(opened: bool, text: str, reasoning: str | None, content: str | None) -> None:
    assert Qwen3ReasoningParser(prompt_opened_think=opened).parse(text) == (reasoning, content)


@pytest.mark.parametrize("opened, text, reasoning, content", REASONING_CASES)
def test_reasoning_stream_matches_parse_at_every_split(opened: bool, text: str, reasoning, content) -> None:
    parser = Qwen3ReasoningParser(prompt_opened_think=opened)
    for pieces in chunkings(text):
        assert stream_reasoning(parser, pieces) == (reasoning, content), pieces


def test_reasoning_stream_holds_back_only_a_possible_tag() -> None:
    stream = Qwen3ReasoningParser(prompt_opened_think=True).stream()
    assert stream.feed("abc</th") == ("abc", "")
    assert stream.feed("ey") == ("</they", "")  # not the tag after all: released at once
    assert stream.feed(" <") == (" ", "")
    assert stream.feed("/think>\n\nHi") == ("", "Hi")
    assert stream.finish() == ("", "")


def test_reasoning_stream_waits_for_newlines_to_settle() -> None:
    stream = Qwen3ReasoningParser(prompt_opened_think=True).stream()
    assert stream.feed("\nfirst\n") == ("first", "")
    assert stream.feed("\nsecond") == ("\n\nsecond", "")
    assert stream.feed("\n</think>\n") == ("", "")
    assert stream.feed("\nanswer") == ("", "answer")


def test_reasoning_from_prompt_and_misuse() -> None:
    assert Qwen3ReasoningParser.from_prompt("<|im_start|>assistant\n<think>\n").prompt_opened_think
    assert not Qwen3ReasoningParser.from_prompt("<|im_start|>assistant\n").prompt_opened_think
    assert not Qwen3ReasoningParser.from_prompt("<think>\n\n</think>\n\n").prompt_opened_think
    stream = Qwen3ReasoningParser(prompt_opened_think=True).stream()
    stream.finish()
    with pytest.raises(ValueError):
        stream.feed("x")


# ----------------------------------------------------------------------------------------------- tool calls


def block(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


NESTED_ARGS = {
    "query": 'a {brace} and "quotes" and \\"escaped\\" and </tool_call> inside',
    "filters": [{"field": "x", "in": [1, 2.5, -3e-05, None, True]}, [], {}],
    "code": "def f():\n\treturn '}'\n",
    "text": "naïve café — 東京 🙂",
}

TOOL_CASES = [
    # (output, expected content, expected [(name, arguments)])
    (
        "Let me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
        "Let me check.",
        [("get_weather", '{"city": "Paris", "unit": "c"}')],
    ),
    (
        block("a", '{"x": 1}') + "\n" + block("b", '{"y": [1, 2]}') + "\n" + block("c", "{}"),
        None,
        [("a", '{"x": 1}'), ("b", '{"y": [1, 2]}'), ("c", "{}")],
    ),
    (
        "Looking it up 🙂\n\n" + block("search", json.dumps(NESTED_ARGS, ensure_ascii=False)) + "\n",
        "Looking it up 🙂",
        [("search", json.dumps(NESTED_ARGS, ensure_ascii=False))],
    ),
    # The model's own spacing and escapes are normalised to json.dumps(ensure_ascii=False).
    (
        '<tool_call>{"name":"f","arguments":{"a":1,"b":"\\u00e9\\ud83d\\ude00\\/",\n  "c":[ true ,null ],"d":1E2}}'
        "</tool_call>",
        None,
        [("f", '{"a": 1, "b": "é😀/", "c": [true, null], "d": 100.0}')],
    ),
    # Other shapes: keys swapped, arguments as a JSON string, no arguments, extra keys.
    ('<tool_call>\n{"arguments": {"k": "v"}, "name": "swap"}\n</tool_call>', None, [("swap", '{"k": "v"}')]),
    ('<tool_call>\n{"name": "s", "arguments": "{\\"k\\": [1]}"}\n</tool_call>', None, [("s", '{"k": [1]}')]),
    ('<tool_call>\n{"name": "now"}\n</tool_call>', None, [("now", "{}")]),
    ('<tool_call>\n{"name": "e", "arguments": {"k": 1} , "id": 7}\n</tool_call>', None, [("e", '{"k": 1}')]),
    # Text after and between blocks: whitespace dropped, anything else kept.
    ("Hi\n" + block("a", "{}") + "\nBye.\n", "Hi\nBye.\n", [("a", "{}")]),
    (block("a", "{}") + "\nmid\n" + block("b", "{}") + " \n", "\nmid", [("a", "{}"), ("b", "{}")]),
    # No blocks: content verbatim.
    ("Just text, a <tool_ mention and <tool_call", "Just text, a <tool_ mention and <tool_call", []),
    ("  trailing space  ", "  trailing space  ", []),
    ("", None, []),
]

MALFORMED = [
    'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>',  # invalid JSON
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',  # empty name
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": "[1]"}\n</tool_call>',  # string that is not an object
    '<tool_call>\n{"name": "f", "arguments": {"a": 1, "a": 2}}\n</tool_call>',  # duplicate key
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}}} </tool_call>',  # text after the JSON
    '<tool_call>\n{"name": "f", "arguments": {"a": "x"',  # cut off inside the arguments
    'Intro  <tool_call>\n["not", "an", "object"]\n</tool_call>\nmore',
    '<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call>',  # bad literal
    '<tool_call>\n{"name": "f", "arguments": {"a": "\\q"}}\n</tool_call>',  # bad escape
]


@pytest.mark.parametrize("text, content, calls", TOOL_CASES)
def test_tool_parse(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    assert parse_tools(text) == (content, calls)


@pytest.mark.parametrize("text, content, calls", TOOL_CASES)
def test_tool_stream_matches_parse_at_every_split(text: str, content, calls) -> None:
    for pieces in chunkings(text):
        streamed_content, streamed_calls, events = stream_tools(pieces)
        assert (streamed_content, streamed_calls) == (content, calls), pieces
        assert sum(isinstance(e, ToolCallStart) for e in events) == len(calls), "no call abandoned"


def test_nested_arguments_round_trip() -> None:
    _, calls = parse_tools(TOOL_CASES[2][0])
    assert json.loads(calls[0][1]) == NESTED_ARGS


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_block_is_all_content(text: str) -> None:
    assert parse_tools(text) == (text, [])
    for pieces in chunkings(text):
        assert stream_tools(pieces)[:2] == (text, []), pieces


def test_malformed_block_after_a_good_one() -> None:
    text = "Hi\n" + block("a", '{"x": 1}') + "\n" + block("b", '{"x": oops}')
    # Call 0 stands; the broken block comes back verbatim as content (with the newline before it).
    assert parse_tools(text) == ("Hi\n" + block("b", '{"x": oops}'), [("a", '{"x": 1}')])
    content, calls, _ = stream_tools(list(text))
    assert (content, calls) == parse_tools(text)


def test_arguments_stream_before_the_call_is_complete() -> None:
    stream = QwenToolCallParser().stream()
    assert stream.feed("Checking.\n<tool_call>\n") == [ContentDelta("Checking.")]
    start, *rest = stream.feed('{"name": "get_weather", "arguments": {"city": "Pa')
    assert isinstance(start, ToolCallStart) and (start.index, start.name) == (0, "get_weather")
    assert rest == [ToolCallArgsDelta(0, '{"city": "Pa')]
    assert stream.feed('ris", "days": 1') == [ToolCallArgsDelta(0, 'ris", "days": ')]  # the number may go on
    assert stream.feed("0}") == [ToolCallArgsDelta(0, "10}")]
    assert stream.feed("\n}\n</tool_call>") == []
    assert stream.finish() == []
    assert [(c.id, c.arguments) for c in stream.tool_calls] == [(start.id, '{"city": "Paris", "days": 10}')]
    assert finish_reason(stream.tool_calls, "stop") == "tool_calls"


def test_content_holds_back_only_a_possible_tag() -> None:
    stream = QwenToolCallParser().stream()
    assert stream.feed("a <tool") == [ContentDelta("a")]  # " <tool" might start a block
    assert stream.feed("box>") == [ContentDelta(" <toolbox>")]
    assert stream.finish() == []


KEY_TAILS = ["x", "é", '"']


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-(10**12), 10**12)
    if kind == 2:
        return rng.choice([0.5, -2.25e-7, 1e21, 3.0, -0.0])
    if kind in (3, 4):
        alphabet = 'ab {}[]",:\\/\n\t\x01é東🙂<>/tool_call'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if kind in (5, 6):
        return {f"k{i}{rng.choice(KEY_TAILS)}": _random_json(rng, depth + 1) for i in range(rng.randrange(4))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


@pytest.mark.parametrize("seed", range(40))
def test_random_arguments_stream_like_parse(seed: int) -> None:
    rng = random.Random(seed)
    arguments = {"v": _random_json(rng), "w": _random_json(rng)}
    # Written the way different models do: compact, indented, ASCII-escaped or not.
    written = json.dumps(
        arguments,
        ensure_ascii=rng.random() < 0.5,
        indent=rng.choice([None, 2]),
        separators=rng.choice([None, (",", ":"), (" ,", " : ")]),
    )
    text = f'Calling.\n<tool_call>\n{{"name": "f", "arguments": {written}}}\n</tool_call>'
    expected = ("Calling.", [("f", json.dumps(arguments, ensure_ascii=False))])
    assert parse_tools(text) == expected
    cuts = sorted(rng.sample(range(1, len(text)), min(12, len(text) - 1)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    for chunks in (pieces, list(text)):
        assert stream_tools(chunks)[:2] == expected


def test_normalizer_refuses_what_json_refuses() -> None:
    for bad in ['{"a" 1}', '{"a": [1,]}', '{"a": 01}', '{"a": 1.}', "{'a': 1}", '{"a": "\\u12x4"}', '{"a": +1}']:
        with pytest.raises(ValueError):
            json.loads(bad)
        with pytest.raises(ValueError):
            _JsonNormalizer().feed(bad)
    assert _JsonNormalizer().feed('{"a": NaN, "b": -Infinity}  tail') == ('{"a": NaN, "b": -Infinity}', 26)
    with pytest.raises(ValueError, match="duplicate"):
        _JsonNormalizer().feed('{"a": {"b": 1, "c": 2}, "a": 3}')
    assert _JsonNormalizer().feed('{"a": {"b": 1}, "c": {"b": 2}}')[0] == '{"a": {"b": 1}, "c": {"b": 2}}'


def test_broken_block_is_released_without_waiting_for_the_end() -> None:
    stream = QwenToolCallParser().stream()
    events = stream.feed('<tool_call>\n{"name": "f", "arguments": {}}')
    assert [type(e) for e in events] == [ToolCallStart, ToolCallArgsDelta]
    # Not a blank or "</tool_call>" after the JSON: the block can never close, so it is content at once.
    assert stream.feed("} and more") == [ContentDelta('<tool_call>\n{"name": "f", "arguments": {}}} and more')]
    assert stream.feed(" <tool_call>") == [ContentDelta(" <tool_call>")]
    assert stream.finish() == [] and stream.tool_calls == []


# ----------------------------------------------------------------------------------------------- together


COMPOSED = [
    (
        True,
        "The user wants weather.\nUse <tool_call> for it.\n</think>\n\n"
        + "Let me check.\n"
        + block("get_weather", '{"city": "東京"}')
        + "\n"
        + block("get_time", '{"tz": "Asia/Tokyo"}'),
        "The user wants weather.\nUse <tool_call> for it.",
        "Let me check.",
        [("get_weather", '{"city": "東京"}'), ("get_time", '{"tz": "Asia/Tokyo"}')],
    ),
    (False, "<think>\nr\n</think>\n\n" + block("f", '{"a": "</think>"}'), "r", None, [("f", '{"a": "</think>"}')]),
    (False, block("f", "{}"), None, None, [("f", "{}")]),
]


@pytest.mark.parametrize("opened, text, reasoning, content, calls", COMPOSED)
def test_reasoning_then_tool_calls(opened: bool, text: str, reasoning, content, calls) -> None:
    parser = Qwen3ReasoningParser(prompt_opened_think=opened)
    parsed_reasoning, parsed_content = parser.parse(text)
    assert (parsed_reasoning, *parse_tools(parsed_content or "")) == (reasoning, content, calls)
    for pieces in chunkings(text):
        reasoning_stream, tool_stream = parser.stream(), QwenToolCallParser().stream()
        reasoning_deltas, events = [], []
        for r, c in [reasoning_stream.feed(p) for p in pieces] + [reasoning_stream.finish()]:
            reasoning_deltas.append(r)
            events += tool_stream.feed(c)
        events += tool_stream.finish()
        streamed_content = "".join(e.text for e in events if isinstance(e, ContentDelta)) or None
        streamed_calls = [(c.name, c.arguments) for c in tool_stream.tool_calls]
        assert ("".join(reasoning_deltas) or None, streamed_content, streamed_calls) == (reasoning, content, calls)


# ----------------------------------------------------------------------------------------------- registry


def test_registry_and_finish_reason() -> None:
    assert get_reasoning_parser("qwen3") is Qwen3ReasoningParser
    assert {get_tool_call_parser(n) for n in ("qwen", "qwen25", "hermes")} == {QwenToolCallParser}
    with pytest.raises(ValueError, match="hermes, qwen, qwen25"):
        get_tool_call_parser("mistral")
    with pytest.raises(ValueError, match="qwen3"):
        get_reasoning_parser("granite")
    _, calls = QwenToolCallParser().parse(block("a", "{}") + block("b", "{}"))
    assert len({c.id for c in calls}) == 2
    assert finish_reason(calls, "stop") == "tool_calls"
    assert finish_reason([], "length") == "length"
    assert finish_reason(calls, None) is None
