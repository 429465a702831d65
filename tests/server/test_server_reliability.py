"""The server over the real engine (built-in tiny model, CPU) under abuse that once logged errors: thousands of
/metrics scrapes racing the engine thread, and clients that leave while still sending their request body. Both
must be quiet (no error or traceback in any log) and leave no page or slot in use."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time

import httpx
import pytest
import torch
from engine.test_abort_and_leaks import assert_all_free

from nextserve.config import EngineConfig
from nextserve.engine.async_engine import AsyncEngine
from nextserve.engine.engine import Engine

from .conftest import MODEL, LiveServer

IDLE = {"kv_pages_used": 0, "state_slots_used": 0, "num_requests_running": 0}


@pytest.fixture(scope="module")
def real():
    # 16 running at most: the 64 streams keep the waiting queue (the deque a scrape once iterated) busy too.
    cfg = EngineConfig(device="cpu", dtype="float32", disable_tqdm=True, max_running_requests=16)
    engine = AsyncEngine(Engine(cfg))
    live = LiveServer(engine)
    yield live
    live.stop()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^nextserve:{name} ([0-9.e+-]+)$", text, re.M).group(1))


def wait_until_idle(real: LiveServer) -> dict[str, float]:
    stats = {}
    for _ in range(200):  # aborts are applied by the engine thread between steps
        text = httpx.get(real.url + "/metrics").text
        stats = {k: metric(text, k) for k in IDLE}
        if stats == IDLE:
            break
        time.sleep(0.05)
    return stats


class _Records(logging.Handler):
    """Every record of WARNING or above, from the root logger and from uvicorn's (which does not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _Records:
        for name in ("", "uvicorn"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in ("", "uvicorn"):
            logging.getLogger(name).removeHandler(self)

    def problems(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" + (" (with traceback)" if r.exc_info else "") for r in self.records]


def test_2000_metrics_scrapes_during_64_streams(real, monkeypatch):
    """/metrics reads the snapshot the engine thread publishes: no scrape fails, none touches the engine.

    The race itself (a scrape iterating the waiting deque as the engine thread pops it) is rare on CPU, where the
    engine thread mostly runs in torch without the GIL; the check that `Engine.stats` only ever runs on the engine
    thread is what fails, every time, when /metrics calls into the engine."""
    engine = real.engine.engine
    callers = set()
    real_stats = engine.stats

    def stats():
        callers.add(threading.current_thread().name)
        return real_stats()

    monkeypatch.setattr(engine, "stats", stats)

    # The scrapes start once a stream has its first token: on a 2-core machine 2000 scrapes can otherwise all be
    # answered before the engine admits a single stream, and the test would check nothing.
    streaming = asyncio.Event()

    async def stream(i: int, http: httpx.AsyncClient) -> str:
        body = {"model": MODEL, "prompt": ids(10 + i, 300 + i), "max_tokens": 48, "temperature": 0, "stream": True}
        body["ignore_eos"] = True
        async with http.stream("POST", real.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    streaming.set()
                if line == "data: [DONE]":
                    return "done"
        return "cut"

    async def scrapes(todo: list[int], codes: list[int], busy: list[float]) -> None:
        # One keep-alive connection per scraper, spoken by hand: httpx's pool costs milliseconds per request here.
        host, port = real.url.removeprefix("http://").split(":")
        await streaming.wait()
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while todo:
                todo.pop()
                writer.write(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = int(re.search(r"^content-length: *(\d+)", head, re.M | re.I).group(1))
                text = (await reader.readexactly(length)).decode()
                codes.append(int(head.split()[1]))
                if codes[-1] == 200:
                    busy.append(metric(text, "num_requests_running"))
        finally:
            writer.close()

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            todo, codes, busy = list(range(2000)), [], []
            streams = [asyncio.ensure_future(stream(i, http)) for i in range(64)]
            await asyncio.gather(*(scrapes(todo, codes, busy) for _ in range(100)))
            return await asyncio.gather(*streams), codes, busy

    with _Records() as log:
        results, codes, busy = asyncio.run(main())
        stats = wait_until_idle(real)
    assert len(codes) == 2000 and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert results == ["done"] * 64
    assert max(busy) > 0, "no scrape overlapped the streams"
    assert not log.problems(), "\n".join(log.problems())
    assert callers <= {"nextserve-engine"}, f"engine.stats() ran on {callers - {'nextserve-engine'}}"
    assert stats == IDLE
    assert_all_free(engine)


def test_client_gone_while_sending_its_body(real):
    """A body cut short by a disconnect is a quiet event: no error logged, nothing left in the engine."""
    host, port = real.url.removeprefix("http://").split(":")
    prompts = {"prompt": ids(40, 7)}, {"messages": [{"role": "user", "content": "Speak, ROMEO. " * 20}]}
    with _Records() as log:
        for path, prompt in zip(("/v1/completions", "/v1/chat/completions"), prompts):
            body = json.dumps({"model": MODEL, **prompt, "max_tokens": 8, "stream": True}).encode()
            for cut in (0, 1, len(body) // 2, len(body) - 1):
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:cut])
                    time.sleep(0.02)  # the handler is waiting for the rest of the body when the client goes
        time.sleep(0.3)
        r = httpx.post(real.url + "/v1/completions", json={"model": MODEL, "prompt": ids(5, 8), "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert not log.problems(), "\n".join(log.problems())
    assert wait_until_idle(real) == IDLE
    assert_all_free(real.engine.engine)
