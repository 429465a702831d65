"""Regressions found in review of structured outputs and echo: one client leaving cancelled another's shared grammar
compilation; echo of out-of-range token ids was a 500; streamed text offsets counted "token_id:N" spellings; a token
the grammar forbade (nothing was allowed) ended up in the output."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .conftest import MODEL, LiveServer, real_engine_server

USER = [{"role": "user", "content": "Speak, ROMEO."}]


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    yield from real_engine_server(tiny_model_dir)


def test_a_client_leaving_does_not_cancel_anothers_grammar(real: LiveServer, monkeypatch):
    grammars = real.engine.engine.grammars
    compile_ = grammars._compile

    def slow(spec):  # a busy grammar pool: the shared compilation is still queued when the first client leaves
        time.sleep(1.0)
        return compile_(spec)

    monkeypatch.setattr(grammars, "_compile", slow)

    def body(title: str) -> dict:
        schema = {"type": "object", "title": title}
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        return {"model": MODEL, "messages": USER, "max_tokens": 5, "response_format": fmt}

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            url = real.url + "/v1/chat/completions"
            busy = [asyncio.create_task(http.post(url, json=body(f"busy{i}"))) for i in range(2)]
            await asyncio.sleep(0.3)
            a = asyncio.create_task(http.post(url, json=body("shared")))
            b = asyncio.create_task(http.post(url, json=body("shared")))
            await asyncio.sleep(0.3)
            a.cancel()
            return await b, await asyncio.gather(*busy)

    b, busy = asyncio.run(main())
    assert b.status_code == 200, (b.status_code, b.text)
    assert [r.status_code for r in busy] == [200, 200]


@pytest.mark.parametrize("prompt", [[99999999999], [2**64], [-3]])
def test_echo_of_token_ids_outside_the_vocabulary_is_a_400(server, engine, prompt):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "echo": True, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"


def test_streamed_text_offsets_with_token_ids_spelled_out(server, engine, client):
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=8, logprobs=1)
    kw["extra_body"] = {"return_tokens_as_token_ids": True}
    whole = client.completions.create(**kw).choices[0].logprobs.text_offset
    streamed = []
    for chunk in client.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.text_offset
    assert streamed == whole


def test_a_token_the_grammar_forbids_is_not_emitted(real: LiveServer):
    url = real.url
    # min_tokens cannot outlast a grammar that is complete: the answer is one of the choices, nothing after it.
    body = {"model": MODEL, "prompt": "ROMEO:", "guided_choice": ["yes", "no"], "min_tokens": 5, "max_tokens": 10}
    r = httpx.post(url + "/v1/completions", json=body | {"temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no"), r.text
    # A grammar that matches nothing: no token is allowed, and none is emitted.
    body = {"model": MODEL, "messages": USER, "guided_grammar": 'root ::= root "a"', "max_tokens": 10}
    r = httpx.post(url + "/v1/chat/completions", json=body | {"temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert not r.json()["choices"][0]["message"]["content"], r.text
