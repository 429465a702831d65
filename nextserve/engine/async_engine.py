"""AsyncEngine: the engine on its own thread, with an asyncio streaming interface for the server.

The engine loop thread owns the Engine: it applies queued commands (add, abort) between steps, runs steps while
there is work, and hands each RequestOutput to the asyncio loop of the request's consumer. The HTTP side never
blocks the loop and never touches the engine directly; request validation (pure) runs on the caller's side so
that a bad request fails before it is queued, and so does a structured-output grammar: the caller awaits its
compilation on the engine's grammar pool (neither the asyncio loop nor the engine loop compiles), so a request
waits for its own grammar without holding up anyone else, and a grammar that does not compile is a ValueError here.
Stats (/metrics) are the snapshot the engine thread last published.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType

from nextserve.config import EngineConfig
from nextserve.engine.engine import Engine
from nextserve.outputs import RequestOutput
from nextserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# While busy, the engine thread republishes its stats after the first step that ends this long after the last one.
STATS_INTERVAL_S = 0.25


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._consumers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="nextserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> AsyncEngine:
        from nextserve.engine.tp import make_engine

        return cls(make_engine(EngineConfig.from_cli_args(args)))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def generation_defaults(self) -> dict:
        return self.engine.generation_defaults

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.engine.validate_request(prompt_token_ids, params)
        grammar = None
        if params.structured is not None:
            # Shielded: requests with the same grammar share its compilation, which one leaving must not cancel.
            grammar = await asyncio.shield(asyncio.wrap_future(self.engine.grammars.submit(params.structured)))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._consumers[request_id] = (loop, q)
        self._commands.put(("add", request_id, prompt_token_ids, params, grammar))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._consumers.pop(request_id, None)
            if not finished:
                # The consumer went away (client disconnect, cancellation): free the request's cache.
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> Mapping[str, float]:
        """The engine's stats as the engine thread last published them; safe from any thread, never blocks.

        `Engine.stats()` walks the scheduler's queues and the prefix-cache tree, which the engine thread mutates
        mid-step, so no other thread may call it. Instead the engine thread builds a read-only copy and swaps it in
        (one reference assignment, atomic under the GIL): whenever it goes idle (so an idle server's numbers are
        exact: a finished or aborted request shows as gone as soon as the engine applied it) and, while busy, after
        the first step that ends `STATS_INTERVAL_S` after the last publication. The decode loop pays one clock read
        per step; the walk (microseconds for a tiny batch, growing with the batch and the tree) runs a few times a
        second at most, whether or not anyone scrapes. Numbers of a busy engine are at most that interval plus one
        step old, far below a Prometheus scrape interval.
        """
        return self._stats

    async def shutdown(self) -> None:
        self._stop = True
        self._commands.put(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _publish_stats(self) -> None:
        self._stats = MappingProxyType(self.engine.stats())
        self._stats_at = time.monotonic()

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items) -> None:
        """Hands (request id, output or error) pairs to their consumers: one wake-up per event loop, however many
        requests progressed in the step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            consumer = self._consumers.get(request_id)
            if consumer is not None:
                loop, q = consumer
                by_loop.setdefault(loop, []).append((q, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params, grammar = cmd
            try:
                self.engine.add_request(rid, ids, params, grammar=grammar)
            except ValueError as e:
                self._deliver(rid, e)
        elif kind == "abort":
            self.engine.abort(cmd[1])

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # the engine thread owns the engine: it releases the model and caches on the way out
            self.engine.close()

    def _loop(self) -> None:
        while not self._stop:
            # Block only when idle; otherwise drain whatever arrived during the last step.
            idle = not self.engine.has_unfinished()
            if idle:
                self._publish_stats()  # nothing changes until the next command
            try:
                cmd = self._commands.get(timeout=None if idle else 0)
                self._apply(cmd)
                while True:
                    self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            if self._stop or not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug: fail every request rather than hang them
                logger.exception("engine step failed; aborting all requests")
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine failure: {e}"))
                continue
            self._deliver_all((out.request_id, out) for out in outputs)
            if time.monotonic() - self._stats_at >= STATS_INTERVAL_S:
                self._publish_stats()


def _put_all(batch) -> None:
    for q, item in batch:
        q.put_nowait(item)
