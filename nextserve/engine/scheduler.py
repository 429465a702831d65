"""Scheduler: decides which sequences run in the next step and how many of their tokens. It asks the cache manager
whether pages and slots can be had and tells it to take or give them; it never touches the pools or the prefix tree.

Policy, in order, within the step's token budget:
1. Running sequences, oldest first: a decode takes one token, an unfinished (chunked) prefill takes what the
   budget allows. A sequence that needs KV pages and finds none first evicts unused prefix-cache pages, then
   preempts the newest running sequence (recompute: it hands its cached tokens to the prefix cache, or frees them,
   and goes back to the front of the waiting queue with its generated tokens kept).
2. Waiting sequences, first come first served, while the budget, `max_running`, and the pages for their first
   chunk allow. A new sequence first looks up the prefix cache: it shares the matched pages, copies the snapshot
   into its own slot, and starts at the matched length. Nothing waits on an assert: a full pool means "not now".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nextserve.engine.cache_manager import CacheManager
from nextserve.engine.request import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens fed this step: seq.token_ids[seq.num_cached : seq.num_cached + num_tokens]
    # Speculative verify: the fed tokens are the last sampled token then these drafts (num_tokens = 1 + len).
    draft: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples the next one."""
        return bool(self.draft) or self.seq.num_cached + self.num_tokens == len(self.seq.token_ids)

    @property
    def input_ids(self) -> list[int]:
        c = self.seq.num_cached
        if self.draft:
            return [self.seq.token_ids[c]] + self.draft
        return self.seq.token_ids[c : c + self.num_tokens]


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_batched_tokens: int, max_running: int, max_model_len: int):
        self.cache = cache
        self.max_model_len = max_model_len
        self.max_tokens = max_num_batched_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and self._at_limit(seq):
                i += 1  # its pending token is its last: it finishes when that token is read
                continue
            n = min(seq.num_uncached, budget)
            draft = seq.draft[: budget - 1] if n == 1 and seq.num_uncached == 1 else []
            n += len(draft)
            fits = self.cache.can_grow(seq, seq.num_cached + n)
            while not fits and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                preempted = True
                fits = self.cache.can_grow(seq, seq.num_cached + n)
            if not fits:
                # Even alone it cannot grow now: step back and retry later (the engine admits only requests
                # that fit the whole pool, so with everyone else preempted this always succeeds).
                self._preempt(seq)
                preempted = True
                break
            self.cache.grow(seq, seq.num_cached + n)
            batch.append(ScheduledSeq(seq, n, draft))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_running:
            scheduled = self._admit(self.waiting[0], budget)
            if scheduled is None:
                break
            self.waiting.popleft()
            batch.append(scheduled)
            budget -= scheduled.num_tokens
        return batch

    def _at_limit(self, seq: Sequence) -> bool:
        return seq.num_output >= seq.request.max_tokens or len(seq.token_ids) >= self.max_model_len

    def _admit(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        if seq.num_pending:
            return None  # preempted with a token still on the device: admitted once it is read
        # A sequence that must score its prompt computes every position: it takes nothing from the prefix cache.
        match = self.cache.match(seq) if not seq.wants_prompt_logprobs else self.cache.no_match()
        n = min(len(seq.token_ids) - match.length, budget)
        if not self.cache.can_admit(match, match.length + n):
            return None
        self.cache.admit(seq, match, match.length + n)
        if seq.index == 0 and seq.num_cached_at_admission is None:
            seq.num_cached_at_admission = seq.num_cached
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return ScheduledSeq(seq, n)

    # ---- leaving the running set ---------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft, seq.draft_probs = [], None
        self.cache.release(seq)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence from wherever it is and gives back its pages and slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq)
        seq.status = SeqStatus.FINISHED
