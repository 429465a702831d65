"""Parser cases other engines' test suites cover and users hit: a tool call written before `</think>`, a missing
`</tool_call>` (end of output, stop string, next block), a malformed block between good ones, `<think><think>`.

Each case is checked on the parsers (whole text, and streamed at every split point) and through the server, plain and
streaming, with the openai client.
"""

from __future__ import annotations

import json

import openai
import pytest

from nextserve.server.parsers import ContentDelta, Qwen3ReasoningParser, QwenToolCallParser

from .conftest import MODEL
from .fake_engine import FakeEngine
from .test_parsers import chunkings

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
GOOD_W = ("get_weather", '{"city": "Paris"}')
GOOD_T = ("get_time", '{"tz": "UTC"}')
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("get_weather", "get_time")
]
THINKING = {"chat_template_kwargs": {"enable_thinking": True}}


def run(text: str, opened: bool, tools: bool, pieces: list[str]) -> tuple[str | None, str | None, list]:
    """(reasoning, content, [(name, arguments)]) through both parsers, fed `pieces`."""
    r_stream = Qwen3ReasoningParser(prompt_opened_think=opened, tool_calls=tools).stream()
    t_stream = QwenToolCallParser().stream()
    reasoning, content = "", ""
    for r, c in [r_stream.feed(p) for p in pieces] + [r_stream.finish()]:
        reasoning += r
        content += "".join(e.text for e in t_stream.feed(c) if isinstance(e, ContentDelta))
    content += "".join(e.text for e in t_stream.finish() if isinstance(e, ContentDelta))
    return reasoning or None, content or None, [(c.name, c.arguments) for c in t_stream.tool_calls]


# (name, prompt opened <think>, output, reasoning, content, calls)
CASES = [
    (
        "tool call before </think>",
        True,
        f"I should look it up.\n<tool_call>\n{WEATHER}\n</tool_call>\n</think>\n\n",
        "I should look it up.",
        None,
        [GOOD_W],
    ),
    (
        "tool call before </think>, never closed",
        True,
        f"Checking.\n\n<tool_call>\n{WEATHER}\n</tool_call>",
        "Checking.",
        None,
        [GOOD_W],
    ),
    (
        "tool call inside an opened block",
        False,
        f"<think>\nneed data\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call></think>",
        "need data",
        None,
        [GOOD_W, GOOD_T],
    ),
    ("missing </tool_call> at the end", False, f"Sure.\n<tool_call>\n{WEATHER}\n", "", "Sure.", [GOOD_W]),
    ("cut inside </tool_call>", False, f"<tool_call>\n{WEATHER}\n</tool_", "", None, [GOOD_W]),
    (
        "missing </tool_call> before the next block",
        False,
        f"<tool_call>\n{WEATHER}\n<tool_call>\n{TIME}\n</tool_call>",
        "",
        None,
        [GOOD_W, GOOD_T],
    ),
    (
        "malformed block between good ones",
        False,
        f'<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{{"name": "x", oops}}\n</tool_call>\n'
        f"<tool_call>\n{TIME}\n</tool_call>",
        "",
        '\n<tool_call>\n{"name": "x", oops}\n</tool_call>',
        [GOOD_W, GOOD_T],
    ),
    (
        "malformed block first, another shape",
        False,
        f"<tool_call>\n[1, 2]\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>",
        "",
        "<tool_call>\n[1, 2]\n</tool_call>",
        [GOOD_T],
    ),
    (
        "unclosed JSON then a good block",
        False,
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Pa\n</tool_call>\n<tool_call>\n{TIME}\n'
        "</tool_call>",
        "",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\n</tool_call>',
        [GOOD_T],
    ),
    ("<think><think>", False, "<think><think>\nplan\n</think>\n\nDone.", "plan", "Done.", []),
    ("<think><think> in an opened block", True, "<think>\n<think>\nplan</think>Done.", "plan", "Done.", []),
    ("<think> inside the reasoning", True, "a\n<think>\nb\n</think>\n\nc", "a\n\nb", "c", []),
]


@pytest.mark.parametrize("opened, text, reasoning, content, calls", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parser_case(opened: bool, text: str, reasoning, content, calls) -> None:
    expected = (reasoning or None, content, calls)
    r, c = Qwen3ReasoningParser(opened, tool_calls=True).parse(text)
    whole_content, whole_calls = QwenToolCallParser().parse(c or "")
    assert (r, whole_content, [(x.name, x.arguments) for x in whole_calls]) == expected
    for pieces in chunkings(text):
        assert run(text, opened, True, pieces) == expected, pieces


def test_without_tools_a_tool_call_in_the_reasoning_stays_reasoning() -> None:
    text = f"Use <tool_call> like {WEATHER}.\n</think>\n\nOk."
    assert Qwen3ReasoningParser(True).parse(text) == (f"Use <tool_call> like {WEATHER}.", "Ok.")


# ---- through the server -------------------------------------------------------------------------------------
def _stream(client: openai.OpenAI, **kwargs) -> tuple[str, str, list[tuple[str, str]], str]:
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, ["", ""])
                entry[0] += tc.function.name or ""
                entry[1] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return reasoning, content, [tuple(calls[i]) for i in sorted(calls)], finish


SERVER_CASES = [c for c in CASES if c[0] != "<think> inside the reasoning"]


@pytest.mark.parametrize(
    "opened, text, reasoning, content, calls", [c[1:] for c in SERVER_CASES], ids=[c[0] for c in SERVER_CASES]
)
def test_server_case(client: openai.OpenAI, engine: FakeEngine, opened, text, reasoning, content, calls) -> None:
    engine.script(text)
    # The Thinking template opens <think> in the prompt; the Instruct one does not.
    kwargs = {
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": TOOLS,
        "extra_body": THINKING if opened else {},
    }
    r = client.chat.completions.create(model=MODEL, **kwargs)
    message = r.choices[0].message
    got_calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert (message.reasoning_content, message.content, got_calls) == (reasoning or None, content, calls)
    assert r.choices[0].finish_reason == ("tool_calls" if calls else "stop")
    s_reasoning, s_content, s_calls, finish = _stream(client, **kwargs)
    assert (s_reasoning or None, s_content or None) == (reasoning or None, content)
    assert finish == ("tool_calls" if calls else "stop")
    # A block found malformed after its start went out keeps its (skipped) index; the good calls all arrive whole.
    assert [c for c in s_calls if c in calls] == calls


@pytest.mark.parametrize("stream", [False, True])
def test_missing_end_tag_at_a_stop_string(client: openai.OpenAI, engine: FakeEngine, stream: bool) -> None:
    engine.script(f"<tool_call>\n{WEATHER}\n</tool_call> and then some more text")
    kwargs = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS, "stop": ["</tool_call>"]}
    if stream:
        _, content, calls, finish = _stream(client, **kwargs)
    else:
        r = client.chat.completions.create(model=MODEL, **kwargs)
        content = r.choices[0].message.content or ""
        calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
        finish = r.choices[0].finish_reason
    assert (content, calls, finish) == ("", [GOOD_W], "tool_calls")
    assert json.loads(calls[0][1]) == {"city": "Paris"}
