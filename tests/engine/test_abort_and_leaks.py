"""Engine oracle 3: aborts and rejected input leak nothing and disturb no one.

Whatever ends a request (it finishes; it is aborted while waiting, in the middle of a chunked prefill, during
decode, after a preemption, or with some of its n samples already done; it is rejected as invalid), once every
request is gone no sequence holds a page or a slot, `check_integrity()` passes, and once the prefix cache (if
any) is emptied the KV pool and the state pool hold exactly what they held at start; and the requests that were
not aborted generate the tokens they generate alone. Every engine here runs with and without the prefix cache.
"""

import random

import pytest
import torch

from nextserve import LLM, SamplingParams
from nextserve.config import EngineConfig

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

# Engines are built with the prefix cache off and on, where the engine has one.
if "enable_prefix_caching" in EngineConfig.field_names():
    CACHE_MODES = [pytest.param(False, id="no-prefix-cache"), pytest.param(True, id="prefix-cache")]
else:
    CACHE_MODES = [pytest.param(None, id="no-prefix-cache")]


def make_llm(path, prefix_caching: bool | None = None, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    kw.setdefault("disable_tqdm", True)
    if prefix_caching is not None:
        kw["enable_prefix_caching"] = prefix_caching
    return LLM(model=str(path), **kw)


def ids(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1200, (length,), generator=g).tolist()


def empty_prefix_cache(engine) -> None:
    """Evicts everything the prefix cache holds; possible only if no sequence still locks a path of it."""
    tree = engine.cache.tree
    if tree is None:
        return
    assert tree.root.lock == 0, "a sequence that is gone still locks the prefix cache"
    engine.cache.clear()
    assert tree.num_nodes == 0 and tree.num_snapshots == 0
    engine.check_integrity()


def assert_all_free(engine) -> None:
    """No request is left anywhere and, the prefix cache emptied, every page and slot is on its free list."""
    engine.check_integrity()
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.has_unfinished()
    empty_prefix_cache(engine)
    assert engine.kv_pool.num_used == 0 and engine.state_pool.num_used == 0
    assert sorted(engine.kv_pool.free_pages()) == list(range(1, engine.kv_pool.num_pages + 1))
    assert sorted(engine.state_pool.free_slots()) == list(range(1, engine.state_pool.num_slots + 1))


def drain(engine, max_steps: int = 2000) -> dict:
    """Steps until no request is left, checking integrity after every step; returns the finished outputs."""
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.check_integrity()
    raise AssertionError(f"the engine did not finish its requests in {max_steps} steps")


def step_until(engine, cond, max_steps: int = 200) -> None:
    for _ in range(max_steps):
        if cond():
            return
        engine.step()
        engine.check_integrity()
    raise AssertionError("condition not reached")


def tokens_of(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A roomy engine without prefix cache; `alone(prompt, params)` runs one request by itself on it."""
    llm = make_llm(tiny_model_dir, CACHE_MODES[0].values[0])

    def alone(prompt, params=GREEDY) -> list[list[int]]:
        return tokens_of(llm.generate([prompt], params)[0])

    alone.llm = llm
    return alone


@pytest.fixture(scope="module", params=CACHE_MODES)
def prefix_caching(request) -> bool | None:
    return request.param


@pytest.fixture(scope="module")
def chunked(tiny_model_dir, prefix_caching):
    # 16 tokens a step: a 100-token prompt takes 7 steps to prefill.
    return make_llm(tiny_model_dir, prefix_caching, max_num_batched_tokens=16, page_size=4).engine


@pytest.fixture(scope="module")
def two_slots(tiny_model_dir, prefix_caching):
    return make_llm(tiny_model_dir, prefix_caching, max_mamba_cache_size=2, page_size=4).engine


@pytest.fixture(scope="module")
def few_pages(tiny_model_dir, prefix_caching):
    # 12 pages of 4 tokens: three 20-token prompts growing by 8 tokens each need 21 pages.
    return make_llm(tiny_model_dir, prefix_caching, num_kv_pages=12, page_size=4).engine


def test_abort_in_the_middle_of_a_chunked_prefill(chunked, reference):
    e = chunked
    long, short = ids(100, 1), ids(20, 2)
    e.add_request("long", long, GREEDY)
    e.add_request("short", short, GREEDY)
    e.step()
    e.step()
    seq = e.requests["long"].seqs[0]
    assert 0 < seq.num_cached < len(long), "precondition: the prompt is half prefilled"
    assert len(seq.pages) > 0 and seq.slot is not None
    out = e.abort("long")
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
    assert not seq.pages and seq.slot is None
    e.check_integrity()
    assert [s.request.request_id for s in e.scheduler.running + list(e.scheduler.waiting)] == ["short"]
    done = drain(e)
    assert tokens_of(done["short"]) == reference(short)
    assert_all_free(e)


def test_abort_during_decode(chunked, reference):
    e = chunked
    a, b = ids(30, 3), ids(9, 4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    e.add_request("a", a, params)
    e.add_request("b", b, GREEDY)
    seq = e.requests["a"].seqs[0]
    step_until(e, lambda: len(seq.output_ids) >= 3)
    out = e.abort("a")
    generated = out.outputs[0].token_ids
    assert out.outputs[0].finish_reason == "abort" and 3 <= len(generated) < 12
    # What was generated before the abort is what the request generates alone.
    assert generated == reference(a, params)[0][: len(generated)]
    done = drain(e)
    assert "a" not in done
    assert tokens_of(done["b"]) == reference(b)
    assert_all_free(e)


def test_abort_while_waiting(two_slots, reference):
    e = two_slots
    prompts = {f"r{i}": ids(5 + 7 * i, 10 + i) for i in range(4)}
    for rid, p in prompts.items():
        e.add_request(rid, p, GREEDY)
    e.step()
    waiting = [s.request.request_id for s in e.scheduler.waiting]
    assert waiting == ["r2", "r3"], "precondition: two state slots, so two requests wait"
    out = e.abort("r2")
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
    assert len(e.scheduler.running) == 2
    e.check_integrity()
    done = drain(e)
    assert sorted(done) == ["r0", "r1", "r3"]
    for rid in done:
        assert tokens_of(done[rid]) == reference(prompts[rid]), rid
    assert_all_free(e)


def test_abort_of_an_unknown_id_and_twice(two_slots):
    e = two_slots
    assert e.abort("never-added") is None
    assert_all_free(e)
    e.add_request("x", ids(12, 20), GREEDY)
    e.step()
    assert e.abort("x").outputs[0].finish_reason == "abort"
    assert e.abort("x") is None
    assert_all_free(e)
    # A request that finished on its own is gone too: aborting it afterwards is a no-op.
    e.add_request("y", ids(3, 21), SamplingParams(temperature=0, max_tokens=1))
    assert drain(e)["y"].outputs[0].finish_reason == "length"
    assert e.abort("y") is None
    assert_all_free(e)
    # The id is free again.
    e.add_request("x", ids(4, 22), GREEDY)
    drain(e)
    assert_all_free(e)


def test_abort_n3_with_some_samples_finished(two_slots):
    e = two_slots
    # Two state slots: samples 0 and 1 run (and finish) first while sample 2 waits for a slot.
    e.add_request("n3", ids(10, 30), SamplingParams(n=3, temperature=0, max_tokens=2, ignore_eos=True))
    req = e.requests["n3"]
    step_until(e, lambda: any(s.finished for s in req.seqs))
    assert not req.finished, "precondition: some samples finished, some not"
    out = e.abort("n3")
    assert out.finished
    reasons = [c.finish_reason for c in out.outputs]
    assert "length" in reasons and "abort" in reasons
    for c in out.outputs:
        if c.finish_reason == "length":
            assert len(c.token_ids) == 2
        else:
            assert len(c.token_ids) < 2
    assert_all_free(e)


def test_abort_under_preemption(few_pages, reference):
    e = few_pages
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = {f"p{i}": ids(20, 40 + i) for i in range(3)}
    for rid, p in prompts.items():
        e.add_request(rid, p, params)
    before = e.scheduler.num_preemptions
    step_until(e, lambda: e.scheduler.num_preemptions > before)
    # The newest running sequence was preempted: it waits with no cache, perhaps with generated tokens kept.
    victim = e.scheduler.waiting[0]
    assert victim.num_cached == 0 and not victim.pages and victim.slot is None
    out = e.abort(victim.request.request_id)
    assert out.outputs[0].finish_reason == "abort"
    e.check_integrity()
    done = drain(e)
    survivors = sorted(set(prompts) - {victim.request.request_id})
    assert sorted(done) == survivors
    for rid in survivors:
        assert tokens_of(done[rid]) == reference(prompts[rid], params), rid
    assert_all_free(e)


@pytest.mark.parametrize("prefix_caching", CACHE_MODES)
def test_random_adds_steps_and_aborts(tiny_model_dir, reference, prefix_caching):
    """A few hundred random operations on a small engine (chunked prefill, preemption, few slots, prompts that
    share prefixes), checked after every step; the requests never aborted then match a reference engine."""
    # With the prefix cache, snapshots every 16 tokens put many tree nodes in the way of aborts.
    snapshots = {"prefix_snapshot_interval": 16} if prefix_caching else {}
    e = make_llm(
        tiny_model_dir,
        prefix_caching,
        page_size=4,
        num_kv_pages=40,
        max_mamba_cache_size=5,
        max_num_batched_tokens=48,
        **snapshots,
    ).engine
    rng = random.Random(1234)
    added: dict[str, tuple[list[int], SamplingParams]] = {}
    aborted: set[str] = set()
    finished = {}
    for op in range(400):
        r = rng.random()
        if r < 0.25 and len(e.requests) < 8:
            rid = f"q{op}"
            prompt = [rng.randrange(10, 1300) for _ in range(rng.randint(1, 120))]
            if added and rng.random() < 0.4:
                # Reuse the start of an earlier prompt, so that the prefix cache (if on) has hits.
                base = rng.choice(list(added.values()))[0]
                prompt = (base[: rng.randint(1, len(base))] + prompt[: rng.randint(0, 30)])[:120]
            params = SamplingParams(
                temperature=0, max_tokens=rng.randint(1, 12), n=rng.randint(1, 2), ignore_eos=rng.random() < 0.5
            )
            e.add_request(rid, prompt, params)
            added[rid] = (prompt, params)
        elif r < 0.9:
            for out in e.step():
                if out.finished:
                    finished[out.request_id] = out
            e.check_integrity()
        else:
            # Mostly live requests; sometimes a finished, an aborted or an unknown id.
            pool = list(e.requests) * 3 + list(added)[-4:] + ["ghost"]
            rid = rng.choice(pool)
            live = rid in e.requests
            out = e.abort(rid)
            assert (out is not None) == live
            if live:
                aborted.add(rid)
                assert all(c.finished for c in out.outputs)
    finished.update(drain(e))
    assert_all_free(e)
    assert e.scheduler.num_preemptions > 0, "the workload should exercise preemption"
    assert aborted and len(aborted) < len(added)
    assert set(finished) == set(added) - aborted

    # Equal to the requests run all together on a roomy engine (batch == alone is test_engine's oracle)...
    survivors = sorted(finished)
    ref = reference.llm.generate([added[r][0] for r in survivors], [added[r][1] for r in survivors])
    for rid, out in zip(survivors, ref):
        assert tokens_of(finished[rid]) == tokens_of(out), rid
    # ...and, for a few of them, run alone.
    for rid in survivors[:3]:
        assert tokens_of(finished[rid]) == reference(*added[rid]), rid


def test_bad_input_is_rejected_and_leaves_no_trace(tiny_model_dir, reference):
    e = make_llm(tiny_model_dir, context_length=64).engine
    vocab = e.model_config.vocab_size
    e.add_request("live", ids(8, 50), GREEDY)
    e.step()
    requests_before = dict(e.requests)
    waiting_before = list(e.scheduler.waiting)
    used_before = (e.kv_pool.num_used, e.state_pool.num_used)
    tokens_before = e.prompt_tokens_total
    bad = [
        ([], GREEDY, "empty"),
        ("", GREEDY, "empty"),
        ([5, vocab], GREEDY, r"\[0, "),
        ([-1, 5], GREEDY, r"\[0, "),
        (ids(60, 51), SamplingParams(temperature=0, max_tokens=5), "exceeds the context length"),
        (ids(64, 52), SamplingParams(temperature=0, max_tokens=None), "context length is 64"),
    ]
    for prompt, params, message in bad:
        with pytest.raises(ValueError, match=message):
            e.add_request("bad", prompt, params)
    with pytest.raises(ValueError, match="already in use"):
        e.add_request("live", ids(8, 53), GREEDY)
    assert e.requests == requests_before and list(e.scheduler.waiting) == waiting_before
    assert (e.kv_pool.num_used, e.state_pool.num_used) == used_before
    assert e.prompt_tokens_total == tokens_before
    e.check_integrity()
    # The rejected id is free, and the duplicate did not disturb the live request.
    e.add_request("bad", ids(60, 51), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    done = drain(e)
    assert len(done["bad"].outputs[0].token_ids) == 4
    assert done["live"].prompt_token_ids == ids(8, 50)
    assert tokens_of(done["live"]) == reference(ids(8, 50))
    assert_all_free(e)
