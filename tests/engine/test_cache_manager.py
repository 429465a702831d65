"""The cache manager with no model: every page and slot keeps exactly one owner under thousands of random operations,
its yes-answers are promises, lookups change nothing, eviction takes the least recently used entry off a heap."""

import random

import pytest
import torch

from nextserve.engine.cache_manager import CacheManager
from nextserve.engine.kv_pool import KVLayout, KVPool
from nextserve.engine.request import SeqStatus, Sequence
from nextserve.engine.scheduler import ScheduledSeq
from nextserve.engine.state_pool import StateLayout, StatePool

PS = 4


def make(pages=48, running=6, snapshots=6, scratch=4, prefix=True) -> CacheManager:
    kv = KVPool(KVLayout(1, PS, 1, 2, torch.float32), pages, "cpu")
    states = StatePool(StateLayout(1, 2, 2, 1, 2, 2, torch.float32, torch.float32), running + snapshots, "cpu", scratch)
    return CacheManager(kv, states, prefix, snapshots)


def seq(i: int, tokens: list[int]) -> Sequence:
    return Sequence(i, None, 0, list(tokens), len(tokens), None, None)


def tree_recency(cm: CacheManager):
    t = cm.tree
    nodes = [
        (id(n), n.last_used, n.snapshot_used, tuple(x.last_used for x in n.tails.values())) for n in t.iter_nodes()
    ]
    return nodes, len(t._leaves), len(t._snapshots)


@pytest.mark.parametrize("prefix", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_random_operations_keep_every_page_and_slot_owned_once(prefix):
    rng = random.Random(7)
    cm = make(prefix=prefix)
    bases = [[rng.randrange(1, 50) for _ in range(rng.randint(3, 30))] for _ in range(5)]
    running: list[Sequence] = []
    counts = dict.fromkeys(["admit", "step", "verify", "release", "abort", "double", "evict", "clear", "match"], 0)
    next_id = 0
    for _ in range(4000):
        r = rng.random()
        if r < 0.22 and len(running) < 6:
            prompt = rng.choice(bases)[: rng.randint(1, 30)] + [rng.randrange(1, 50) for _ in range(rng.randint(1, 12))]
            s = seq(next_id, prompt)
            next_id += 1
            m = cm.match(s)
            assert m.length < len(prompt)
            n = rng.randint(1, len(prompt) - m.length)
            if cm.can_admit(m, m.length + n):  # a yes is a promise
                cm.admit(s, m, m.length + n)
                s.status = SeqStatus.RUNNING
                assert s.num_cached == m.length and len(s.pages) >= cm.pages_for(m.length + n)
                batch = [ScheduledSeq(s, n)]
                plan = cm.plan_snapshots(batch, 8)
                s.num_cached += n
                cm.commit_snapshots(batch, plan, [m.length])
                running.append(s)
                counts["admit"] += 1
        elif r < 0.55 and running:
            # One step over a few running sequences: prefill chunks and decodes, with in-step snapshots.
            batch = []
            for s in rng.sample(running, rng.randint(1, len(running))):
                if s.num_uncached == 0:
                    s.token_ids.append(rng.randrange(1, 50))  # the token sampled last step
                n = rng.randint(1, s.num_uncached)
                if cm.can_grow(s, s.num_cached + n):
                    cm.grow(s, s.num_cached + n)
                    batch.append(ScheduledSeq(s, n))
            plan = cm.plan_snapshots(batch, 8)
            firsts = [b.seq.num_cached for b in batch]
            for b in batch:
                b.seq.num_cached += b.num_tokens
            cm.commit_snapshots(batch, plan, firsts)
            counts["step"] += 1
        elif r < 0.62 and running:
            # A verify step: k drafts fed, scratch slots for their states, then a rejected tail given back.
            s = rng.choice(running)
            if s.num_uncached == 0:
                s.token_ids.append(rng.randrange(1, 50))
            if s.num_uncached == 1:
                k = rng.randint(1, 3)
                if cm.can_grow(s, s.num_cached + 1 + k):
                    cm.grow(s, s.num_cached + 1 + k)
                    scratch = [cm.allocate_scratch() for _ in range(k)]
                    accepted = rng.randint(0, k)
                    s.token_ids += [rng.randrange(1, 50) for _ in range(accepted)]
                    s.num_cached += 1 + accepted
                    if accepted < k:
                        cm.commit_state(scratch[accepted], s)
                    cm.shrink(s, s.num_cached + 1)
                    cm.free_scratch(scratch)
                    counts["verify"] += 1
        elif r < 0.80 and running:
            s = running.pop(rng.randrange(len(running)))
            mid_prefill = s.num_cached < s.num_prompt
            private, slot = list(s.pages[s.num_shared_pages :]), s.slot
            cm.release(s)
            counts["abort" if mid_prefill else "release"] += 1
            assert not s.pages and s.slot is None and s.tree_node is None
            freed_pages = [p for p in private if p in set(cm.kv.free_pages())]
            if freed_pages and rng.random() < 0.3:
                with pytest.raises(RuntimeError, match="double free"):
                    cm.kv.free(freed_pages[:1])
                counts["double"] += 1
            if slot in set(cm.states.free_slots()) and rng.random() < 0.3:
                with pytest.raises(RuntimeError, match="double free"):
                    cm.states.free(slot)
                counts["double"] += 1
        elif r < 0.90 and prefix:
            probe = seq(-1, rng.choice(bases) + [1, 2, 3])
            before = tree_recency(cm)
            cm.match(probe)
            assert tree_recency(cm) == before, "a lookup changed the tree's recency"
            counts["match"] += 1
        elif r < 0.98 and prefix:
            # Ask for more pages than are free: eviction of unlocked leaves makes up the difference, as promised.
            want = min(cm.available_pages(), cm.kv.num_free + rng.randint(1, 8))
            if want > cm.kv.num_free:
                pages = cm._allocate_pages(want)
                cm.kv.free(pages)
                counts["evict"] += 1
        elif prefix:
            cm.clear()
            counts["clear"] += 1
        cm.check_integrity(running, [])
    for s in running:
        cm.release(s)
    cm.check_integrity([], [])
    cm.clear()
    assert cm.kv.num_used == 0 and cm.states.num_used == 0
    assert min(counts.values()) > 0 if prefix else counts["admit"] and counts["step"] and counts["double"]
    if prefix:
        assert cm.hit_tokens > 0 and cm.page_evictions > 0 and cm.snapshot_evictions > 0


def cached(cm: CacheManager, tokens: list[int], i: int) -> Sequence:
    """Prefills `tokens` as sequence i and releases it: its pages and final state go to the tree."""
    s = seq(i, tokens)
    m = cm.match(s)
    cm.admit(s, m, len(tokens))
    s.num_cached = len(tokens)
    cm.release(s)
    return s


def test_eviction_takes_the_least_recently_used_leaf_without_walking_the_tree(monkeypatch):
    cm = make(pages=12, snapshots=6)
    a, b, c = ([x] * 8 for x in (1, 2, 3))  # 2 pages each, a snapshot at the end of each
    for i, toks in enumerate((a, b, c)):
        cached(cm, toks, i)
    # Reuse a (admission refreshes it); a mere lookup of b refreshes nothing.
    s = seq(9, a + [5])
    cm.admit(s, cm.match(s), 9)
    cm.match(seq(10, b + [5]))
    cm.release(s)

    def no_walk():
        raise AssertionError("eviction walked the tree")

    monkeypatch.setattr(cm.tree, "iter_nodes", no_walk)
    free = cm.kv.num_free
    pages = cm._allocate_pages(free + 1)  # one page more than is free: one leaf goes
    cm.kv.free(pages)
    monkeypatch.undo()
    assert cm.match(seq(11, b + [5])).length == 0, "b, the least recently used, should have been evicted"
    assert cm.match(seq(12, a + [5])).length == 8 and cm.match(seq(13, c + [5])).length == 8
    cm.check_integrity([], [])


def test_snapshot_budget_evicts_the_least_recently_used_snapshot():
    cm = make(pages=40, snapshots=2)
    a, b = [1] * 8, [2] * 8
    cached(cm, a, 0)
    cached(cm, b, 1)
    s = seq(2, a + [7])
    cm.admit(s, cm.match(s), 9)  # a is used now: b is the oldest snapshot
    s.num_cached = 9
    cm.release(s)  # its end-of-sequence snapshot (a tail one token past a) needs room
    assert cm.match(seq(3, b + [7])).length == 0 and cm.match(seq(4, a + [7])).length >= 8
    assert cm.snapshot_evictions >= 1
    cm.check_integrity([], [])


def test_can_answers_are_promises_and_a_no_changes_nothing():
    cm = make(pages=6, running=4, snapshots=4)
    cached(cm, [1] * 8, 0)  # 2 pages in the tree, evictable
    s = seq(1, [2] * 24)  # needs 6 pages: 4 free + 2 evictable
    m = cm.match(s)
    assert cm.can_admit(m, 24) and not cm.can_admit(m, 25)
    before = (cm.kv.num_free, cm.tree.evictable_pages)
    assert not cm.can_grow(seq(2, []), 4 * 8)
    assert (cm.kv.num_free, cm.tree.evictable_pages) == before
    cm.admit(s, m, 24)
    assert len(s.pages) == 6 and cm.tree.num_nodes == 0  # the cached prefix was evicted to keep the promise
    s.num_cached = 24
    cm.release(s)  # all 6 pages go to the tree, evictable
    # Resuming from them locks them: they no longer count as available for the new sequence's own pages.
    t = seq(3, [2] * 24 + [3])
    m = cm.match(t)
    assert m.length == 24 and cm.available_pages() == 6
    assert not cm.can_admit(m, 25) and cm.can_admit(m, 24)
    cm.check_integrity([], [])


def test_a_matched_root_tail_is_not_evicted_while_it_is_copied():
    """A sequence shorter than a page leaves a tail at the root, which no lock keeps: admitting a sequence that
    resumes from it must not let its own page allocation evict it before its page and state are copied."""
    cm = make(pages=2, snapshots=4)
    cached(cm, [1, 2, 3], 0)
    tail = cm.tree.root.tails[(1, 2, 3)]
    cm.kv.k[:, tail.page] = 7.0
    assert cm.tree.evictable_pages == 1 and cm.kv.num_free == 1
    s = seq(1, [1, 2, 3, 9, 9, 9, 9, 9])
    m = cm.match(s)
    assert m.length == 3 and m.tail is tail
    assert not cm.can_admit(m, 8), "two fresh pages would need the tail's own page"
    assert cm.can_admit(m, 4)
    cm.admit(s, m, 4)
    assert (cm.kv.k[:, s.pages[0]] == 7.0).all() and s.pages[0] != tail.page
    back = cm.tree.root.tails[(1, 2, 3)]
    assert (back.page, back.slot) == (tail.page, tail.slot)
    s.status = SeqStatus.RUNNING
    cm.check_integrity([s], [])
