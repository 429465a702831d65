"""A tiny OpenAI-compatible server for the tests of the benchmark and evaluation tools.

It runs aiohttp.web on 127.0.0.1 (a free port) in a background thread and implements GET /v1/models and
POST /v1/completions and /v1/chat/completions, streaming (SSE `data:` lines, `[DONE]`, usage in a last chunk
when `stream_options.include_usage` asks) or not. Replies are deterministic: `responder(prompt) -> text`
decides the text (for chat, the prompt is the messages' contents joined by blank lines). A "token" is a word
with its leading whitespace; `ignore_eos` pads the reply with " tok" tokens up to `max_tokens`, and `stop`
strings cut it as real servers do. Prompts containing "FAIL" get HTTP 500; prompts containing "STREAMERROR"
get an error event in the middle of the stream. Every request body is kept in `server.requests`, and
`server.max_in_flight` is the most requests it was answering at once.

Options exercise the client's SSE parser: keep-alive comments and blank lines, CRLF line ends, events split
across TCP writes, several tokens per chunk (as speculative decoding sends them), and no usage at all.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeServerOptions:
    model: str = "fake-model"
    responder: Callable[[str], str] = lambda prompt: ""
    token_delay_s: float = 0.0  # sleep before each streamed chunk, so timings are not all zero
    tokens_per_chunk: int = 1
    send_usage: bool = True
    keepalive: bool = True  # ": keep-alive" comments and extra blank lines in streams
    crlf: bool = False  # end SSE lines with \r\n
    split_writes: bool = False  # write each event in two pieces, so the client sees partial lines
    requests: list[dict[str, Any]] = field(default_factory=list)


def split_tokens(text: str) -> list[str]:
    """Words with their leading whitespace: the fake tokenizer."""
    return re.findall(r"\s*\S+", text)


def generate(prompt: str, body: dict[str, Any], responder: Callable[[str], str]) -> tuple[list[str], str]:
    """The reply's tokens and finish reason, honouring max_tokens, ignore_eos and stop."""
    max_tokens = int(body.get("max_tokens") or 16)
    tokens = split_tokens(responder(prompt))
    if body.get("ignore_eos"):
        tokens += [" tok"] * max(0, max_tokens - len(tokens))
    finish = "length" if len(tokens) >= max_tokens else "stop"
    tokens = tokens[:max_tokens]
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    text = ""
    for i, token in enumerate(tokens):
        text += token
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            # Keep the part of this token before the stop string, as servers return text up to the stop.
            last = token[: len(token) - (len(text) - cut)]
            return tokens[:i] + ([last] if last else []), "stop"
    return tokens, finish


class FakeOpenAIServer:
    """Context manager: `with FakeOpenAIServer(options) as server: server.url`."""

    def __init__(self, options: FakeServerOptions | None = None) -> None:
        self.options = options or FakeServerOptions()
        self.requests = self.options.requests
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.options.model, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await self._answer(request, body, str(body.get("prompt", "")), chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = "\n\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        return await self._answer(request, body, prompt, chat=True)

    async def _answer(self, request: web.Request, body: dict[str, Any], prompt: str, chat: bool) -> web.StreamResponse:
        # Handlers all run on the server's one event loop, so these counters need no lock.
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._reply(request, body, prompt, chat)
        finally:
            self.in_flight -= 1

    async def _reply(self, request: web.Request, body: dict[str, Any], prompt: str, chat: bool) -> web.StreamResponse:
        self.requests.append(body)
        if "FAIL" in prompt:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        tokens, finish = generate(prompt, body, self.options.responder)
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(tokens),
            "total_tokens": len(prompt.split()) + len(tokens),
        }
        base = {"id": "fake-1", "created": 0, "model": body.get("model", self.options.model)}
        if not body.get("stream"):
            text = "".join(tokens)
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            reply = {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice]}
            if self.options.send_usage:
                reply["usage"] = usage
            return web.json_response(reply)
        return await self._stream(request, body, base, tokens, finish, usage, prompt, chat)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        base: dict[str, Any],
        tokens: list[str],
        finish: str,
        usage: dict[str, int],
        prompt: str,
        chat: bool,
    ) -> web.StreamResponse:
        options = self.options
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        end = "\r\n" if options.crlf else "\n"
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(event: str) -> None:
            data = f"data: {event}{end}{end}".encode()
            if options.split_writes:
                await response.write(data[: len(data) // 2])
                await asyncio.sleep(0.002)
                data = data[len(data) // 2 :]
            await response.write(data)

        def chunk(text: str | None, finish_reason: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish_reason}
            return json.dumps({**base, "object": kind, "choices": [choice]})

        if options.keepalive:
            await response.write(f": keep-alive{end}{end}".encode())
        if chat:
            # Real servers open with an empty role delta; it carries no generated text.
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            await send(json.dumps({**base, "object": kind, "choices": [first]}))
        step = options.tokens_per_chunk
        for start in range(0, len(tokens), step):
            await asyncio.sleep(options.token_delay_s)
            if "STREAMERROR" in prompt and start > 0:
                await send(json.dumps({"error": {"message": "injected stream error", "code": 500}}))
                await response.write(f"data: [DONE]{end}{end}".encode())
                return response
            await send(chunk("".join(tokens[start : start + step])))
            if options.keepalive:
                await response.write(end.encode())
        await send(chunk(None if chat else "", finish))
        if options.send_usage and (body.get("stream_options") or {}).get("include_usage"):
            await send(json.dumps({**base, "object": kind, "choices": [], "usage": usage}))
        await response.write(f"data: [DONE]{end}{end}".encode())
        return response
