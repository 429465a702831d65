"""Requests and their sequences.

A `Request` is what a client asked for: one prompt, one SamplingParams, n samples. Each sample is a `Sequence`:
the unit the scheduler runs, with its own state slot and KV pages. A sequence's tokens are prompt + generated
ids; `num_cached` of them are already in the caches, and a step feeds some of the rest. Prefill, chunked
prefill, decode and recompute after preemption are all the same operation: feed uncached tokens, and sample
once every known token is cached.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from nextserve.outputs import CompletionOutput, RequestOutput, TokenLogprob
from nextserve.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int
    token_ids: list[int]
    num_prompt: int
    generator: torch.Generator | None
    detok: object  # IncrementalDetokenizer
    status: SeqStatus = SeqStatus.WAITING
    num_cached: int = 0
    pages: list[int] = field(default_factory=list)
    slot: int | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    first_token_time: float | None = None
    # Prefix cache: pages[:num_shared_pages] belong to the tree; tree_node is the deepest node of the locked path.
    num_shared_pages: int = 0
    tree_node: object | None = None
    num_cached_at_admission: int | None = None
    branch_point: int | None = None  # where this prompt leaves the tree's KV: snapshotted during prefill
    # Speculative decoding: draft tokens to verify next step, and their draft distributions (sampled rows).
    draft: list[int] = field(default_factory=list)
    draft_probs: object | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_uncached(self) -> int:
        return len(self.token_ids) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.output_ids),
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion() for s in self.seqs],
            finished=self.finished,
            num_cached_tokens=(self.seqs[0].num_cached_at_admission or 0) if self.seqs else 0,
        )
