"""The server over the real engine (tiny random fp32 model, CPU): the OpenAI client end to end, prefix-cache hit
figures from `usage.prompt_tokens_details.cached_tokens`, and 64 concurrent streams with disconnects that leave
no page or slot in use."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest
import torch

from nextserve.config import EngineConfig
from nextserve.engine.async_engine import AsyncEngine
from nextserve.engine.engine import Engine

from .conftest import MODEL, LiveServer

INTERVAL = 64


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    cfg = EngineConfig(
        model=str(tiny_model_dir),
        dtype="float32",
        device="cpu",
        disable_tqdm=True,
        page_size=16,
        prefix_snapshot_interval=INTERVAL,
        json_model_override_args='{"max_position_embeddings": 4096}',
    )
    engine = AsyncEngine(Engine(cfg))
    live = LiveServer(engine, reasoning_parser="qwen3", tool_call_parser="qwen")
    yield live
    live.stop()


@pytest.fixture
def client(real):
    return openai.OpenAI(base_url=real.url + "/v1", api_key="none")


def ids(n, seed):
    return torch.randint(10, 1200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_chat_completion_and_stream(client):
    msgs = [{"role": "user", "content": "Speak, ROMEO."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 6
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (r.choices[0].message.content or "")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def stop_across_a_token_boundary(tokens: list[str], start: int) -> tuple[int, str]:
    """A stop string that a greedy run will meet, made of two of its own tokens: tokens[k] + tokens[k + 1] for the
    first k >= start where both are plain printable ASCII and the first is not blank. Returns (k + 1, the string):
    the run must stop by token k + 1."""

    def plain(t: str) -> bool:
        return t.isascii() and t.isprintable()

    ok = [plain(a) and plain(b) and a.strip() for a, b in zip(tokens, tokens[1:])]
    k = next(i for i in range(start, len(ok)) if ok[i])
    return k + 1, tokens[k] + tokens[k + 1]


def test_completions_n2_logprobs_stop(client):
    r = client.completions.create(
        model=MODEL, prompt=ids(20, 1), max_tokens=5, n=2, temperature=1.0, seed=3, logprobs=2
    )
    assert len(r.choices) == 2 and all(len(c.logprobs.tokens) <= 5 for c in r.choices)
    # Stop strings: a first greedy run (EOS ignored, so it runs 12 tokens); two of its own tokens, from the fourth
    # on, as the stop string of a second run, which must end where that text first appears.
    kw = dict(model=MODEL, prompt=ids(20, 1), max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    greedy = client.completions.create(logprobs=0, **kw).choices[0]
    text = greedy.text
    assert greedy.finish_reason == "length" and len(greedy.logprobs.tokens) == 12
    k, stop = stop_across_a_token_boundary(greedy.logprobs.tokens, 3)
    cut = client.completions.create(stop=[stop, "\x00never"], **kw)
    assert cut.choices[0].finish_reason == "stop", (text, stop)
    assert cut.choices[0].model_extra["stop_reason"] == stop
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.usage.completion_tokens <= k + 1 < 12


def test_chat_stop_strings_and_max_tokens(client):
    """The engine's own stop-string and max_tokens handling through the chat endpoint (test_app.py checks the
    server's translation over a scripted engine)."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Speak, ROMEO."}], temperature=0)
    kw["extra_body"] = {"ignore_eos": True}
    greedy = client.chat.completions.create(max_tokens=12, logprobs=True, **kw).choices[0]
    text = greedy.message.content
    assert greedy.finish_reason == "length" and text == "".join(e.token for e in greedy.logprobs.content)
    k, stop = stop_across_a_token_boundary([e.token for e in greedy.logprobs.content], 3)
    r = client.chat.completions.create(max_tokens=12, stop=[stop, "\x00never"], **kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.usage.completion_tokens <= k + 1 < 12
    got = list(client.chat.completions.create(max_tokens=12, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == text[: text.index(stop)]
    assert [c.choices[0].finish_reason for c in got if c.choices and c.choices[0].finish_reason] == ["stop"]
    r = client.chat.completions.create(max_tokens=2, **kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_identical_prompt_reuses_all_but_an_interval(client):
    p = ids(300, 2)
    first = client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
    second = client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
    assert cached(first.usage) == 0
    assert cached(second.usage) >= 300 - INTERVAL
    assert second.choices[0].text == first.choices[0].text


def test_cached_tokens_in_chat_usage(client):
    """usage.prompt_tokens_details.cached_tokens of a resubmitted chat prompt of 300+ tokens, plain and streamed
    (test_app.py checks the server's translation over a scripted engine)."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Thou art a prefix, cached and kept. " * 30}])
    kw.update(max_tokens=2, temperature=0)
    first = client.chat.completions.create(**kw)
    n = first.usage.prompt_tokens
    assert n >= 300
    second = client.chat.completions.create(**kw)
    streamed = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert cached(first.usage) < n - INTERVAL <= cached(second.usage) < n
    assert n - INTERVAL <= cached(streamed[-1].usage) < n


def test_multi_turn_reuses_previous_prompt_and_reply(client):
    prompt, previous = ids(100, 3), 0
    for k in range(3):
        r = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            logprobs=0,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )
        reply = [int(re.fullmatch(r"token_id:(\d+)", t).group(1)) for t in r.choices[0].logprobs.tokens]
        if k:
            assert cached(r.usage) >= previous - INTERVAL
        previous = len(prompt) + len(reply)
        prompt = prompt + reply + ids(30, 10 + k)


def test_shared_system_prompt_of_2000_tokens(client):
    system = ids(2000, 4)
    usages = [
        client.completions.create(model=MODEL, prompt=system + ids(5, 20 + i), max_tokens=2, temperature=0).usage
        for i in range(4)
    ]
    assert all(cached(u) >= 2000 - INTERVAL for u in usages[1:])


def metric(text: str, name: str) -> float:
    m = re.search(rf"^nextserve:{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1))


def test_64_streams_with_disconnects_leave_nothing_in_use(real):
    async def one(i: int, http: httpx.AsyncClient) -> str:
        body = {
            "model": MODEL,
            "prompt": ids(10 + i, 100 + i),
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        async with http.stream("POST", real.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done"
                seen += bool(json.loads(line[6:])["choices"])
                if i % 4 == 0 and seen >= 3:
                    return "left"  # closing the stream mid-way: the server must abort the request
        return "cut"

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(i, http) for i in range(64)))

    results = asyncio.run(main())
    assert results.count("left") == 16 and results.count("done") == 48
    stats = {}
    for _ in range(200):  # aborts are applied by the engine thread between steps
        text = httpx.get(real.url + "/metrics").text
        stats = {k: metric(text, k) for k in ("kv_pages_used", "state_slots_used", "num_requests_running")}
        if not any(stats.values()):
            break
        asyncio.run(asyncio.sleep(0.05))
    assert stats == {"kv_pages_used": 0, "state_slots_used": 0, "num_requests_running": 0}
    real.engine.engine.check_integrity()
