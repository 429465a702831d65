"""Scheduler: decides which sequences run in the next step and how many of their tokens.

Policy, in order, within the step's token budget:
1. Running sequences, oldest first: a decode takes one token, an unfinished (chunked) prefill takes what the
   budget allows. A sequence that needs a new KV page and finds none preempts the newest running sequence
   (recompute: its pages and slot are freed, it goes back to the front of the waiting queue with its generated
   tokens kept, and later re-prefills them).
2. Waiting sequences, first come first served, while the budget, `max_running`, a free state slot and enough
   free pages for their first chunk allow. Nothing waits on an assert: a full pool means "not now".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nextserve.engine.kv_pool import KVPool
from nextserve.engine.request import SeqStatus, Sequence
from nextserve.engine.state_pool import StatePool


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens fed this step: seq.token_ids[seq.num_cached : seq.num_cached + num_tokens]

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so the step samples the next one."""
        return self.seq.num_cached + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, kv_pool: KVPool, state_pool: StatePool, max_num_batched_tokens: int, max_running: int):
        self.kv = kv_pool
        self.states = state_pool
        self.max_tokens = max_num_batched_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncached, budget)
            need = self.kv.pages_for(seq.num_cached + n) - len(seq.pages)
            while need > self.kv.num_free and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                preempted = True
            if need > self.kv.num_free:
                # Even alone it cannot grow now: step back and retry later (the engine admits only requests
                # that fit the whole pool, so with everyone else preempted this always succeeds).
                self._preempt(seq)
                preempted = True
                break
            seq.pages += self.kv.allocate(need)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_running:
            seq = self.waiting[0]
            n = min(seq.num_uncached, budget)
            need = self.kv.pages_for(n)
            if not self.states.can_allocate() or need > self.kv.num_free:
                break
            self.waiting.popleft()
            seq.slot = self.states.allocate()
            seq.pages = self.kv.allocate(need)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.kv.free(seq.pages)
        seq.pages = []
        if seq.slot is not None:
            self.states.free(seq.slot)
            seq.slot = None

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence from wherever it is and gives back its pages and slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def check_integrity(self) -> None:
        """Every page and slot is owned by exactly one of: the free list, a running sequence."""
        pages = list(self.kv.free_pages())
        slots = list(self.states.free_slots())
        for seq in self.running:
            pages += seq.pages
            slots.append(seq.slot)
        for seq in self.waiting:
            assert not seq.pages and seq.slot is None, f"waiting sequence {seq.seq_id} holds cache"
        assert sorted(pages) == list(range(1, self.kv.num_pages + 1)), "KV pages leaked or double-owned"
        assert sorted(slots) == list(range(1, self.states.num_slots + 1)), (
            "state slots leaked or double-owned"
        )
