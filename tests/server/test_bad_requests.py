"""Everything a client can get wrong gets a 4xx with OpenAI's error body, never a 500; the server keeps serving."""

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


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hello", **fields}


# (name, method, path, body: dict | bytes | None, status, expected `param` or None to skip the check)
CASES = [
    ("malformed json", "POST", CHAT, b'{"model": "x", "messages": [', 400, None),
    ("body is an array", "POST", CHAT, b"[1, 2]", 400, None),
    ("empty body", "POST", COMPLETIONS, b"", 400, None),
    ("missing messages", "POST", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    ("content is a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, None),
    ("user without content", "POST", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    (
        "image content part",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        None,
    ),  # fmt: skip
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "POST", COMPLETIONS, completion(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens as a string", "POST", CHAT, chat(max_tokens="10"), 400, "max_tokens"),
    ("max_completion_tokens float", "POST", CHAT, chat(max_completion_tokens=2.5), 400, "max_completion_tokens"),
    ("temperature too high", "POST", CHAT, chat(temperature=3.5), 400, "temperature"),
    ("temperature negative", "POST", COMPLETIONS, completion(temperature=-0.1), 400, "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_k below -1", "POST", CHAT, chat(top_k=-2), 400, "top_k"),
    ("presence_penalty out of range", "POST", CHAT, chat(presence_penalty=5), 400, "presence_penalty"),
    ("repetition_penalty zero", "POST", COMPLETIONS, completion(repetition_penalty=0), 400, "repetition_penalty"),
    ("n zero", "POST", CHAT, chat(n=0), 400, "n"),
    ("n too large", "POST", COMPLETIONS, completion(n=1000), 400, "n"),
    ("stream as a string", "POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("stop is a number", "POST", CHAT, chat(stop=7), 400, "stop"),
    ("empty stop string", "POST", CHAT, chat(stop=[""]), 400, None),
    ("negative stop token id", "POST", CHAT, chat(stop_token_ids=[-1]), 400, None),
    ("stop token id outside the vocabulary", "POST", CHAT, chat(stop_token_ids=[10**6]), 400, "stop_token_ids"),
    ("top_k beyond int32", "POST", CHAT, chat(top_k=10**30), 400, "top_k"),
    ("seed beyond int64", "POST", COMPLETIONS, completion(seed=2**70), 400, "seed"),
    ("min_tokens above max_tokens", "POST", CHAT, chat(max_tokens=2, min_tokens=5), 400, None),
    ("top_logprobs too many", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, None),
    ("logprobs is not a bool (chat)", "POST", CHAT, chat(logprobs=3), 400, "logprobs"),
    ("completion logprobs too many", "POST", COMPLETIONS, completion(logprobs=30), 400, "logprobs"),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400, None),
    ("prompt + max_tokens too long", "POST", CHAT, chat(max_tokens=100_000), 400, "max_tokens"),
    ("prompt alone too long", "POST", COMPLETIONS, completion(prompt=list(range(600))), 400, "prompt"),
    ("token id outside the vocabulary", "POST", COMPLETIONS, completion(prompt=[1, 99999], max_tokens=4), 400, None),
    ("same, streaming", "POST", COMPLETIONS, completion(prompt=[99999], max_tokens=4, stream=True), 400, None),
    ("negative token id", "POST", COMPLETIONS, completion(prompt=[3, -1]), 400, None),
    ("empty prompt", "POST", COMPLETIONS, completion(prompt=""), 400, None),
    ("empty prompt list", "POST", COMPLETIONS, completion(prompt=[]), 400, None),
    ("prompt of mixed types", "POST", COMPLETIONS, completion(prompt=[1, "a"]), 400, "prompt"),
    ("suffix", "POST", COMPLETIONS, completion(suffix="end"), 400, None),
    ("prompt_logprobs with stream", "POST", COMPLETIONS, completion(prompt_logprobs=1, stream=True), 400, None),
    ("max_tokens zero on chat", "POST", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("best_of", "POST", COMPLETIONS, completion(best_of=3), 400, None),
    ("logit_bias", "POST", CHAT, chat(logit_bias={"5": 10}), 400, None),
    ("response_format json_schema", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400, None),
    ("tool_choice required without tools", "POST", CHAT, chat(tool_choice="required"), 400, None),
    (
        "tool_choice names an unknown function",
        "POST",
        CHAT,
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
        400,
        None,
    ),  # fmt: skip
    ("tool without a name", "POST", CHAT, chat(tools=[{"type": "function", "function": {}}]), 400, None),
    ("reserved chat_template_kwargs", "POST", CHAT, chat(chat_template_kwargs={"tokenize": True}), 400, None),
    ("unknown model", "POST", CHAT, chat(model="gpt-4o"), 404, "model"),
    ("unknown model (completions)", "POST", COMPLETIONS, completion(model="davinci"), 404, "model"),
    ("unknown model card", "GET", "/v1/models/nope", None, 404, "model"),
    ("unknown route", "POST", "/v1/embeddings", {"input": "x"}, 404, None),
    ("unknown top-level route", "GET", "/nothing/here", None, 404, None),
    ("wrong method", "GET", CHAT, None, 405, None),
    ("wrong method on models", "POST", "/v1/models", {}, 405, None),
]


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.mark.parametrize("method, path, body, status, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(
    http: httpx.Client, engine: FakeEngine, method: str, path: str, body, status: int, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    r = http.request(method, path, content=content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_context_length_error_code(server: LiveServer, engine: FakeEngine) -> None:
    r = httpx.post(server.url + CHAT, json=chat(max_tokens=100_000))
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert str(engine.max_model_len) in r.json()["error"]["message"]


def test_still_serving_after_bad_requests(server: LiveServer, http: httpx.Client, engine: FakeEngine) -> None:
    for _, method, path, body, _, _ in CASES:
        content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        http.request(method, path, content=content)
    engine.script("Still here.")
    r = httpx.post(server.url + CHAT, json=chat())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Still here."
    # A form-encoded content type is not held against a valid JSON body (curl -d without -H).
    r = httpx.post(server.url + COMPLETIONS, content=json.dumps(completion()), headers={"content-type": "text/plain"})
    assert r.status_code == 200
    assert not engine.unfinished()


def test_server_bug_is_a_500_in_openai_shape(server: LiveServer, engine: FakeEngine, monkeypatch) -> None:
    async def broken_generate(*args, **kwargs):
        raise RuntimeError("engine exploded")
        yield  # an async generator, like the real one

    monkeypatch.setattr(engine, "generate", broken_generate)
    r = httpx.post(server.url + CHAT, json=chat())
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "exploded" not in r.json()["error"]["message"]  # internals are logged, not returned


def test_error_mid_stream_is_a_final_event(server: LiveServer, engine: FakeEngine, monkeypatch) -> None:
    real_generate = engine.generate

    async def fails_after_two(*args, **kwargs):
        count = 0
        async for out in real_generate(*args, **kwargs):
            yield out
            count += 1
            if count == 2:
                raise RuntimeError("engine exploded")

    engine.script("a long enough answer to fail in the middle of")
    monkeypatch.setattr(engine, "generate", fails_after_two)
    with httpx.stream("POST", server.url + CHAT, json=chat(stream=True)) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert "choices" in json.loads(events[1])  # content went out before the failure
    assert not engine.unfinished()
