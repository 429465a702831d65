"""The server end to end: the official openai client against a live uvicorn server over the FakeEngine."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time

import httpx
import openai
import pytest

from nextserve.assets import default_model_path
from nextserve.server import serve
from nextserve.server.app import build_app

from .conftest import API_KEY, MODEL, LiveServer
from .fake_engine import CACHE_PAGE, FakeEngine

USER = [{"role": "user", "content": "What is 2 + 2?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CALL_SCRIPT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
)


def collect_chat_stream(stream) -> dict[int, dict]:
    """Per choice index: joined content / reasoning, tool calls by index, finish reason; plus every chunk."""
    choices: dict[int, dict] = {}
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            st = choices.setdefault(c.index, {"content": "", "reasoning": "", "calls": {}, "finish": None, "lp": []})
            d = c.delta
            st["content"] += d.content or ""
            st["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                call = st["calls"].setdefault(tc.index, {"id": None, "name": None, "arguments": "", "order": []})
                if tc.id:
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                    call["order"].append("name")
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
                    call["order"].append("args")
            if c.logprobs and c.logprobs.content:
                st["lp"] += c.logprobs.content
            if c.finish_reason:
                assert st["finish"] is None, "finish_reason sent twice"
                st["finish"] = c.finish_reason
    choices[-1] = {"chunks": chunks}
    return choices


def prompt_len(tokenizer, messages, **kwargs) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return len(tokenizer.encode(text, add_special_tokens=False))


# ---- chat ---------------------------------------------------------------------------------------------------
def test_chat_non_streaming(client: openai.OpenAI, engine: FakeEngine, tokenizer) -> None:
    engine.script("Four, of course.")
    r = client.chat.completions.create(model=MODEL, messages=USER)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.content == "Four, of course."
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == prompt_len(tokenizer, USER)
    assert r.usage.completion_tokens == len(tokenizer.encode("Four, of course."))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # What the engine received: the chat template's rendering, and unset sampling fields left to the engine.
    rec = engine.records[r.id]
    assert tokenizer.decode(rec.prompt_token_ids).endswith("<|im_start|>assistant\n")
    assert rec.params.temperature is None and rec.params.top_p is None and rec.params.top_k is None
    assert rec.params.max_tokens == engine.max_model_len - r.usage.prompt_tokens


def test_chat_sampling_fields_reach_the_engine(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0.5, top_p=0.9, seed=7, max_completion_tokens=5,
        presence_penalty=0.5, extra_body={"top_k": 20, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 2},
    )  # fmt: skip
    p = engine.records[r.id].params
    assert (p.temperature, p.top_p, p.seed, p.max_tokens, p.presence_penalty) == (0.5, 0.9, 7, 5, 0.5)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens) == (20, 0.1, 1.1, 2)


def test_chat_streaming_with_usage_last(client: openai.OpenAI, engine: FakeEngine, tokenizer) -> None:
    engine.script("Streaming works fine here.")
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    got = collect_chat_stream(stream)
    chunks = got[-1]["chunks"]
    assert got[0]["content"] == "Streaming works fine here."
    assert got[0]["finish"] == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 4, "expected several content chunks"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(tokenizer.encode("Streaming works fine here."))
    assert last.usage.prompt_tokens == prompt_len(tokenizer, USER)


def test_raw_stream_ends_with_done(server: LiveServer, engine: FakeEngine) -> None:
    body = {"model": MODEL, "messages": USER, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:])  # not asked for


def test_chat_n2(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script("First sample.", "Second sample, longer.")
    r = client.chat.completions.create(model=MODEL, messages=USER, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == ["First sample.", "Second sample, longer."]
    got = collect_chat_stream(client.chat.completions.create(model=MODEL, messages=USER, n=2, stream=True))
    assert got[0]["content"] == "First sample." and got[1]["content"] == "Second sample, longer."
    assert got[0]["finish"] == got[1]["finish"] == "stop"


def last_params(engine: FakeEngine):
    return list(engine.records.values())[-1].params


def test_stop_strings_and_max_tokens(client: openai.OpenAI, engine: FakeEngine) -> None:
    """The server's part: stop and max_tokens reach the engine's SamplingParams, and the engine's text, finish and
    stop reasons come back as sent, plain and streamed. (Stopping itself is the engine's: the FakeEngine plays it
    here; test_real_engine.py::test_chat_stop_strings_and_max_tokens checks the real one.)"""
    engine.script("one two three four five")
    r = client.chat.completions.create(model=MODEL, messages=USER, stop=[" three", "nine"])
    assert last_params(engine).stop == [" three", "nine"]
    assert r.choices[0].message.content == "one two"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == " three"
    got = collect_chat_stream(client.chat.completions.create(model=MODEL, messages=USER, stop=" four", stream=True))
    assert last_params(engine).stop == [" four"]
    assert got[0]["content"] == "one two three" and got[0]["finish"] == "stop"
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert last_params(engine).max_tokens == 2
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_chat_logprobs(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script("Log probs here.")
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == "Log probs here."
    for e in content:
        assert e.logprob < 0 and bytes(e.bytes).decode() == e.token
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    got = collect_chat_stream(client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, stream=True))
    assert "".join(e.token for e in got[0]["lp"]) == "Log probs here."
    assert all(e.top_logprobs == [] for e in got[0]["lp"])
    assert client.chat.completions.create(model=MODEL, messages=USER).choices[0].logprobs is None


def test_logprob_bytes_of_a_split_character(client: openai.OpenAI, engine: FakeEngine, tokenizer) -> None:
    # The tiny vocabulary has no merge for "é": its two UTF-8 bytes are two tokens.
    engine.script("é")
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == "é"
    assert bytes(b for e in content for b in e.bytes) == "é".encode()


def test_cached_tokens_in_usage(client: openai.OpenAI, engine: FakeEngine) -> None:
    """The server reports the engine's num_cached_tokens as usage.prompt_tokens_details.cached_tokens, plain and
    streamed (the figures are the FakeEngine's; test_real_engine.py::test_cached_tokens_in_chat_usage checks the
    real prefix cache's)."""
    messages = [{"role": "user", "content": "A long and rather unusual question about prefix caching " * 3}]
    first = client.chat.completions.create(model=MODEL, messages=messages)
    second = client.chat.completions.create(model=MODEL, messages=messages)
    n = second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // CACHE_PAGE * CACHE_PAGE
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    usage = list(stream)[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == (n - 1) // CACHE_PAGE * CACHE_PAGE


# ---- reasoning and tools ------------------------------------------------------------------------------------
def test_reasoning_with_enable_thinking(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script("The user adds two and two.\n</think>\n\nThe answer is 4.")
    kwargs = {"model": MODEL, "messages": USER, "extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}
    r = client.chat.completions.create(**kwargs)
    msg = r.choices[0].message
    assert msg.reasoning_content == "The user adds two and two."
    assert msg.content == "The answer is 4."
    got = collect_chat_stream(client.chat.completions.create(stream=True, **kwargs))
    assert got[0]["reasoning"] == "The user adds two and two."
    assert got[0]["content"] == "The answer is 4."
    # Without thinking the prompt does not open <think>: the output is all content.
    engine.script("Just 4.")
    r = client.chat.completions.create(model=MODEL, messages=USER)
    assert r.choices[0].message.content == "Just 4." and r.choices[0].message.reasoning_content is None


def test_tool_calls_non_streaming(client: openai.OpenAI, engine: FakeEngine, tokenizer) -> None:
    engine.script(TOOL_CALL_SCRIPT)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    assert "get_weather" in tokenizer.decode(engine.records[r.id].prompt_token_ids)  # the template saw the tools


def test_tool_calls_streaming(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script(TOOL_CALL_SCRIPT)
    got = collect_chat_stream(
        client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], stream=True)
    )
    assert got[0]["finish"] == "tool_calls"
    assert got[0]["content"] == "Let me check."
    call = got[0]["calls"][0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["arguments"]) == {"city": "Paris", "unit": "C"}
    assert call["order"][0] == "name" and call["order"].count("args") > 1, "arguments should stream after the name"


def test_tool_call_after_reasoning_streaming(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script("I need the weather.</think>\n\n" + TOOL_CALL_SCRIPT)
    got = collect_chat_stream(
        client.chat.completions.create(
            model=MODEL, messages=USER, tools=[WEATHER_TOOL], stream=True,
            extra_body={"chat_template_kwargs": {"enable_thinking": True}},
        )
    )  # fmt: skip
    assert got[0]["reasoning"] == "I need the weather."
    assert got[0]["calls"][0]["name"] == "get_weather" and got[0]["finish"] == "tool_calls"


def test_tool_choice_none_does_not_parse(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script(TOOL_CALL_SCRIPT)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="none")
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None
    assert "<tool_call>" in r.choices[0].message.content


def test_tool_conversation_round_trip(client: openai.OpenAI, engine: FakeEngine, tokenizer) -> None:
    engine.script("It is sunny in Paris.")
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny, 21C"}]},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="required")
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    prompt = tokenizer.decode(engine.records[r.id].prompt_token_ids)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in prompt


# ---- completions --------------------------------------------------------------------------------------------
def test_completions(client: openai.OpenAI, engine: FakeEngine, tokenizer) -> None:
    engine.script(" and then some text.")
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=50)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == " and then some text." and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    ids = tokenizer.encode("Once upon a time")
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=50)
    assert engine.records[r2.id + "-0"].prompt_token_ids == ids and r2.choices[0].text == r.choices[0].text


def test_completions_batch_n2_and_logprobs(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script("A a", "B b b")
    r = client.completions.create(model=MODEL, prompt=["first", "second"], n=2, logprobs=2, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == ["A a", "B b b", "A a", "B b b"]
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    lp = r.choices[1].logprobs
    assert "".join(lp.tokens) == "B b b"
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    # logprobs=0: no alternatives, but each entry still holds the chosen token.
    lp = client.completions.create(model=MODEL, prompt="x", logprobs=0, max_tokens=10).choices[0].logprobs
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    # Token-id batches too.
    r = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=10)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5


def test_completions_streaming_batch(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.script("streamed completion text")
    stream = client.completions.create(
        model=MODEL, prompt=["a", "b"], n=2, stream=True, stream_options={"include_usage": True}, logprobs=1
    )
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    offsets: dict[int, list[int]] = {}
    chunks = list(stream)
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        [c] = chunk.choices
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.logprobs:
            offsets.setdefault(c.index, []).extend(c.logprobs.text_offset)
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert texts == {i: "streamed completion text" for i in range(4)}
    assert finish == {i: "stop" for i in range(4)}
    assert all(o == sorted(o) and o[0] == 0 for o in offsets.values())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(len(o) for o in offsets.values())


# ---- models, health, metrics, auth --------------------------------------------------------------------------
def test_models_and_unknown_model(client: openai.OpenAI, engine: FakeEngine) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=USER)
    assert e.value.body["code"] == "model_not_found"


def test_metrics(server: LiveServer, client: openai.OpenAI, engine: FakeEngine) -> None:
    client.chat.completions.create(model=MODEL, messages=USER)
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["nextserve:kv_pages_total"] == 64 and values["nextserve:state_slots_total"] == 8
    assert values["nextserve:num_requests_running"] == 0
    assert values['nextserve:request_success_total{finish_reason="stop"}'] >= 1
    assert values['nextserve:request_success_total{finish_reason="length"}'] >= 1
    assert values["nextserve:time_to_first_token_seconds_count"] >= 2
    assert values["nextserve:inter_token_latency_seconds_count"] >= 1
    assert values["nextserve:e2e_request_latency_seconds_count"] >= 2
    assert values["nextserve:prompt_tokens_total"] == engine.stats()["prompt_tokens_total"] > 0
    assert values["nextserve:prefix_cache_hits_total"] == engine.stats()["prefix_cache_hit_tokens"]


def test_api_key(keyed_server: LiveServer) -> None:
    url = keyed_server.url
    assert httpx.get(url + "/health").status_code == 200
    body = {"model": MODEL, "messages": USER}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    with openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0) as c:
        assert c.chat.completions.create(model=MODEL, messages=USER).choices[0].message.content
        # This server has no tool-call parser: tools must be refused unless tool_choice is "none".
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
        r = c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="none")
        assert r.choices[0].finish_reason == "stop"


# ---- disconnects --------------------------------------------------------------------------------------------
def wait_idle(engine: FakeEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.unfinished(), f"requests left running: {engine.unfinished()}"


def test_streaming_clients_that_disconnect_are_aborted(server: LiveServer, engine: FakeEngine) -> None:
    engine.script("word " * 120)
    engine.step_delay = 0.004
    before = set(engine.records)

    async def one(http: httpx.AsyncClient, i: int) -> str:
        quit_early = i % 4 == 0
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"client {i}"}], "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = 0
            async for line in r.aiter_lines():
                if not line:
                    continue
                events += 1
                if quit_early and events == 5:
                    return "closed"  # leaving the block closes the connection mid-stream
                last = line
        return "done" if last == "data: [DONE]" else "truncated"

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            return await asyncio.gather(*(one(http, i) for i in range(16)))

    results = asyncio.run(run())
    assert results.count("closed") == 4 and results.count("done") == 12
    wait_idle(engine)
    fates = [r.status for rid, r in engine.records.items() if rid not in before]
    assert len(fates) == 16
    assert fates.count("finished") == 12 and fates.count("aborted") == 4


def test_non_streaming_client_that_disconnects_is_aborted(server: LiveServer, engine: FakeEngine) -> None:
    engine.script("slow " * 200)
    engine.step_delay = 0.01
    before = set(engine.records)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2}, timeout=0.3)
    wait_idle(engine)
    [rid] = set(engine.records) - before
    assert engine.records[rid].status == "aborted"


# ---- the serve command --------------------------------------------------------------------------------------
def test_serve_flags_and_ready_line(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--reasoning-parser", "qwen3", "--api-key", API_KEY])
    serve.resolve_model_arg(args)
    assert (args.host, args.model, args.log_level) == ("127.0.0.1", default_model_path(), "info")
    assert serve.served_name(args) == "tiny-qwen3-next"
    assert hasattr(args, "max_num_batched_tokens"), "the engine's flags should be added too"
    caplog.set_level(logging.INFO, logger="nextserve.server")
    server = serve.build_server(FakeEngine(tokenizer), args)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("nextserve ready: ")]
        url = line.split()[2]
        assert line.endswith("(model tiny-qwen3-next)") and url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert models["data"][0]["id"] == "tiny-qwen3-next"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_unknown_parser_is_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="reasoning parser"):
        build_app(FakeEngine(tokenizer), served_model_name=MODEL, reasoning_parser="nope")
