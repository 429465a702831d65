"""A scripted stand-in for `AsyncEngine` with the same surface, for server tests without a model.

Every request "generates" a script (text or token ids; sample i of n plays `scripts[i % len(scripts)]`), one or
two tokens per step with a small asyncio sleep between steps, and honours max_tokens, stop strings (plain text
search), stop_token_ids, n, logprobs (fake but deterministic values) and abort. The end of a script counts as EOS.
A prompt that shares a prefix with an earlier prompt reports that prefix (floored to 4-token pages) as cached.

`records` keeps every request's id, prompt, params and fate ("running", "finished", "aborted"), so tests can check
that nothing is left running after clients went away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from nextserve.outputs import CompletionOutput, RequestOutput, TokenLogprob
from nextserve.sampling_params import SamplingParams

CACHE_PAGE = 4


@dataclass
class FakeRecord:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    status: str = "running"


@dataclass
class _Seq:
    index: int
    script: list[int]
    params: SamplingParams
    tokenizer: Any
    out: CompletionOutput = field(init=False)

    def __post_init__(self) -> None:
        self.out = CompletionOutput(self.index, logprobs=[] if self.params.logprobs is not None else None)

    def advance(self, k: int, vocab: int) -> None:
        """Append up to k tokens, stopping at the first stop condition."""
        p, out = self.params, self.out
        for _ in range(k):
            pos = len(out.token_ids)
            if pos >= len(self.script):
                out.finish_reason = "stop"  # the script's end plays EOS
                return
            token = self.script[pos]
            out.token_ids.append(token)
            if out.logprobs is not None:
                lp = -0.1 * (1 + pos % 3)
                top = [(token, lp)] + [((token + j) % vocab, lp - j) for j in range(1, p.logprobs)]
                out.logprobs.append(TokenLogprob(token, lp, top[: p.logprobs]))
            text = self.tokenizer.decode(out.token_ids, skip_special_tokens=p.skip_special_tokens)
            if not text.endswith("\ufffd"):  # hold half a UTF-8 character back, as a real detokenizer does
                out.text = text
            if token in p.stop_token_ids:
                out.finish_reason, out.stop_reason = "stop", token
                return
            for s in p.stop:
                at = out.text.find(s)
                if at >= 0:
                    out.text = out.text[: at + len(s)] if p.include_stop_str_in_output else out.text[:at]
                    out.finish_reason, out.stop_reason = "stop", s
                    return
            if len(out.token_ids) >= p.max_tokens:
                out.finish_reason = "length"
                return


class FakeEngine:
    def __init__(
        self,
        tokenizer: Any,
        *,
        max_model_len: int = 512,
        generation_defaults: dict[str, Any] | None = None,
        step_delay: float = 0.002,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.generation_defaults = generation_defaults or {}
        self.step_delay = step_delay
        self.scripts: list[str | list[int]] = ["Hello from the fake engine."]
        self.records: dict[str, FakeRecord] = {}
        self._abort_requested: set[str] = set()
        self._prompts: list[list[int]] = []
        self._counters = {"prompt": 0, "generation": 0, "queried": 0, "hit": 0}

    def script(self, *scripts: str | list[int]) -> None:
        """What the next requests generate; sample i of n plays scripts[i % len(scripts)]."""
        self.scripts = list(scripts)

    def unfinished(self) -> list[str]:
        return [r.request_id for r in self.records.values() if r.status == "running"]

    def _cached_prefix(self, ids: list[int]) -> int:
        best = 0
        for prev in self._prompts:
            n = 0
            while n < min(len(prev), len(ids)) and prev[n] == ids[n]:
                n += 1
            best = max(best, n)
        # Never the whole prompt: the last token must be computed to get logits.
        return min(best, len(ids) - 1) // CACHE_PAGE * CACHE_PAGE

    def _tokens(self, script: str | list[int]) -> list[int]:
        return list(script) if isinstance(script, list) else self.tokenizer.encode(script, add_special_tokens=False)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        # The real engine validates too; the server must turn these ValueErrors into 400s.
        vocab = len(self.tokenizer)
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.max_tokens is None or len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError("prompt + max_tokens exceeds the context length")
        assert request_id not in self.records, f"duplicate request id {request_id}"
        rec = self.records[request_id] = FakeRecord(request_id, list(prompt_token_ids), params)
        cached = self._cached_prefix(prompt_token_ids)
        self._prompts.append(list(prompt_token_ids))
        self._counters["prompt"] += len(prompt_token_ids)
        self._counters["queried"] += len(prompt_token_ids)
        self._counters["hit"] += cached
        seqs = [
            _Seq(i, self._tokens(self.scripts[i % len(self.scripts)]), params, self.tokenizer) for i in range(params.n)
        ]
        step = 0
        try:
            while True:
                await asyncio.sleep(self.step_delay)
                if request_id in self._abort_requested:
                    for s in seqs:
                        s.out.finish_reason = s.out.finish_reason or "abort"
                else:
                    for s in seqs:
                        if not s.out.finished:
                            before = len(s.out.token_ids)
                            s.advance(1 + step % 2, vocab)
                            self._counters["generation"] += len(s.out.token_ids) - before
                step += 1
                done = all(s.out.finished for s in seqs)
                if done and rec.status == "running":
                    rec.status = "finished"
                yield RequestOutput(request_id, list(prompt_token_ids), [_copy(s.out) for s in seqs], done, cached)
                if done:
                    return
        finally:
            if rec.status == "running":
                rec.status = "aborted"  # the consumer closed the generator early

    async def abort(self, request_id: str) -> None:
        # Like the real engine, an abort frees the request at once; a consumer still iterating sees "abort".
        rec = self.records.get(request_id)
        if rec is not None and rec.status == "running":
            rec.status = "aborted"
            self._abort_requested.add(request_id)

    def stats(self) -> dict[str, float]:
        running = len(self.unfinished())
        c = self._counters
        return {
            "num_running": running,
            "num_waiting": 0,
            "kv_pages_used": 2 * running,
            "kv_pages_total": 64,
            "state_slots_used": running,
            "state_slots_total": 8,
            "num_preemptions": 0,
            "prompt_tokens_total": c["prompt"],
            "generation_tokens_total": c["generation"],
            "prefix_cache_queried_tokens": c["queried"],
            "prefix_cache_hit_tokens": c["hit"],
        }

    async def shutdown(self) -> None:
        for rid in self.unfinished():
            await self.abort(rid)


def _copy(out: CompletionOutput) -> CompletionOutput:
    logprobs = list(out.logprobs) if out.logprobs is not None else None
    return CompletionOutput(out.index, out.text, list(out.token_ids), logprobs, out.finish_reason, out.stop_reason)
