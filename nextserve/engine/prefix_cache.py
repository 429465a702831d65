"""PrefixTree: a radix tree over token ids that records which KV pages and recurrent-state snapshots hold which
prefixes. It is an index only: it never allocates or frees; the cache manager (cache_manager.py) does, with what
the tree hands back.

A hybrid model can resume from a prefix only where the Gated DeltaNet state was saved, so the tree records two
things: KV pages (owned by nodes, page-aligned spans) and snapshots (state slots) at chosen positions.

  node          a span of whole pages of tokens; owns those KV pages; may hold `snapshot`, the state at its end
  tail          a snapshot a few tokens (< page_size) past a node's end, with the partial page holding their KV;
                a request's end (finish, abort, preemption) rarely falls on a page boundary, so it is kept as a tail
  lock          running sequences lock the path they use (root .. their node): locked nodes keep their pages

A lookup (`match`) is read-only: it returns the deepest usable snapshot (aligned or tail) on the query's path,
never past `limit`, and refreshes nothing. Only `use` (a match that was admitted), `insert` and `attach` refresh
the recency of what they touch. Eviction takes the least recently used entry off one of two heaps, each of lazily
invalidated entries (stale ones are skipped when popped): unlocked leaves (their pages) and snapshots (their slots).
A leaf left with no snapshot, no tail and no lock is useless (no lookup can stop there) and is pruned at once.

`evictable_pages` counts the pages that page eviction could free: pages and tail pages of unlocked nodes below the
root, and the root's tails (a sequence shorter than a page leaves its tail there; sequences reusing one copy its
page, so a root tail is never locked). Page eviction takes the least recently used of the unlocked leaves and the
root's tails (a third heap). The cache manager's `can_grow`/`can_admit` add `evictable_pages` to the free list.
`num_pages` counts every page the tree holds and `locked_pages` those of nodes on a locked path (read by running
sequences), for the metrics.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


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
    last_used: int = 0  # recency of the node's pages
    snapshot_used: int = 0  # recency of its aligned snapshot
    alive: bool = True

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class Match:
    node: Node | None  # deepest node of the reused path (to lock); None when there is no tree
    pages: list[int]  # shared pages of the path, in order
    length: int  # tokens reused
    slot: int | None  # snapshot to copy into the sequence's slot (None: nothing reused)
    tail: Tail | None = None  # the tail matched (its partial page is copied)
    # Page-aligned length of the query that the tree holds KV for (may pass the last snapshot): where the query
    # branches off. A snapshot taken there lets the next request with this prefix reuse all of it.
    kv_length: int = 0


@dataclass
class Freed:
    """What an eviction or a prune took out of the tree, for the cache manager to give back to the pools."""

    pages: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    snapshots: int = 0  # of `slots`, how many were snapshots counted in num_snapshots (all of them)

    def add(self, other: Freed) -> Freed:
        self.pages += other.pages
        self.slots += other.slots
        self.snapshots += other.snapshots
        return self


class PrefixTree:
    def __init__(self, page_size: int):
        self.ps = page_size
        self.root = Node((), [], None, 0)
        self.num_snapshots = 0
        self.evictable_pages = 0
        self.num_pages = 0
        self.locked_pages = 0
        self.num_nodes = 0
        self._clock = itertools.count(1)
        self._serial = itertools.count()
        self._leaves: list[tuple[int, int, Node]] = []  # (last_used, serial, node)
        self._snapshots: list[tuple[int, int, Node, tuple[int, ...] | None]] = []  # (stamp, serial, node, tail)
        self._root_tails: list[tuple[int, int, tuple[int, ...]]] = []  # (stamp, serial, tail tokens)

    # ---- lookup (read-only) --------------------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int) -> Match:
        """Deepest reusable prefix of `tokens` of at most `limit` tokens. Changes nothing."""
        ps = self.ps
        best = Match(self.root, [], 0, None)
        node, pos, pages = self.root, 0, []
        while True:
            if node.snapshot is not None and 0 < pos <= limit:
                best = Match(node, list(pages), pos, node.snapshot)
            for tail in node.tails.values():
                end = pos + len(tail.tokens)
                if best.length < end <= limit and tuple(tokens[pos:end]) == tail.tokens:
                    best = Match(node, list(pages), end, tail.slot, tail)
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
        return self.match(tokens, pos).length == pos

    def use(self, match: Match) -> None:
        """A match was admitted: its path, its snapshot or tail become the most recently used."""
        now = next(self._clock)
        if match.tail is not None:
            match.tail.last_used = now
            self._offer_snapshot(match.node, match.tail)
        elif match.slot is not None:
            match.node.snapshot_used = now
            self._offer_snapshot(match.node, None)
        self._touch_path(match.node, now)

    def _touch_path(self, node: Node, now: int) -> None:
        while node is not None:
            node.last_used = now
            self._offer_leaf(node)
            node = node.parent

    # ---- locks ---------------------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        while node is not None:
            if node.lock == 0 and node is not self.root:
                self.evictable_pages -= len(node.pages) + len(node.tails)
                self.locked_pages += len(node.pages)
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.lock -= 1
            if node.lock < 0:
                raise RuntimeError("prefix tree: a path was unlocked more often than locked")
            if node.lock == 0 and node is not self.root:
                self.evictable_pages += len(node.pages) + len(node.tails)
                self.locked_pages -= len(node.pages)
                self._offer_leaf(node)
            node = node.parent

    def unlocked_on_path(self, node: Node) -> int:
        """Evictable pages that locking node's path would take off `evictable_pages`."""
        n = 0
        while node is not None and node is not self.root and node.lock == 0:
            n += len(node.pages) + len(node.tails)
            node = node.parent
        return n

    # ---- insertion -----------------------------------------------------------------------------------------
    def insert(self, tokens: list[int], pages: list[int], length: int) -> tuple[Node, list[int]]:
        """Makes tokens[:length] (whole pages, KV in `pages`) a path of the tree. Returns the node ending at
        `length` and the tree's pages for tokens[:length]: spans already in the tree keep their own pages, so where
        these differ from `pages` the caller's copies are duplicates (the caller frees them). `pages` is not
        changed."""
        assert length % self.ps == 0
        ps, now = self.ps, next(self._clock)
        node, pos, tree_pages = self.root, 0, []
        while pos < length:
            key = tuple(tokens[pos : pos + ps])
            child = node.children.get(key)
            if child is None:
                new = Node(tuple(tokens[pos:length]), list(pages[pos // ps : length // ps]), node, pos)
                node.children[key] = new
                self.num_nodes += 1
                self.evictable_pages += len(new.pages)
                self.num_pages += len(new.pages)
                tree_pages += new.pages
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
            tree_pages += child.pages
            node, pos = child, child.end
        self._touch_path(node, now)
        return node, tree_pages

    def _split(self, child: Node, k: int) -> Node:
        """Cuts `child` after k pages; returns the new upper node (child keeps the rest, its snapshot, its tails).
        Both halves keep child's lock and recency, so `evictable_pages` is unchanged."""
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
        self.num_nodes += 1
        return upper

    def attach(self, node: Node, tail_tokens: tuple[int, ...], slot: int, tail_page: int | None) -> bool:
        """Records a snapshot at node's end (+ tail tokens, whose KV is in tail_page). False when the same
        snapshot exists already (the caller keeps slot and page)."""
        if (tail_tokens in node.tails) if tail_tokens else (node.snapshot is not None):
            return False
        now = next(self._clock)
        if tail_tokens:
            tail = node.tails[tail_tokens] = Tail(node, tail_tokens, tail_page, slot, now)
            self.num_pages += 1
            if node is self.root or node.lock == 0:
                self.evictable_pages += 1
            self._offer_snapshot(node, tail)
        else:
            node.snapshot, node.snapshot_used = slot, now
            self._offer_snapshot(node, None)
        self.num_snapshots += 1
        return True

    def detach_root_tail(self, tail: Tail) -> None:
        """Takes a root tail out of the tree (and out of eviction's reach) while its page is copied; `attach` puts
        it back."""
        del self.root.tails[tail.tokens]
        self.num_snapshots -= 1
        self.num_pages -= 1
        self.evictable_pages -= 1

    # ---- eviction ------------------------------------------------------------------------------------------
    def _offer_leaf(self, node: Node) -> None:
        if node is not self.root and not node.children and node.lock == 0:
            heapq.heappush(self._leaves, (node.last_used, next(self._serial), node))
            self._compact()

    def _offer_snapshot(self, node: Node, tail: Tail | None) -> None:
        stamp = tail.last_used if tail is not None else node.snapshot_used
        heapq.heappush(self._snapshots, (stamp, next(self._serial), node, tail.tokens if tail else None))
        if node is self.root and tail is not None:
            heapq.heappush(self._root_tails, (stamp, next(self._serial), tail.tokens))
        self._compact()

    def _root_tail_entry_valid(self, entry) -> bool:
        stamp, _, tokens = entry
        t = self.root.tails.get(tokens)
        return t is not None and t.last_used == stamp

    def _leaf_entry_valid(self, entry) -> bool:
        stamp, _, node = entry
        return node.alive and not node.children and node.lock == 0 and node.last_used == stamp

    def _snapshot_entry_valid(self, entry) -> bool:
        stamp, _, node, tail = entry
        if not node.alive:
            return False
        if tail is None:
            return node.snapshot is not None and node.snapshot_used == stamp
        t = node.tails.get(tail)
        return t is not None and t.last_used == stamp

    def _compact(self) -> None:
        """Drops stale entries once they outnumber live ones, so the heaps stay O(tree size)."""
        if len(self._leaves) > 2 * self.num_nodes + 64:
            self._leaves = [e for e in self._leaves if self._leaf_entry_valid(e)]
            heapq.heapify(self._leaves)
        if len(self._snapshots) > 2 * self.num_snapshots + 64:
            self._snapshots = [e for e in self._snapshots if self._snapshot_entry_valid(e)]
            heapq.heapify(self._snapshots)
        if len(self._root_tails) > 2 * len(self.root.tails) + 64:
            self._root_tails = [e for e in self._root_tails if self._root_tail_entry_valid(e)]
            heapq.heapify(self._root_tails)

    def pop_lru_leaf(self) -> Freed | None:
        """Frees pages: removes the least recently used of the unlocked leaves (pages, snapshot and tails) and the
        root's tails (page and slot); None when there is neither."""
        while self._leaves and not self._leaf_entry_valid(self._leaves[0]):
            heapq.heappop(self._leaves)
        while self._root_tails and not self._root_tail_entry_valid(self._root_tails[0]):
            heapq.heappop(self._root_tails)
        if self._root_tails and (not self._leaves or self._root_tails[0][0] < self._leaves[0][0]):
            tail = self.root.tails.pop(heapq.heappop(self._root_tails)[2])
            self.num_snapshots -= 1
            self.num_pages -= 1
            self.evictable_pages -= 1
            return Freed(pages=[tail.page], slots=[tail.slot], snapshots=1)
        if self._leaves:
            return self._remove_leaf(heapq.heappop(self._leaves)[2])
        return None

    def pop_lru_snapshot(self) -> Freed | None:
        """Removes the least recently used snapshot (aligned or tail), pruning what it leaves useless."""
        while self._snapshots:
            entry = heapq.heappop(self._snapshots)
            if not self._snapshot_entry_valid(entry):
                continue
            _, _, node, tail_tokens = entry
            freed = Freed(snapshots=1)
            if tail_tokens is None:
                freed.slots.append(node.snapshot)
                node.snapshot = None
            else:
                tail = node.tails.pop(tail_tokens)
                freed.slots.append(tail.slot)
                freed.pages.append(tail.page)
                self.num_pages -= 1
                if node is self.root or node.lock == 0:
                    self.evictable_pages -= 1
            self.num_snapshots -= 1
            return freed.add(self.prune(node))
        return None

    def _remove_leaf(self, leaf: Node) -> Freed:
        assert leaf.lock == 0 and not leaf.children and leaf is not self.root
        freed = Freed(pages=list(leaf.pages))
        if leaf.snapshot is not None:
            freed.slots.append(leaf.snapshot)
            freed.snapshots += 1
        for tail in leaf.tails.values():
            freed.slots.append(tail.slot)
            freed.pages.append(tail.page)
            freed.snapshots += 1
        self.num_snapshots -= freed.snapshots
        self.evictable_pages -= len(leaf.pages) + len(leaf.tails)
        self.num_pages -= len(leaf.pages) + len(leaf.tails)
        self.num_nodes -= 1
        leaf.alive = False
        parent = leaf.parent
        del parent.children[leaf.tokens[: self.ps]]
        self._offer_leaf(parent)
        return freed

    def prune(self, node: Node) -> Freed:
        """Removes useless leaves (no snapshot, no tail, no lock) upwards from node."""
        freed = Freed()
        while (
            node is not self.root and not node.children and node.lock == 0 and node.snapshot is None and not node.tails
        ):
            parent = node.parent
            freed.add(self._remove_leaf(node))
            node = parent
        return freed

    # ---- accounting ----------------------------------------------------------------------------------------
    def iter_nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def owned(self) -> tuple[list[int], list[int]]:
        """(pages, slots) the tree records, for the integrity check."""
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
        """The tree's invariants, its counters and its heaps: every unlocked leaf and every snapshot can be found by
        eviction."""
        snapshots = nodes = pages = locked = 0
        evictable = len(self.root.tails)
        root_tails = {e[2] for e in self._root_tails if self._root_tail_entry_valid(e)}
        assert set(self.root.tails) <= root_tails, "a root tail that page eviction cannot find"
        leaves = {id(e[2]) for e in self._leaves if self._leaf_entry_valid(e)}
        snaps = {(id(e[2]), e[3]) for e in self._snapshots if self._snapshot_entry_valid(e)}
        for node in self.iter_nodes():
            pages += len(node.pages) + len(node.tails)
            if node is not self.root:
                nodes += 1
                locked += len(node.pages) if node.lock else 0
                assert node.alive
                assert len(node.tokens) == len(node.pages) * self.ps and node.tokens
                assert node.parent.children[node.tokens[: self.ps]] is node
                assert node.start == node.parent.end
                if node.lock == 0:
                    evictable += len(node.pages) + len(node.tails)
                    if not node.children:
                        assert id(node) in leaves, "an unlocked leaf that eviction cannot find"
            assert node.lock >= sum(c.lock for c in node.children.values())
            if node.snapshot is not None:
                assert (id(node), None) in snaps, "a snapshot that eviction cannot find"
            for t in node.tails:
                assert (id(node), t) in snaps, "a tail that eviction cannot find"
            snapshots += (node.snapshot is not None) + len(node.tails)
        assert snapshots == self.num_snapshots, (snapshots, self.num_snapshots)
        assert evictable == self.evictable_pages, (evictable, self.evictable_pages)
        assert nodes == self.num_nodes, (nodes, self.num_nodes)
        assert pages == self.num_pages and locked == self.locked_pages, (pages, locked)
