"""Scheduler: decides which sequences run in the next step and how many of their tokens, and moves KV pages and
state slots between the free lists, the running sequences and the prefix cache.

Policy, in order, within the step's token budget:
1. Running sequences, oldest first: a decode takes one token, an unfinished (chunked) prefill takes what the
   budget allows. A sequence that needs KV pages and finds none first evicts unused prefix-cache pages, then
   preempts the newest running sequence (recompute: it hands its cached tokens to the prefix cache, or frees them,
   and goes back to the front of the waiting queue with its generated tokens kept).
2. Waiting sequences, first come first served, while the budget, `max_running`, and the pages for their first
   chunk allow. A new sequence first looks up the prefix cache: it shares the matched pages, copies the snapshot
   into its own slot, and starts at the matched length. Nothing waits on an assert: a full pool means "not now".

Ownership: a running sequence's `pages[:num_shared_pages]` belong to the prefix cache (read-only, the path is
locked); the rest, and its slot, are its own. `check_integrity` verifies that every page and slot has exactly one
owner.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nextserve.engine.kv_pool import KVPool
from nextserve.engine.prefix_cache import PrefixCache
from nextserve.engine.request import SeqStatus, Sequence
from nextserve.engine.state_pool import StatePool


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
    def __init__(
        self,
        kv_pool: KVPool,
        state_pool: StatePool,
        max_num_batched_tokens: int,
        max_running: int,
        prefix_cache: PrefixCache | None = None,
    ):
        self.kv = kv_pool
        self.states = state_pool
        self.cache = prefix_cache
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
            n = min(seq.num_uncached, budget)
            draft = seq.draft[: budget - 1] if n == 1 and seq.num_uncached == 1 else []
            n += len(draft)
            need = self.kv.pages_for(seq.num_cached + n) - len(seq.pages)
            while not self.reserve_pages(need) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                preempted = True
            if not self.reserve_pages(need):
                # Even alone it cannot grow now: step back and retry later (the engine admits only requests
                # that fit the whole pool, so with everyone else preempted this always succeeds).
                self._preempt(seq)
                preempted = True
                break
            seq.pages += self.kv.allocate(need)
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

    def reserve_pages(self, n: int) -> bool:
        """True when n pages are free, evicting unused prefix-cache pages if that helps."""
        if n > self.kv.num_free and self.cache is not None:
            self.cache.evict_pages(n - self.kv.num_free)
        return n <= self.kv.num_free

    def _admit(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        match = None
        if self.cache is not None:
            # Keep at least one token to compute: its logits give the next token.
            match = self.cache.match(seq.token_ids, len(seq.token_ids) - 1)
            self.cache.lock(match.node)
        cached = match.length if match else 0
        n = min(len(seq.token_ids) - cached, budget)
        shared = match.pages if match else []
        need = self.kv.pages_for(cached + n) - len(shared)
        if not self.reserve_pages(need):
            if match:
                self.cache.unlock(match.node)
            return None
        seq.slot = self.states.allocate()
        new_pages = self.kv.allocate(need)
        if match and match.length:
            self.states.copy_slot(match.slot, seq.slot)
            if match.tail_page is not None:
                self.kv.copy_page(match.tail_page, new_pages[0])
            self.cache.hit_tokens += match.length
        if match:
            self.cache.queried_tokens += len(seq.token_ids)
            seq.tree_node = match.node
            seq.branch_point = match.kv_length if match.kv_length > match.length else None
        seq.pages = shared + new_pages
        seq.num_shared_pages = len(shared)
        seq.num_cached = cached
        if seq.index == 0 and seq.num_cached_at_admission is None:
            seq.num_cached_at_admission = cached
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return ScheduledSeq(seq, n)

    # ---- prefix-cache snapshots taken during a step --------------------------------------------------------
    def plan_snapshots(self, batch: list[ScheduledSeq], interval: int) -> list[tuple[int, int, int]]:
        """In-step snapshots that a prefill chunk crosses and the tree does not have yet. Returns (index in batch,
        offset in the chunk, slot). Points of a sequence, most valuable first (when the slot budget runs out, the
        rest are skipped):

        - the end of the prompt: its last page boundary before the last token, (L - 1) // page_size * page_size.
          A lookup stops at L - 1 (the last token is recomputed for its logits), so a resubmitted prompt resumes
          there and reuses at least L - page_size tokens whatever L is. Aligned, so no partial page is copied.
        - the point where the prompt branched off the tree's KV, so that the next prompt sharing that prefix
          reuses all of it;
        - the grid: multiples of `interval`, shared by every prompt with the same prefix.
        """
        if self.cache is None:
            return []
        ps = self.kv.page_size
        plan = []
        for b, s in enumerate(batch):
            if s.draft:
                continue  # only verified tokens are snapshotted: a verify step commits after acceptance
            c, seq = s.seq.num_cached, s.seq
            end = min(c + s.num_tokens, len(seq.token_ids) - 1)
            points = [(seq.num_prompt - 1) // ps * ps, seq.branch_point]
            points += range((c // interval + 1) * interval, end + 1, interval)
            taken = set()
            for g in points:
                if g is None or not c < g <= end or g in taken or self.cache.has_snapshot_at(seq.token_ids, g):
                    continue
                slot = self.cache.reserve_snapshot()
                if slot is None:
                    break
                taken.add(g)
                plan.append((b, g - c, slot))
        # NOTE: committed in this order, each sequence's points by position: every `_share` must extend the path
        # the sequence locks (a shorter one would move its lock up, off pages it still reads).
        return sorted(plan)

    def commit_snapshots(self, batch: list[ScheduledSeq], plan: list[tuple[int, int, int]]) -> None:
        """After the step (num_cached advanced, nothing sampled yet): hangs the planned snapshots in the tree."""
        if self.cache is None:
            return
        for b, offset, slot in plan:
            s = batch[b]
            self._attach(s.seq, s.seq.num_cached - s.num_tokens + offset, slot)

    def _attach(self, seq: Sequence, pos: int, slot: int) -> None:
        """Inserts seq's tokens[:pos] (pos page-aligned) into the tree and hangs `slot` (the state at pos) there."""
        node = self._share(seq, pos)
        if not self.cache.attach(node, (), slot, None):
            self.cache.release(slot)  # a sequence batched beside this one took the same snapshot

    def _share(self, seq: Sequence, aligned: int):
        """Moves seq's pages of tokens[:aligned] into the tree; seq keeps using them (locked)."""
        assert aligned >= seq.num_shared_pages * self.kv.page_size, "the locked path would shrink"
        node, dups = self.cache.insert(seq.token_ids, seq.pages, aligned)
        self.kv.free(dups)
        self.cache.lock(node)
        if seq.tree_node is not None:
            self.cache.unlock(seq.tree_node)
        seq.tree_node = node
        seq.num_shared_pages = max(seq.num_shared_pages, aligned // self.kv.page_size)
        return node

    # ---- leaving the running set ---------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft, seq.draft_probs = [], None
        self._release(seq)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Gives back seq's pages and slot. With a prefix cache, its cached tokens (KV and final state) are
        donated to the tree first, so that a resubmission, the next turn or its own resumption can reuse them."""
        private_from = seq.num_shared_pages
        if self.cache is not None and seq.slot is not None and seq.num_cached > 0:
            ps = self.kv.page_size
            aligned = seq.num_cached // ps * ps
            node = self._share(seq, aligned)
            private_from = aligned // ps
            tail_tokens = tuple(seq.token_ids[aligned : seq.num_cached])
            page = seq.pages[private_from] if tail_tokens else None
            if self.cache.adopt_slot():
                if self.cache.attach(node, tail_tokens, seq.slot, page):
                    seq.slot = None
                    if page is not None:
                        private_from += 1  # the partial page now belongs to the tail
                else:
                    self.cache.num_snapshots -= 1  # the same snapshot exists: not adopted after all
        self.kv.free(seq.pages[private_from:])
        if seq.slot is not None:
            self.states.free(seq.slot)
        if seq.tree_node is not None:
            self.cache.unlock(seq.tree_node)
            self.cache.prune(seq.tree_node)
            seq.tree_node = None
        seq.pages, seq.slot, seq.num_shared_pages = [], None, 0

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence from wherever it is and gives back its pages and slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def check_integrity(self) -> None:
        """Every page and slot is owned by exactly one of: the free list, a running sequence, the prefix cache."""
        pages = list(self.kv.free_pages())
        slots = list(self.states.free_slots())
        if self.cache is not None:
            self.cache.check()
            tree_pages, tree_slots = self.cache.owned()
            pages += tree_pages
            slots += tree_slots
        for seq in self.running:
            pages += seq.pages[seq.num_shared_pages :]
            slots.append(seq.slot)
            if seq.num_shared_pages:
                assert seq.tree_node is not None and seq.tree_node.lock > 0
        for seq in self.waiting:
            assert not seq.pages and seq.slot is None, f"waiting sequence {seq.seq_id} holds cache"
        assert self.states.scratch_in_use == 0, "scratch state slots held between steps"
        assert sorted(pages) == list(range(1, self.kv.num_pages + 1)), "KV pages leaked or double-owned"
        assert sorted(slots) == list(range(1, self.states.num_slots + 1)), "state slots leaked or double-owned"
