"""Fixtures: a live uvicorn server on 127.0.0.1 (free port, background thread) over a FakeEngine.

The built-in tiny model's tokenizer and chat template are used (no weights are loaded). One server per test
module; the `engine` fixture resets its script and speed before each test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import uvicorn
from transformers import AutoTokenizer

from nextserve.assets import default_model_path
from nextserve.server.app import build_app

from .fake_engine import FakeEngine

MODEL = "tiny-qwen3-next"
API_KEY = "sk-test-key"


class LiveServer:
    """uvicorn serving `build_app(engine, **kwargs)` from a daemon thread until `stop()`."""

    def __init__(self, engine: FakeEngine, **kwargs: Any) -> None:
        self.engine = engine
        self.app = build_app(engine, served_model_name=MODEL, **kwargs)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def real_engine_server(model_dir, **engine_kwargs) -> Iterator[LiveServer]:
    """The real engine on `model_dir` (fp32, CPU) behind the app with both parsers; for module fixtures."""
    from nextserve.config import EngineConfig
    from nextserve.engine.async_engine import AsyncEngine
    from nextserve.engine.engine import Engine

    cfg = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", disable_tqdm=True, **engine_kwargs)
    live = LiveServer(AsyncEngine(Engine(cfg)), reasoning_parser="qwen3", tool_call_parser="qwen")
    yield live
    live.stop()


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def server(tokenizer: Any) -> Iterator[LiveServer]:
    live = LiveServer(FakeEngine(tokenizer), reasoning_parser="qwen3", tool_call_parser="qwen")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server(tokenizer: Any) -> Iterator[LiveServer]:
    """A server that requires API_KEY and has no parsers."""
    live = LiveServer(FakeEngine(tokenizer), api_key=API_KEY)
    yield live
    live.stop()


@pytest.fixture
def engine(server: LiveServer) -> FakeEngine:
    server.engine.script("Hello from the fake engine.")
    server.engine.step_delay = 0.002
    return server.engine


@pytest.fixture
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c
