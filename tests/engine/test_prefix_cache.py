"""Prefix caching for the hybrid model: greedy outputs identical with caching on and off, hits as promised, and a
tree + pools that stay consistent under every workload."""

import random

import pytest
import torch

from nextserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make(path, cache: bool, **kw):
    kw.setdefault("page_size", 16)
    kw.setdefault("prefix_snapshot_interval", 32)
    return LLM(model=str(path), dtype="float32", device="cpu", disable_tqdm=True, enable_prefix_caching=cache, **kw)


def rand_ids(n, seed):
    return torch.randint(10, 1200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(llm, prompts, params=GREEDY):
    outs = []
    for p in prompts:  # one at a time, so that each request can hit what the earlier ones left
        outs.append(llm.generate([p], params)[0])
        llm.engine.check_integrity()
    return outs


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def on(tiny_model_dir):
    return make(tiny_model_dir, True)


@pytest.fixture(scope="module")
def off(tiny_model_dir):
    return make(tiny_model_dir, False)


def test_identical_prompt_resubmitted(on, off):
    p = rand_ids(150, 1)
    a, b = run(on, [p, p, p]), run(off, [p, p, p])
    assert tokens(a) == tokens(b)
    assert a[0].num_cached_tokens == 0
    # Reuses at least L - interval (grid snapshots every 32 tokens, and the end-of-prompt tail snapshot).
    assert a[1].num_cached_tokens >= 150 - 32 and a[2].num_cached_tokens >= 150 - 32


# Prompt lengths around the end-of-prompt snapshot (page 16, interval 32): shorter than one interval, one past a page
# boundary, exactly on one (16 = L - page_size reused), and past the grid's last point by more than a page. The grid
# alone reuses 0, 0, 0, 64 and 64 of them.
END_OF_PROMPT_LENGTHS = [17, 20, 32, 81, 96]


@pytest.mark.parametrize("length", END_OF_PROMPT_LENGTHS)
def test_resubmitted_prompt_reuses_all_but_its_last_page(on, off, length):
    p = rand_ids(length, 1000 + length)
    a, b = run(on, [p, p]), run(off, [p, p])
    assert tokens(a) == tokens(b)
    assert a[0].num_cached_tokens == 0
    # The end-of-prompt snapshot sits at the last page boundary before the last token.
    assert a[1].num_cached_tokens == (length - 1) // 16 * 16 >= length - 16


@pytest.mark.parametrize(
    "budget,length",
    [
        (24, 81),  # chunks end at 24, 48, 72, 81: the snapshot at 80 lies inside the fourth
        (40, 81),  # chunks end at 40, 80, 81: the snapshot at 80 is the second chunk's end
        (10, 32),  # chunks end at 10, 20, 30, 32: the snapshot at 16 lies inside the second
    ],
)
def test_end_of_prompt_snapshot_in_a_later_chunk(tiny_model_dir, off, budget, length):
    llm = make(tiny_model_dir, True, max_num_batched_tokens=budget)
    p = rand_ids(length, 2000 + length)
    a, b = run(llm, [p, p]), run(off, [p, p])
    assert tokens(a) == tokens(b)
    assert a[1].num_cached_tokens == (length - 1) // 16 * 16 >= length - 16


def finish_all(eng, outs):
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step() if o.finished})
        eng.check_integrity()
    return outs


@pytest.mark.parametrize("slots,reused", [(1, 80), (0, 0)])
def test_snapshot_budget_takes_the_end_of_prompt_first(tiny_model_dir, off, slots, reused):
    # The prompt crosses grid points 32 and 64 and its end-of-prompt point is 80. With one snapshot slot the
    # end-of-prompt point gets it (the grid is skipped): a copy of the prompt sent while the first still decodes
    # reuses 80 tokens. With no slot nothing is reused and nothing breaks.
    p = rand_ids(81, 3000)
    eng = make(tiny_model_dir, True, max_prefix_snapshots=slots).engine
    eng.add_request("a", p, GREEDY)
    outs = {o.request_id: o for o in eng.step() if o.finished}  # prefill + first token
    eng.check_integrity()
    eng.add_request("b", p, GREEDY)
    outs = finish_all(eng, outs)
    assert outs["b"].num_cached_tokens == reused
    ref = tokens(run(off, [p]))
    assert tokens([outs["a"], outs["b"]]) == ref * 2


def test_multi_turn_chat_reuses_previous_turn(on, off):
    turn = rand_ids(40, 2)
    prompts_on, prompts_off = [turn], [turn]
    hits = []
    for k in range(3):
        a, b = run(on, [prompts_on[-1]])[0], run(off, [prompts_off[-1]])[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        hits.append((a.num_cached_tokens, len(prompts_on[-1]) - len(turn) if k else 0))
        nxt = prompts_on[-1] + a.outputs[0].token_ids + rand_ids(20, 10 + k)
        prompts_on.append(nxt)
        prompts_off.append(nxt)
    # Turn k+1 reuses at least (turn k prompt + reply) - interval; the reply's last token was never fed, so
    # the request-end snapshot sits one token before it.
    for k in range(1, 3):
        prev = len(prompts_on[k - 1]) + 8
        assert hits[k][0] >= prev - 32, hits


def test_shared_system_prompt(on, off):
    system = rand_ids(250, 3)
    prompts = [system + rand_ids(5 + i, 20 + i) for i in range(5)]
    a, b = run(on, prompts), run(off, prompts)
    assert tokens(a) == tokens(b)
    for o in a[1:]:
        assert o.num_cached_tokens >= 250 - 32
    # The second request snapshotted the point where it branched off the first one's KV: from the third on, the
    # whole shared prefix (to its last full page) is reused.
    for o in a[2:]:
        assert o.num_cached_tokens >= 250 // 16 * 16  # 240; the grid alone gives 224


def test_prompts_shorter_than_interval_and_diverging_inside_a_page(on, off):
    """Prompts under one interval (no grid point): what they reuse comes from the point where a prompt branched
    off inside a page (snapshot at that page's start), the end-of-prompt snapshot and the request-end one."""
    base = rand_ids(24, 4)
    prompts = [base, base[:20] + rand_ids(9, 5), base[:5], base + [7], base[:20] + rand_ids(3, 6)]
    a = run(on, prompts)
    assert tokens(a) == tokens(run(off, prompts))
    hits = [o.num_cached_tokens for o in a]
    assert hits[0] == 0
    # The second prompt diverges at 20, inside base's second page: a snapshot at 16 (the branch point, or its
    # end-of-prompt point (29 - 1) // 16 * 16) serves every later prompt that shares base's first page.
    assert hits[3] >= 16 and hits[4] >= 16, hits
    # A short prompt, then its reply and one more token (a chat turn): the request-end snapshot, 5 + 8 - 1 = 12
    # tokens in, inside the first page.
    turn = base[:5] + a[2].outputs[0].token_ids + [7]
    b = run(on, [turn])[0]
    assert b.outputs[0].token_ids == run(off, [turn])[0].outputs[0].token_ids
    assert b.num_cached_tokens >= 12, b.num_cached_tokens


def test_batched_requests_sharing_a_prefix(tiny_model_dir, off):
    system = rand_ids(100, 6)
    prompts = [system + rand_ids(3 * i + 1, 30 + i) for i in range(6)]
    on = make(tiny_model_dir, True, max_num_batched_tokens=64)
    first = on.generate(prompts, GREEDY)  # all at once: chunked prefill races the snapshots
    again = on.generate(prompts, GREEDY)
    ref = off.generate(prompts, GREEDY)
    assert tokens(first) == tokens(ref) == tokens(again)
    assert all(o.num_cached_tokens >= 100 - 32 for o in again)
    on.engine.check_integrity()


def test_abort_mid_prefill_then_resubmit(tiny_model_dir, off):
    llm = make(tiny_model_dir, True, max_num_batched_tokens=32)
    p = rand_ids(120, 7)
    llm.engine.add_request("x", p, GREEDY)
    llm.engine.step()
    llm.engine.step()
    llm.engine.abort("x")
    llm.engine.check_integrity()
    out = llm.generate([p], GREEDY)[0]
    assert out.num_cached_tokens >= 32  # what was prefilled before the abort is reused
    assert out.outputs[0].token_ids == off.generate([p], GREEDY)[0].outputs[0].token_ids


def test_preemption_and_eviction_pressure(tiny_model_dir, off):
    # 12 pages of 16 tokens and 2 snapshot slots: the tree must evict continuously, and sequences preempt.
    llm = make(tiny_model_dir, True, num_kv_pages=12, max_prefix_snapshots=2, max_num_batched_tokens=48)
    system = rand_ids(64, 8)
    prompts = [system + rand_ids(10 + 7 * i, 40 + i) for i in range(8)] + [rand_ids(90, 9)] * 2
    outs = llm.generate(prompts, GREEDY)
    assert tokens(outs) == tokens(off.generate(prompts, GREEDY))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.cache.snapshot_evictions > 0
    llm.engine.check_integrity()
    outs2 = llm.generate(prompts[:3], GREEDY)
    assert tokens(outs2) == tokens(outs[:3])
    llm.engine.check_integrity()


def test_randomized_operations_keep_tree_and_pools_consistent(tiny_model_dir):
    """Thousands of operations (add with shared prefixes, step, abort, under pool pressure); integrity after each."""
    llm = make(
        tiny_model_dir, True, num_kv_pages=40, max_prefix_snapshots=3, max_num_batched_tokens=40, max_mamba_cache_size=3
    )
    eng = llm.engine
    rng = random.Random(0)
    prefixes = [rand_ids(rng.randint(1, 60), 100 + i) for i in range(4)]
    live, ops, n_req = set(), 0, 0
    while ops < 2500:
        r = rng.random()
        if r < 0.25 and len(live) < 8:
            p = rng.choice(prefixes)[: rng.randint(1, 60)] + rand_ids(rng.randint(0, 30), rng.randint(0, 10**6))
            if not p:
                continue
            rid = f"r{n_req}"
            n_req += 1
            eng.add_request(
                rid,
                p,
                SamplingParams(temperature=0, max_tokens=rng.randint(1, 6), ignore_eos=True, n=rng.choice([1, 1, 2])),
            )
            live.add(rid)
        elif r < 0.35 and live:
            rid = rng.choice(sorted(live))
            eng.abort(rid)
            live.discard(rid)
        else:
            for out in eng.step():
                if out.finished:
                    live.discard(out.request_id)
        eng.check_integrity()
        ops += 1
    for rid in list(live):
        eng.abort(rid)
    eng.check_integrity()
    assert eng.kv_pool.num_used == len(eng.cache.tree.owned()[0])
    assert eng.state_pool.num_used == eng.cache.num_snapshots
    assert eng.cache.hit_tokens > 0
    # Everything the tree holds is evictable once nothing runs.
    eng.reset_prefix_cache()
    eng.check_integrity()
    assert eng.kv_pool.num_used == 0 and eng.state_pool.num_used == 0
