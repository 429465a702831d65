"""Guided decoding through the real server with the official openai client, on the built-in model (whose free text
is Shakespeare-flavoured noise, so only the grammar can make an answer valid), with and without NEXTN: json_schema
answers parse into their schema every time (also with `.parse()` and streaming), json_object / regex / choice /
EBNF on chat and completions, tool_choice "required" and named always give valid calls of the right tool (one with
parallel_tool_calls=false), a schema xgrammar cannot compile is a 400 naming it; and, over the fake engine, which
field each request shape sets and that a thinking prompt starts the grammar after </think>."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pydantic
import pytest
from schema_check import SCHEMAS, validate

from nextserve.config import EngineConfig
from nextserve.engine.async_engine import AsyncEngine
from nextserve.engine.engine import Engine

from .conftest import MODEL, LiveServer
from .fake_engine import FakeEngine

USER = [{"role": "user", "content": "Speak, ROMEO."}]
SAMPLED = {"temperature": 1.0, "max_tokens": 400}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_room",
            "parameters": {
                "type": "object",
                "properties": {
                    "guests": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"name": {"type": "string", "maxLength": 8}, "vip": {"type": "boolean"}},
                            "required": ["name", "vip"],
                            "additionalProperties": False,
                        },
                        "minItems": 1,
                        "maxItems": 2,
                    }
                },
                "required": ["guests"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module", params=["plain", "nextn"])
def real(request):
    """The built-in model (it has MTP weights) over the real engine, plain and with NEXTN."""
    spec = {"speculative_algorithm": "NEXTN", "speculative_num_steps": 2} if request.param == "nextn" else {}
    cfg = EngineConfig(dtype="float32", device="cpu", disable_tqdm=True, **spec)
    live = LiveServer(AsyncEngine(Engine(cfg)), reasoning_parser="qwen3", tool_call_parser="qwen")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(real):
    return openai.OpenAI(base_url=real.url + "/v1", api_key="none", max_retries=0)


def parallel(fn, jobs):
    """Runs the requests concurrently, so that constrained requests share batches."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, jobs))


def stream_text(stream) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


def schema_format(i: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}


def test_json_schema_every_time(client):
    def ask(i):
        r = client.chat.completions.create(
            model=MODEL, messages=USER, response_format=schema_format(i % 3), seed=i, **SAMPLED
        )
        return i % 3, r.choices[0]

    for i, choice in parallel(ask, range(20)):
        assert choice.finish_reason == "stop", choice.message.content
        validate(json.loads(choice.message.content), SCHEMAS[i])


def test_json_schema_streaming(client):
    def ask(i):
        stream = client.chat.completions.create(
            model=MODEL, messages=USER, response_format=schema_format(i % 3), seed=100 + i, stream=True, **SAMPLED
        )
        return i % 3, *stream_text(stream)

    for i, text, reason in parallel(ask, range(9)):
        assert reason == "stop", text
        validate(json.loads(text), SCHEMAS[i])


class Character(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    role: Literal["king", "queen", "fool"]
    lines: list[bool] = pydantic.Field(max_length=3)


def test_sdk_parse(client):
    for seed in range(3):
        r = client.chat.completions.parse(model=MODEL, messages=USER, response_format=Character, seed=seed, **SAMPLED)
        assert isinstance(r.choices[0].message.parsed, Character)


def test_json_object_regex_choice_grammar_chat_and_completions(client):
    regex = r"[A-Z][a-z]{1,6} (loves|hates) [A-Z][a-z]{1,6}\."
    cases = [
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"extra_body": {"guided_json": SCHEMAS[0]}}, lambda t: validate(json.loads(t), SCHEMAS[0]) is None),
        ({"extra_body": {"guided_regex": regex}}, lambda t: re.fullmatch(regex, t)),
        ({"extra_body": {"guided_choice": ["Verona", "Mantua"]}}, lambda t: t in ("Verona", "Mantua")),
        ({"extra_body": {"structured_outputs": {"choice": ["aye", "nay"]}}}, lambda t: t in ("aye", "nay")),
        ({"extra_body": {"structured_outputs": {"regex": r"\d{3}-\d{2}"}}}, lambda t: re.fullmatch(r"\d{3}-\d{2}", t)),
        ({"extra_body": {"guided_grammar": 'root ::= ("O " [a-z]+ "!")+'}}, lambda t: re.fullmatch(r"(O [a-z]+!)+", t)),
    ]
    for kwargs, ok in cases:
        for seed in range(2):
            r = client.chat.completions.create(model=MODEL, messages=USER, seed=seed, **SAMPLED, **kwargs)
            text = r.choices[0].message.content
            # json_object is unbounded: only a finished answer must parse (the others always finish).
            if r.choices[0].finish_reason == "length" and "response_format" in kwargs:
                continue
            assert r.choices[0].finish_reason == "stop" and ok(text), (kwargs, text)
            # Completions: vLLM's fields and response_format (which OpenAI's completions lack) alike.
            body = kwargs.get("extra_body") or {"response_format": kwargs["response_format"]}
            c = client.completions.create(model=MODEL, prompt="ROMEO:", seed=seed, extra_body=body, **SAMPLED)
            if c.choices[0].finish_reason == "length" and "response_format" in kwargs:
                continue
            assert c.choices[0].finish_reason == "stop" and ok(c.choices[0].text), (body, c.choices[0].text)


def check_calls(calls, name: str | None):
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.function.name in PARAMS
        assert name is None or call.function.name == name
        validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "get_weather", "book_room"])
def test_tool_choice_is_enforced(client, stream, choice):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    name = None if choice == "required" else choice

    def ask(seed):
        kwargs = {"parallel_tool_calls": False} if seed % 2 else {}
        if stream:
            kwargs["stream_options"] = {"include_usage": True}
        r = client.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice, seed=seed, stream=stream, **kwargs,
            **SAMPLED,
        )  # fmt: skip
        if not stream:
            m = r.choices[0].message
            return seed, m.tool_calls, r.choices[0].finish_reason, m.content, r.usage.completion_tokens
        calls, reason, content, used = {}, None, "", None
        for chunk in r:
            used = chunk.usage.completion_tokens if chunk.usage else used
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
            for d in delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": None, "arguments": ""})
                entry["name"] = d.function.name or entry["name"]
                entry["arguments"] += d.function.arguments or ""
        fn = [
            openai.types.chat.ChatCompletionMessageFunctionToolCall(
                id="x", type="function", function={"name": c["name"], "arguments": c["arguments"]}
            )
            for _, c in sorted(calls.items())
        ]
        return seed, fn, reason, content or None, used

    for seed, calls, reason, content, used in parallel(ask, range(6)):
        assert reason == "tool_calls", (calls, content)
        if seed % 2 or name is not None:
            assert len(calls) == 1 and not content and used < SAMPLED["max_tokens"]
        elif used == SAMPLED["max_tokens"]:
            # "required" with parallel calls: the noise model may keep calling until max_tokens cuts the last
            # block, which is content (or, streamed, a call whose start already went out); the others are valid.
            assert not content or content.lstrip().startswith("<tool_call>")
            calls = calls[:-1] if stream else calls
        check_calls(calls, name)


def test_uncompilable_schema_is_a_400_naming_it(client):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objectx"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, response_format=bad, max_tokens=8)
    assert "objectx" in e.value.message and e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=8, extra_body={"guided_regex": "(unclosed"})
    assert "parenthesis" in e.value.message and e.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=8, stream=True, extra_body={"guided_grammar": "root ::= nothing"}
        )
    assert "nothing" in e.value.message and e.value.body["param"] == "guided_grammar"


# ---- what the server asks of the engine (fake engine) --------------------------------------------------------
@pytest.fixture(scope="module")
def fake(tokenizer):
    live = LiveServer(FakeEngine(tokenizer, max_model_len=4096), reasoning_parser="qwen3", tool_call_parser="qwen")
    yield live
    live.stop()


def sent(fake, **kwargs):
    engine: FakeEngine = fake.engine
    engine.script('{"a": 1}')
    c = openai.OpenAI(base_url=fake.url + "/v1", api_key="none", max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, **kwargs)
    return engine.records[r.id].params.structured


def test_request_shapes_map_to_one_constraint(fake):
    assert sent(fake) is None
    assert sent(fake, response_format={"type": "text"}) is None
    assert sent(fake, response_format={"type": "json_object"}).json_object
    assert sent(fake, response_format=schema_format(1)).json == SCHEMAS[1]
    assert sent(fake, extra_body={"structured_outputs": {"json": SCHEMAS[2]}}).json == SCHEMAS[2]
    assert sent(fake, extra_body={"guided_choice": ["a", "b"]}).choice == ("a", "b")
    tag = sent(fake, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "book_room"}})
    fmt = tag.structural_tag["format"]
    assert fmt["stop_after_first"] and [t["begin"] for t in fmt["tags"]] == [
        '<tool_call>\n{"name": "book_room", "arguments": '
    ]
    fmt = sent(fake, tools=TOOLS, tool_choice="required").structural_tag["format"]
    assert len(fmt["tags"]) == 2 and not fmt["stop_after_first"] and fmt["at_least_one"]
    fmt = sent(fake, tools=TOOLS, tool_choice="required", parallel_tool_calls=False).structural_tag["format"]
    assert fmt["stop_after_first"]
    assert sent(fake, tools=TOOLS, tool_choice="auto") is None
    # Instruct-style prompt: constrained from the first token; thinking prompt: after </think>.
    assert sent(fake, response_format={"type": "json_object"}).start_after is None
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    assert sent(fake, response_format={"type": "json_object"}, extra_body=thinking).start_after == "</think>"
    assert sent(fake, tools=TOOLS, tool_choice="required", extra_body=thinking).start_after == "</think>"


def test_conflicting_constraints_are_400(fake):
    c = openai.OpenAI(base_url=fake.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model=MODEL, messages=USER, response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}
        )
    assert e.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}
        )
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_schema"})
    assert e.value.body["param"] == "response_format"


def test_responses_text_format_and_forced_tool(client):
    """/v1/responses: text.format json_schema is enforced like chat's response_format, tool_choice too."""
    fmt = {"type": "json_schema", "name": "s0", "schema": SCHEMAS[0], "strict": True}
    for seed in range(3):
        r = client.responses.create(
            model=MODEL, input="Speak, ROMEO.", text={"format": fmt}, temperature=1.0, max_output_tokens=400,
            extra_body={"seed": seed},
        )  # fmt: skip
        validate(json.loads(r.output_text), SCHEMAS[0])
    tool = {"type": "function", **TOOLS[0]["function"]}
    r = client.responses.create(
        model=MODEL, input="Weather?", tools=[tool], tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, max_output_tokens=400,
    )  # fmt: skip
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    validate(json.loads(calls[0].arguments), PARAMS["get_weather"])
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=MODEL, input="x", max_output_tokens=8,
            text={"format": {"type": "json_schema", "name": "b", "schema": {"type": "objectx"}}},
        )  # fmt: skip
    assert "objectx" in e.value.message and e.value.body["param"] == "text.format"
