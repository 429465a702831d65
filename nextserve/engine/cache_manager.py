"""CacheManager: the one owner of KV pages and state slots.

Every allocation, free, lock and eviction of the hybrid cache goes through here; the scheduler, the speculative
decoder and the engine ask, they never touch the pools or the prefix tree themselves. Questions and actions come in
pairs, and a yes is a promise: after `can_grow(seq, n)` says yes, `grow(seq, n)` succeeds (evicting cached pages
if it must); after `can_admit(match, n)`, `admit(seq, match, n)`.

Who owns what (checked by `check_integrity`, in tests after every step and with `--debug-check-integrity` whenever
the engine goes idle): every KV page and state slot is on exactly one of
  - a free list (KVPool, StatePool);
  - a running sequence: its slot and `pages[num_shared_pages:]` (its `pages[:num_shared_pages]` belong to the tree,
    read-only, on the path the sequence locks);
  - the prefix tree: node pages, snapshot slots, tails (slot + partial page);
  - the step: scratch slots for speculative verification, handed out and given back within one step.

Without prefix caching the tree is absent: a match is always empty and a released sequence frees everything.
"""

from __future__ import annotations

from collections.abc import Iterable

from nextserve.engine.kv_pool import KVPool
from nextserve.engine.prefix_cache import Freed, Match, PrefixTree
from nextserve.engine.request import Sequence
from nextserve.engine.state_pool import StatePool


class CacheManager:
    def __init__(self, kv: KVPool, states: StatePool, prefix_caching: bool, max_snapshots: int):
        self.kv, self.states = kv, states
        self.page_size = kv.page_size
        self.tree = PrefixTree(kv.page_size) if prefix_caching else None
        self.max_snapshots = max_snapshots if prefix_caching else 0
        self._planned = 0  # snapshot slots reserved by plan_snapshots and not yet committed (within a step)
        # Counters for metrics.
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.snapshot_evictions = 0
        self.page_evictions = 0

    def pages_for(self, num_tokens: int) -> int:
        return self.kv.pages_for(num_tokens)

    @property
    def num_snapshots(self) -> int:
        return self.tree.num_snapshots if self.tree else 0

    # ---- KV pages of running sequences ---------------------------------------------------------------------
    def available_pages(self) -> int:
        """Free pages plus those that evicting cached prefixes would free."""
        return self.kv.num_free + (self.tree.evictable_pages if self.tree else 0)

    def pages_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        return max(self.pages_for(num_tokens) - len(seq.pages), 0)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq's pages can be made to hold num_tokens tokens."""
        return self.pages_to_grow(seq, num_tokens) <= self.available_pages()

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        seq.pages += self._allocate_pages(self.pages_to_grow(seq, num_tokens))

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Gives back seq's private pages past those that num_tokens tokens need (rejected draft positions)."""
        keep = max(self.pages_for(num_tokens), seq.num_shared_pages)
        if len(seq.pages) > keep:
            self.kv.free(seq.pages[keep:])
            del seq.pages[keep:]

    def _allocate_pages(self, n: int) -> list[int]:
        if n > self.kv.num_free:
            self._evict_pages(n - self.kv.num_free)
        return self.kv.allocate(n)

    def _evict_pages(self, n: int) -> None:
        freed = 0
        while freed < n:
            out = self.tree.pop_lru_leaf() if self.tree else None
            if out is None:
                break
            freed += len(out.pages)
            self.page_evictions += len(out.pages)
            self._give_back(out)

    def _give_back(self, freed: Freed) -> None:
        self.kv.free(freed.pages)
        for slot in freed.slots:
            self.states.free(slot)
        self.snapshot_evictions += freed.snapshots

    # ---- admission -----------------------------------------------------------------------------------------
    def match(self, seq: Sequence) -> Match:
        """The longest cached prefix seq can resume from (read-only). At least one token is left to compute: its
        logits give the next token."""
        if self.tree is None:
            return self.no_match()
        return self.tree.match(seq.token_ids, len(seq.token_ids) - 1)

    def no_match(self) -> Match:
        """Start from scratch (nothing locked, nothing reused)."""
        return Match(None, [], 0, None)

    def _pages_to_admit(self, match: Match, num_tokens: int) -> int:
        return self.pages_for(num_tokens) - len(match.pages)

    def can_admit(self, match: Match, num_tokens: int) -> bool:
        """Whether a sequence resuming from `match` can get a slot and pages for its first num_tokens tokens (the
        matched ones included), with the matched path locked (locked pages cannot be evicted)."""
        if self.states.num_free == 0:
            return False
        locked = self.tree.unlocked_on_path(match.node) if match.node is not None else 0
        locked += self._root_tail(match) is not None  # held while its page is copied
        return self._pages_to_admit(match, num_tokens) <= self.available_pages() - locked

    def _root_tail(self, match: Match):
        """The matched tail when it hangs at the root: no lock keeps it, so admission holds it out of eviction."""
        return match.tail if match.tail is not None and match.node is self.tree.root else None

    def admit(self, seq: Sequence, match: Match, num_tokens: int) -> None:
        """Locks the matched path, gives seq a slot (the snapshot copied in) and its pages (the path's shared, a
        tail's partial page copied, the rest fresh); seq resumes at match.length."""
        if match.node is not None:
            self.tree.lock(match.node)
            self.tree.use(match)
            self.queried_tokens += len(seq.token_ids)
            seq.tree_node = match.node
            seq.branch_point = match.kv_length if match.kv_length > match.length else None
        root_tail = self._root_tail(match)
        if root_tail is not None:
            self.tree.detach_root_tail(root_tail)
        new_pages = self._allocate_pages(self._pages_to_admit(match, num_tokens))
        seq.slot = self.states.allocate()
        if match.length:
            self.states.copy_slot(match.slot, seq.slot)
            if match.tail is not None:
                self.kv.copy_page(match.tail.page, new_pages[0])
            self.hit_tokens += match.length
        if root_tail is not None:
            self.tree.attach(self.tree.root, root_tail.tokens, root_tail.slot, root_tail.page)
        seq.pages = match.pages + new_pages
        seq.num_shared_pages = len(match.pages)
        seq.num_cached = match.length

    # ---- snapshots taken inside a step ---------------------------------------------------------------------
    def plan_snapshots(self, batch, interval: int) -> list[tuple[int, int, int]]:
        """In-step snapshots that a prefill chunk crosses and the tree does not have yet. `batch` holds the step's
        ScheduledSeq. Returns (index in batch, offset in the chunk, slot). Points of a sequence, most valuable first
        (when the slot budget runs out, the rest are skipped):

        - the end of the prompt: its last page boundary before the last token, (L - 1) // page_size * page_size.
          A lookup stops at L - 1 (the last token is recomputed for its logits), so a resubmitted prompt resumes
          there and reuses at least L - page_size tokens whatever L is. Aligned, so no partial page is copied.
        - the point where the prompt branched off the tree's KV, so that the next prompt sharing that prefix
          reuses all of it;
        - the grid: multiples of `interval`, shared by every prompt with the same prefix.
        """
        if self.tree is None:
            return []
        ps = self.page_size
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
                if g is None or not c < g <= end or g in taken or self.tree.has_snapshot_at(seq.token_ids, g):
                    continue
                slot = self._reserve_snapshot()
                if slot is None:
                    break
                taken.add(g)
                plan.append((b, g - c, slot))
        # NOTE: committed in this order, each sequence's points by position: every `_share` must extend the path
        # the sequence locks (a shorter one would move its lock up, off pages it still reads).
        return sorted(plan)

    def commit_snapshots(self, batch, plan: list[tuple[int, int, int]], firsts: list[int]) -> None:
        """Once the step is queued (num_cached advanced): hangs the planned snapshots in the tree. `firsts`: the
        first position each of `batch` fed."""
        self._planned -= len(plan)
        for b, offset, slot in plan:
            seq = batch[b].seq
            node = self._share(seq, firsts[b] + offset)
            if not self.tree.attach(node, (), slot, None):
                self.states.free(slot)  # a sequence batched beside this one took the same snapshot

    def _make_room_for_snapshot(self) -> bool:
        """True when one more snapshot fits the budget (the least recently used one makes room if needed)."""
        if self.max_snapshots == 0:
            return False
        while self.tree.num_snapshots + self._planned >= self.max_snapshots:
            out = self.tree.pop_lru_snapshot()
            if out is None:
                return False
            self._give_back(out)
        return True

    def _reserve_snapshot(self) -> int | None:
        if not self._make_room_for_snapshot():
            return None
        self._planned += 1
        return self.states.allocate()

    def _share(self, seq: Sequence, aligned: int):
        """Moves seq's pages of tokens[:aligned] into the tree; seq keeps reading them through its locked path."""
        assert aligned >= seq.num_shared_pages * self.page_size, "the locked path would shrink"
        node, tree_pages = self.tree.insert(seq.token_ids, seq.pages, aligned)
        dups = [mine for mine, theirs in zip(seq.pages, tree_pages) if mine != theirs]
        seq.pages[: len(tree_pages)] = tree_pages
        self.kv.free(dups)
        self.tree.lock(node)
        if seq.tree_node is not None:
            self.tree.unlock(seq.tree_node)
        seq.tree_node = node
        seq.num_shared_pages = max(seq.num_shared_pages, aligned // self.page_size)
        return node

    # ---- scratch slots (speculative verification) ----------------------------------------------------------
    def allocate_scratch(self) -> int:
        return self.states.allocate_scratch()

    def free_scratch(self, slots: list[int]) -> None:
        self.states.free_scratch(slots)

    def commit_state(self, src: int, seq: Sequence) -> None:
        """seq's live state becomes the one in slot src (the state after its last accepted token)."""
        self.states.copy_slot(src, seq.slot)

    # ---- leaving -------------------------------------------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        """Gives back seq's pages and slot. With a prefix cache, its cached tokens (KV and final state) are
        donated to the tree first, so that a resubmission, the next turn or its own resumption can reuse them."""
        private_from = seq.num_shared_pages
        # NOTE: a sequence that stopped inside a group of accepted drafts (EOS, a stop string, a grammar's end) has
        # cached positions past its last kept token, and its state is theirs: none of it is donated.
        if self.tree is not None and seq.slot is not None and 0 < seq.num_cached <= len(seq.token_ids):
            ps = self.page_size
            aligned = seq.num_cached // ps * ps
            node = self._share(seq, aligned)
            private_from = aligned // ps
            tail_tokens = tuple(seq.token_ids[aligned : seq.num_cached])
            page = seq.pages[private_from] if tail_tokens else None
            exists = (tail_tokens in node.tails) if tail_tokens else (node.snapshot is not None)
            if not exists and self._make_room_for_snapshot():
                self.tree.attach(node, tail_tokens, seq.slot, page)
                seq.slot = None
                if page is not None:
                    private_from += 1  # the partial page now belongs to the tail
        self.kv.free(seq.pages[private_from:])
        if seq.slot is not None:
            self.states.free(seq.slot)
        if seq.tree_node is not None:
            self.tree.unlock(seq.tree_node)
            self._give_back(self.tree.prune(seq.tree_node))
            seq.tree_node = None
        seq.pages, seq.slot, seq.num_shared_pages = [], None, 0

    def clear(self) -> None:
        """Drops every snapshot and every unlocked page (what `reset_prefix_cache` does)."""
        if self.tree is None:
            return
        while (out := self.tree.pop_lru_snapshot()) is not None:
            self._give_back(out)
        while (out := self.tree.pop_lru_leaf()) is not None:
            self.page_evictions += len(out.pages)
            self._give_back(out)

    # ---- accounting ----------------------------------------------------------------------------------------
    def check_integrity(self, running: Iterable[Sequence], waiting: Iterable[Sequence]) -> None:
        """Every page and slot is owned by exactly one of: the free list, a running sequence, the prefix tree."""
        pages = list(self.kv.free_pages())
        slots = list(self.states.free_slots())
        if self.tree is not None:
            self.tree.check()
            assert self.tree.num_snapshots <= self.max_snapshots
            tree_pages, tree_slots = self.tree.owned()
            pages += tree_pages
            slots += tree_slots
        for seq in running:
            pages += seq.pages[seq.num_shared_pages :]
            slots.append(seq.slot)
            if seq.num_shared_pages:
                assert seq.tree_node is not None and seq.tree_node.lock > 0
        for seq in waiting:
            assert not seq.pages and seq.slot is None, f"waiting sequence {seq.seq_id} holds cache"
        assert self.states.scratch_in_use == 0, "scratch state slots held between steps"
        assert self._planned == 0, "snapshot slots planned and never committed"
        assert sorted(pages) == list(range(1, self.kv.num_pages + 1)), "KV pages leaked or double-owned"
        assert sorted(slots) == list(range(1, self.states.num_slots + 1)), "state slots leaked or double-owned"

    def stats(self) -> dict[str, int]:
        # Pages "used by requests": private pages of running sequences and tree pages on a locked path; the rest of
        # the tree's pages are a cache that no running sequence reads.
        cached = self.tree.num_pages - self.tree.locked_pages if self.tree else 0
        return {
            "kv_pages_used": self.kv.num_used - cached,
            "kv_pages_cached": cached,
            "kv_pages_total": self.kv.num_pages,
            "prefix_cache_queried_tokens": self.queried_tokens,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_snapshots": self.num_snapshots,
            "prefix_cache_snapshot_evictions": self.snapshot_evictions,
        }
