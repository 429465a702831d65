"""Overlapped scheduling (launch step N+1, then read step N) changes no output: greedy tokens, stop reasons and
texts are those of the engine with `disable_overlap_schedule`, with prefix caching, chunked prefill, preemption,
stop tokens found a step late, penalties (which make a step wait) and aborts in the mix; no page or slot leaks."""

import random

import pytest
import torch

from nextserve import LLM, SamplingParams


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def workload(seed: int):
    """(prompt, params) per request: shared prefixes, stop ids that hit early, penalties, n > 1, prompt logprobs and
    max_tokens 0 on some."""
    rng = random.Random(seed)
    base = ids(40, seed)
    out = []
    for i in range(14):
        prompt = base[: rng.randint(0, 40)] + ids(rng.randint(4, 50), seed * 100 + i)
        kw = dict(temperature=0, max_tokens=rng.choice([0, 1, 3, 8, 16, 24]), logprobs=1 if i % 5 == 0 else None)
        kw["n"] = rng.choice([1, 1, 2])
        if i % 4 == 1:
            kw["prompt_logprobs"] = rng.choice([0, 2])
        if i % 3 == 0:
            kw["stop_token_ids"] = [rng.randrange(10, 1200) for _ in range(40)]  # some hit within a few tokens
        if i % 7 == 3:
            kw["repetition_penalty"] = 1.3
        out.append((f"r{i}", prompt, SamplingParams(**kw)))
    return out


def run(path, overlap: bool, seed: int, **kw):
    llm = LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        disable_tqdm=True,
        disable_overlap_schedule=not overlap,
        page_size=16,
        **kw,
    )
    eng = llm.engine
    todo = workload(seed)
    rng = random.Random(seed)
    done, aborted, steps = {}, set(), 0
    while todo or eng.has_unfinished():
        if todo and rng.random() < 0.5:
            rid, prompt, params = todo.pop(0)
            eng.add_request(rid, prompt, params)
        # Aborts at fixed step numbers (of whatever request is alive then).
        if steps % 16 == 7 and eng.requests:
            rid = sorted(eng.requests)[0]
            eng.abort(rid)
            aborted.add(rid)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        eng.check_integrity()
        steps += 1
    eng.check_integrity()
    stats = {"overlapped": eng.num_overlapped_steps, "preemptions": eng.scheduler.num_preemptions}
    result = {
        rid: ([(c.token_ids, c.finish_reason, c.stop_reason, c.text, [lp.token_id for lp in c.logprobs or []])
               for c in out.outputs],
              [(p.token_id, round(p.logprob, 4)) if p else None for p in out.prompt_logprobs or []])
        for rid, out in done.items()
    }  # fmt: skip
    eng.cache.clear()
    assert eng.kv_pool.num_used == 0 and eng.state_pool.num_used == 0
    llm.close()
    return result, aborted, stats


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("pool", ["roomy", "tight"])
def test_overlap_changes_no_output(tiny_model_dir, seed, pool):
    kw = {"max_num_batched_tokens": 32}
    if pool == "tight":
        kw["num_kv_pages"] = 12  # 192 tokens: preemption
    on, aborted_on, stats_on = run(tiny_model_dir, True, seed, **kw)
    off, aborted_off, stats_off = run(tiny_model_dir, False, seed, **kw)
    # Which requests are alive at a given step differs by a step between the modes: compare those neither aborted.
    keep = set(on) & set(off) - aborted_on - aborted_off
    assert {r: on[r] for r in keep} == {r: off[r] for r in keep}
    assert len(keep) >= 6
    assert stats_on["overlapped"] > 5 and stats_off["overlapped"] == 0
    if pool == "tight":
        assert stats_on["preemptions"] > 0 and stats_off["preemptions"] > 0


def test_speculative_decoding_is_not_overlapped(tiny_mtp_model_dir):
    with LLM(
        model=str(tiny_mtp_model_dir), dtype="float32", device="cpu", disable_tqdm=True, speculative_algorithm="NEXTN"
    ) as llm:
        assert not llm.engine.overlap
        llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert llm.engine.num_overlapped_steps == 0
