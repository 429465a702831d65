"""PrefixCache: a radix tree over token ids that lets new sequences reuse KV pages and recurrent-state snapshots.

A hybrid model can resume from a prefix only where the Gated DeltaNet state was saved, so the tree stores two
things: KV pages (owned by nodes, page-aligned spans) and snapshots (state slots) at chosen positions.

  node          a span of whole pages of tokens; owns those KV pages; may hold `snapshot`, the state at its end
  tail          a snapshot a few tokens (< page_size) past a node's end, with the partial page holding their KV;
                a request's end (finish, abort, preemption) rarely falls on a page boundary, so it is kept as a tail
  lock          running sequences lock the path they use (root .. their node): locked nodes keep their pages

A lookup returns the deepest usable snapshot (aligned or tail) on the query's path, never past `limit`; the
sequence shares the path's pages read-only, gets a private copy of a tail's partial page, and copies the snapshot
into its own slot (snapshots are never mutated). KV pages and snapshots are evicted by separate LRU policies:
pages from unlocked leaves when the KV pool runs dry, snapshots when their slot budget is full. A leaf left with
no snapshot, no tail and no lock is useless (no lookup can stop there) and is pruned at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from nextserve.engine.kv_pool import KVPool
from nextserve.engine.state_pool import StatePool


@dataclass(eq=False)
class Tail:
    node: Node
    tokens: tuple[int, ...]  # 1 .. page_size-1 tokens after node's end
    page: int  # KV of those tokens, in the first len(tokens) rows of the page
    slot: int  # state after the last of them
    last_used: int = 0


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]
    pages: list[int]
    parent: Node | None
    start: int
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    snapshot: int | None = None
    tails: dict[tuple[int, ...], Tail] = field(default_factory=dict)
    lock: int = 0
    last_used: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class Match:
    node: Node  # deepest node of the reused path (to lock)
    pages: list[int]  # shared pages of the path, in order
    length: int  # tokens reused
    slot: int | None  # snapshot to copy into the sequence's slot (None: nothing reused)
    tail_page: int | None  # partial page to copy (tail matches only)
    # Page-aligned length of the query that the tree holds KV for (may pass the last snapshot): where the query
    # branches off. A snapshot taken there lets the next request with this prefix reuse all of it.
    kv_length: int = 0


class PrefixCache:
    def __init__(self, kv: KVPool, states: StatePool, max_snapshots: int):
        self.kv, self.states = kv, states
        self.ps = kv.page_size
        self.root = Node((), [], None, 0)
        self.max_snapshots = max_snapshots
        self.num_snapshots = 0
        self._clock = itertools.count(1)
        # Counters for metrics.
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.snapshot_evictions = 0
        self.page_evictions = 0

    # ---- lookup --------------------------------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int) -> Match:
        """Deepest reusable prefix of `tokens` of at most `limit` tokens."""
        ps, now = self.ps, next(self._clock)
        best = Match(self.root, [], 0, None, None)
        node, pos, pages = self.root, 0, []
        while True:
            node.last_used = now
            if node.snapshot is not None and 0 < pos <= limit:
                best = Match(node, list(pages), pos, node.snapshot, None)
            for tail in node.tails.values():
                end = pos + len(tail.tokens)
                if best.length < end <= limit and tuple(tokens[pos:end]) == tail.tokens:
                    tail.last_used = now
                    best = Match(node, list(pages), end, tail.slot, tail.page)
            child = node.children.get(tuple(tokens[pos : pos + ps]))
            if child is None or tuple(tokens[pos : pos + len(child.tokens)]) != child.tokens:
                if child is not None:  # partial match: count the whole pages that agree
                    k = 1
                    while k < len(child.pages) and (
                        tuple(tokens[pos + k * ps : pos + (k + 1) * ps]) == child.tokens[k * ps : (k + 1) * ps]
                    ):
                        k += 1
                    pos += k * ps
                break  # no snapshot can lie inside a partially matched span
            pages += child.pages
            pos, node = child.end, child
        best.kv_length = min(pos, limit // ps * ps)
        return best

    def has_snapshot_at(self, tokens: list[int], pos: int) -> bool:
        m = self.match(tokens, pos)
        return m.length == pos

    # ---- locks ---------------------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        while node is not None:
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.lock -= 1
            assert node.lock >= 0
            node = node.parent

    # ---- insertion -----------------------------------------------------------------------------------------
    def insert(self, tokens: list[int], pages: list[int], length: int) -> tuple[Node, list[int]]:
        """Makes tokens[:length] (whole pages, KV in `pages`) a path of the tree.

        Spans already in the tree keep their pages: the caller's copies of them are returned as duplicates (to
        free), and `pages` is updated in place to the tree's pages. Returns the node ending at `length`.
        """
        assert length % self.ps == 0
        ps, now = self.ps, next(self._clock)
        node, pos, dups = self.root, 0, []
        while pos < length:
            key = tuple(tokens[pos : pos + ps])
            child = node.children.get(key)
            if child is None:
                new = Node(tuple(tokens[pos:length]), list(pages[pos // ps : length // ps]), node, pos)
                node.children[key] = new
                node, pos = new, length
                break
            k = 1
            while (
                k < len(child.pages)
                and pos + (k + 1) * ps <= length
                and tuple(tokens[pos + k * ps : pos + (k + 1) * ps]) == child.tokens[k * ps : (k + 1) * ps]
            ):
                k += 1
            if k < len(child.pages):
                child = self._split(child, k)
            for i in range(k):
                j = pos // ps + i
                if pages[j] != child.pages[i]:
                    dups.append(pages[j])
                    pages[j] = child.pages[i]
            child.last_used = now
            node, pos = child, child.end
        node.last_used = now
        return node, dups

    def _split(self, child: Node, k: int) -> Node:
        """Cuts `child` after k pages; returns the new upper node (child keeps the rest, its snapshot, its tails)."""
        ps = self.ps
        upper = Node(
            child.tokens[: k * ps],
            child.pages[:k],
            child.parent,
            child.start,
            lock=child.lock,
            last_used=child.last_used,
        )
        child.parent.children[child.tokens[:ps]] = upper
        child.tokens, child.pages, child.start = child.tokens[k * ps :], child.pages[k:], child.start + k * ps
        child.parent = upper
        upper.children[child.tokens[:ps]] = child
        return upper

    def reserve_snapshot(self) -> int | None:
        """A fresh state slot counted as a snapshot, within the budget (the LRU snapshot makes room); None when
        the budget is zero."""
        if not self.adopt_slot():
            return None
        return self.states.allocate()

    def adopt_slot(self) -> bool:
        """Counts a slot the caller already holds (a finished sequence's working slot) as a snapshot."""
        if self.num_snapshots >= self.max_snapshots and not self.evict_snapshots(1):
            return False
        self.num_snapshots += 1
        return True

    def attach(self, node: Node, tail_tokens: tuple[int, ...], slot: int, tail_page: int | None) -> bool:
        """Hangs a reserved/adopted snapshot at node's end (+ tail tokens, whose KV is in tail_page). False when
        the same snapshot exists already: the caller then gives slot and page back with `release`."""
        if (tail_tokens in node.tails) if tail_tokens else (node.snapshot is not None):
            return False
        if tail_tokens:
            node.tails[tail_tokens] = Tail(node, tail_tokens, tail_page, slot, next(self._clock))
        else:
            node.snapshot = slot
        return True

    def release(self, slot: int, tail_page: int | None = None) -> None:
        self.states.free(slot)
        if tail_page is not None:
            self.kv.free([tail_page])
        self.num_snapshots -= 1

    # ---- eviction ------------------------------------------------------------------------------------------
    def iter_nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def evict_snapshots(self, n: int) -> int:
        """Frees up to n snapshots, least recently used first; returns how many were freed."""
        entries = []  # (last_used, node, tail or None)
        for node in self.iter_nodes():
            if node.snapshot is not None:
                entries.append((node.last_used, id(node), node, None))
            for tail in node.tails.values():
                entries.append((tail.last_used, id(tail), node, tail))
        entries.sort(key=lambda e: (e[0], e[1]))
        freed = 0
        for _, _, node, tail in entries:
            if freed == n:
                break
            if tail is None:
                self.states.free(node.snapshot)
                node.snapshot = None
            else:
                del node.tails[tail.tokens]
                self.states.free(tail.slot)
                self.kv.free([tail.page])
            self.num_snapshots -= 1
            self.snapshot_evictions += 1
            freed += 1
            self.prune(node)
        return freed

    def evict_pages(self, n: int) -> int:
        """Frees at least n KV pages from unlocked leaves, least recently used first (as far as possible)."""
        freed = 0
        while freed < n:
            leaves = [x for x in self.iter_nodes() if x is not self.root and not x.children and x.lock == 0]
            if not leaves:
                break
            leaf = min(leaves, key=lambda x: x.last_used)
            freed += self._remove_leaf(leaf)
        return freed

    def _remove_leaf(self, leaf: Node) -> int:
        freed = len(leaf.pages)
        self.kv.free(leaf.pages)
        if leaf.snapshot is not None:
            self.states.free(leaf.snapshot)
            self.num_snapshots -= 1
            self.snapshot_evictions += 1
        for tail in leaf.tails.values():
            self.states.free(tail.slot)
            self.kv.free([tail.page])
            self.num_snapshots -= 1
            self.snapshot_evictions += 1
            freed += 1
        del leaf.parent.children[leaf.tokens[: self.ps]]
        self.page_evictions += freed
        return freed

    def prune(self, node: Node) -> None:
        """Removes useless leaves (no snapshot, no tail, no lock) upwards from node."""
        while (
            node is not self.root and not node.children and node.lock == 0 and node.snapshot is None and not node.tails
        ):
            parent = node.parent
            self._remove_leaf(node)
            node = parent

    def clear(self) -> None:
        """Drops every snapshot and every unlocked page (what `reset_prefix_cache` does)."""
        self.evict_snapshots(self.num_snapshots)
        self.evict_pages(self.kv.num_pages)

    # ---- accounting ----------------------------------------------------------------------------------------
    def owned(self) -> tuple[list[int], list[int]]:
        """(pages, slots) owned by the tree, for the pools' integrity check."""
        pages, slots = [], []
        for node in self.iter_nodes():
            pages += node.pages
            if node.snapshot is not None:
                slots.append(node.snapshot)
            for tail in node.tails.values():
                pages.append(tail.page)
                slots.append(tail.slot)
        return pages, slots

    def check(self) -> None:
        n = 0
        for node in self.iter_nodes():
            if node is not self.root:
                assert len(node.tokens) == len(node.pages) * self.ps and node.tokens
                assert node.parent.children[node.tokens[: self.ps]] is node
                assert node.start == node.parent.end
            assert node.lock >= sum(c.lock for c in node.children.values())
            n += (node.snapshot is not None) + len(node.tails)
        assert n == self.num_snapshots <= self.max_snapshots
