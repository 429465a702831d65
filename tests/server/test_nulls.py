"""Explicit JSON null means "default" for every optional field (OpenAI's spec makes them nullable), and every 400
names the offending field in `param`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from .conftest import MODEL, LiveServer
from .fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}

# Optional fields both endpoints share; each sent as null must behave as if left out.
SHARED_NULLS = [
    "model", "n", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids", "min_tokens",
    "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "logit_bias", "best_of", "user",
    "prompt_logprobs",
]  # fmt: skip
CHAT_NULLS = [
    "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "chat_template_kwargs", "response_format", "metadata", "store", "service_tier",
]  # fmt: skip
COMPLETION_NULLS = ["logprobs", "echo", "suffix", "return_tokens_as_token_ids"]


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def _defaults(engine: FakeEngine, rid: str) -> None:
    p = engine.records[rid].params
    assert (p.n, p.temperature, p.top_p, p.top_k, p.seed, p.min_tokens) == (1, None, None, None, None, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.stop, p.stop_token_ids) == (0.0, 0.0, [], [])
    assert (p.ignore_eos, p.skip_special_tokens, p.logprobs, p.prompt_logprobs) == (False, True, None, None)


def test_chat_all_nulls(http: httpx.Client, engine: FakeEngine) -> None:
    engine.script("Four.")
    body = {"messages": USER, **dict.fromkeys(SHARED_NULLS + CHAT_NULLS)}
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["object"] == "chat.completion"  # stream: null is not streaming
    assert reply["choices"][0]["message"]["content"] == "Four." and reply["choices"][0]["logprobs"] is None
    _defaults(engine, reply["id"])


def test_completion_all_nulls(http: httpx.Client, engine: FakeEngine) -> None:
    engine.script(" there")
    body = {"prompt": "hello", **dict.fromkeys(SHARED_NULLS + COMPLETION_NULLS)}
    r = http.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["object"] == "text_completion" and reply["choices"][0]["text"] == " there"
    assert reply["choices"][0]["logprobs"] is None
    _defaults(engine, reply["id"] + "-0")


def test_nulls_inside_messages_and_tools(http: httpx.Client, engine: FakeEngine) -> None:
    messages = [
        {"role": "system", "content": "be brief", "name": None},
        {"role": "user", "content": "weather?", "name": None, "tool_calls": None, "tool_call_id": None},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}],
            "reasoning_content": None,
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": None},
    ]
    tool = {"type": "function", "function": {"name": "lookup", "description": None, "parameters": None, "strict": None}}
    r = http.post(CHAT, json={"messages": messages, "tools": [tool], "stream": True, "stream_options": None})
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")


def test_null_for_a_required_field_is_a_missing_field(http: httpx.Client, engine: FakeEngine) -> None:
    r = http.post(CHAT, json={"model": MODEL, "messages": None})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages" and "required" in r.json()["error"]["message"].lower()


# (name, path, body, expected param)
PARAM_CASES = [
    ("content is a number", CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("user without content", CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("empty stop string", CHAT, {"messages": USER, "stop": [""]}, "stop"),
    ("negative stop token id", CHAT, {"messages": USER, "stop_token_ids": [-1]}, "stop_token_ids"),
    ("min_tokens above max_tokens", CHAT, {"messages": USER, "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ("top_logprobs without logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("stream_options without stream", CHAT, {"messages": USER, "stream_options": {}}, "stream_options"),
    ("token id outside the vocabulary", COMPLETIONS, {"prompt": [1, 99999], "max_tokens": 4}, "prompt"),
    ("negative token id", COMPLETIONS, {"prompt": [3, -1]}, "prompt"),
    ("empty prompt", COMPLETIONS, {"prompt": ""}, "prompt"),
    ("suffix", COMPLETIONS, {"prompt": "x", "suffix": "end"}, "suffix"),
    ("prompt_logprobs with stream", CHAT, {"messages": USER, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("prompt_logprobs above 20", COMPLETIONS, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("best_of", COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of"),
    ("logit_bias", CHAT, {"messages": USER, "logit_bias": {"5": 10}}, "logit_bias"),
    ("response_format", CHAT, {"messages": USER, "response_format": {"type": "json_schema"}}, "response_format"),
    ("tool_choice without tools", CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    (
        "tool_choice names an unknown function",
        CHAT,
        {"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("tool without a name", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {}}]}, None),
]


@pytest.mark.parametrize("path, body, param", [c[1:] for c in PARAM_CASES], ids=[c[0] for c in PARAM_CASES])
def test_400_names_the_field(http: httpx.Client, engine: FakeEngine, path: str, body: dict, param: str | None) -> None:
    r = http.post(path, content=json.dumps({"model": MODEL, **body}))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == (param or "tools[0].function.name"), error
    assert error["message"].startswith(error["param"]) or error["param"].split("[")[0] in error["message"]


@pytest.mark.parametrize("part_type", ["image_url", "input_image"])
def test_image_part_says_images_are_not_supported(http: httpx.Client, engine: FakeEngine, part_type: str) -> None:
    content = [{"type": "text", "text": "what is this?"}, {"type": part_type, "image_url": {"url": "data:,"}}]
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages[0].content[1].type"
    assert "images are not supported" in error["message"]
