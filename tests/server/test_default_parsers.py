"""A plain `nextserve serve` parses Qwen3-Next's tool calls and reasoning; `none` turns either parser off; with the
Instruct template (no <think> in the output) the reasoning parser leaves the text exactly as it was."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from nextserve.server import serve

from .conftest import MODEL
from .fake_engine import FakeEngine

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
USER = [{"role": "user", "content": "Weather in Paris?"}]


@contextmanager
def served(tokenizer, argv: list[str], script: str) -> Iterator[httpx.Client]:
    """`nextserve serve ARGV` as the command builds it, over a FakeEngine playing `script`."""
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--log-level", "warning", *argv])
    serve.resolve_model_arg(args)
    args.reasoning_parser = serve.parser_name(args.reasoning_parser)
    args.tool_call_parser = serve.parser_name(args.tool_call_parser)
    engine = FakeEngine(tokenizer)
    engine.script(script)
    server = serve.build_server(engine, args)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_defaults_are_qwen3_and_qwen() -> None:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.reasoning_parser, args.tool_call_parser) == ("qwen3", "qwen")
    args = parser.parse_args(["--reasoning-parser", "none", "--tool-call-parser", "None"])
    assert serve.parser_name(args.reasoning_parser) is None and serve.parser_name(args.tool_call_parser) is None


@pytest.mark.parametrize("stream", [False, True])
def test_plain_serve_accepts_tools(tokenizer, stream: bool) -> None:
    with served(tokenizer, [], "Let me check.\n" + CALL) as http:
        r = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": USER, "tools": [TOOL], "stream": stream}
        )
        assert r.status_code == 200, r.text
        if not stream:
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check."
            assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        else:
            assert '"tool_calls":[{"index":0' in r.text and '"finish_reason":"tool_calls"' in r.text


INSTRUCT_OUTPUTS = ["\n\nPlain answer.\n", "a </think> b", "  <thin", "x<think>y</think>z", "4"]


@pytest.mark.parametrize("text", INSTRUCT_OUTPUTS)
def test_instruct_output_passes_through_the_reasoning_parser(tokenizer, text: str) -> None:
    with served(tokenizer, [], text) as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
        message = r.json()["choices"][0]["message"]
        assert message["content"] == text and message["reasoning_content"] is None
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": True})
        assert "reasoning_content" not in r.text
        content = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in r.text.splitlines()
            if line.startswith("data: {")
        )
        assert content == text


def test_tool_call_parser_none(tokenizer) -> None:
    with served(tokenizer, ["--tool-call-parser", "none"], CALL) as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "tools": [TOOL]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "tool_choice": "none"})
        assert r.json()["choices"][0]["message"]["content"] == CALL


def test_reasoning_parser_none(tokenizer) -> None:
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    with served(tokenizer, ["--reasoning-parser", "none"], "hmm</think>\n\nFour.") as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **thinking})
        message = r.json()["choices"][0]["message"]
        assert message["content"] == "hmm</think>\n\nFour." and "reasoning_content" not in message
    with served(tokenizer, [], "hmm</think>\n\nFour.") as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **thinking})
        message = r.json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == ("hmm", "Four.")
