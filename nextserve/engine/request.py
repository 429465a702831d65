"""Requests and their sequences.

A `Request` is what a client asked for: one prompt, one SamplingParams, n samples. Each sample is a `Sequence`:
the unit the scheduler runs, with its own state slot and KV pages. A sequence's tokens are prompt + generated
ids; `num_cached` of them are already in the caches, and a step feeds some of the rest. Prefill, chunked
prefill, decode and recompute after preemption are all the same operation: feed uncached tokens, and sample
once every known token is cached.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nextserve.outputs import CompletionOutput, RequestOutput, TokenLogprob
from nextserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nextserve.engine.detokenizer import IncrementalDetokenizer
    from nextserve.engine.prefix_cache import Node
    from nextserve.engine.structured import GrammarState


# Placeholder in token_ids for a token sampled on the device whose value the host has not read yet (overlapped
# scheduling): the next step feeds it from the device; the process half of its step writes the value in.
PENDING = -1


class SeqStatus(enum.Enum):
    """The one record of where a sequence is; `finish_reason` only says why it stopped."""

    WAITING = "waiting"  # queued, or preempted: holds no pages or slot
    RUNNING = "running"  # scheduled; holds its pages and slot
    STOPPED = "stopped"  # generation ended this step; its caches are released when the step ends
    FINISHED = "finished"  # stopped or aborted, caches given back


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int
    token_ids: list[int]
    num_prompt: int
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    status: SeqStatus = SeqStatus.WAITING
    num_cached: int = 0
    pages: list[int] = field(default_factory=list)
    slot: int | None = None
    text: str = ""
    # Tokens not given to `detok` yet: a request that neither streams nor has stop strings needs its text only at
    # the end, and is decoded once then (None: decoded token by token).
    undecoded: list[int] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    # Prefix cache: pages[:num_shared_pages] belong to the tree; tree_node is the deepest node of the locked path.
    num_shared_pages: int = 0
    tree_node: Node | None = None
    num_cached_at_admission: int | None = None
    branch_point: int | None = None  # where this prompt leaves the tree's KV: snapshotted during prefill
    # Speculative decoding: draft tokens to verify next step, and their draft distributions (sampled rows).
    draft: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    # Prompt log-probabilities (the request's first sequence only, when asked): entry i scores prompt token i.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Trailing PENDING entries of token_ids, and for the last one where its value is: (device tokens, index).
    num_pending: int = 0
    pending_source: tuple[torch.Tensor, int] | None = None
    # Guided decoding: the matcher of this sequence's output (advanced by committed tokens only).
    grammar: GrammarState | None = None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt positions still to score: this sequence must compute them, not take them from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def output_ids(self) -> list[int]:
        """Generated tokens whose values are known (pending ones excluded)."""
        return self.token_ids[self.num_prompt : len(self.token_ids) - self.num_pending]

    @property
    def num_output(self) -> int:
        """Generated tokens, pending ones included."""
        return len(self.token_ids) - self.num_prompt

    @property
    def num_uncached(self) -> int:
        return len(self.token_ids) - self.num_cached

    @property
    def stopped(self) -> bool:
        """Generation has ended (the caches may still be held until the step ends)."""
        return self.status in (SeqStatus.STOPPED, SeqStatus.FINISHED)

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
    # False: the caller wants the final output only (`LLM.generate`): no output is built while it runs.
    stream: bool = True
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
            prompt_logprobs=list(self.seqs[0].prompt_logprobs) if self.seqs[0].prompt_logprobs is not None else None,
        )
