"""MTP speculative decoding: greedy outputs equal plain decoding token for token (k = 1..4, batching, prefix
caching, chunked prefill, preemption, aborts), a draft that agrees with the target is accepted and saves target
forwards, and sampled outputs keep the target distribution."""

import collections
import dataclasses

import pytest
import torch

from nextserve import LLM, SamplingParams
from nextserve.engine.spec_decode import SpecDecoder

G = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 1200, (n,), generator=g).tolist() for n in (1, 9, 40, 130, 17, 64)]


def make(path, k=None, **kw):
    kw.setdefault("cpu_cache_bytes", 64 << 20)
    if k:
        kw.update(speculative_algorithm="NEXTN", speculative_num_steps=k, speculative_adaptive=False)
    return LLM(model=str(path), dtype="float32", device="cpu", disable_tqdm=True, **kw)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_mtp_model_dir):
    return tokens(make(tiny_mtp_model_dir).generate(prompts(), G))


@pytest.fixture
def oracle(monkeypatch, reference):
    """Replaces the MTP proposal by the target's own greedy continuation, with every `wrong_at`-th draft
    position corrupted, so that full and partial acceptance are both exercised."""
    by_prompt = {tuple(p): r for p, r in zip(prompts(), reference)}
    settings = {"wrong_at": None}

    def propose(self, seqs, last_hidden, k):
        for seq in seqs:
            ref = by_prompt[tuple(seq.token_ids[: seq.num_prompt])]
            done = len(seq.output_ids)
            room = min(seq.request.max_tokens - done, self.max_model_len - len(seq.token_ids)) - 1
            draft = list(ref[done : done + max(0, min(k, room))])
            w = settings["wrong_at"]
            if w is not None and len(draft) > w:
                draft[w] = (draft[w] + 1) % 1200
            seq.draft, seq.draft_probs = draft, None

    monkeypatch.setattr(SpecDecoder, "propose", propose)
    return settings


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_equals_plain_decoding(tiny_mtp_model_dir, reference, k):
    llm = make(tiny_mtp_model_dir, k)
    assert tokens(llm.generate(prompts(), G)) == reference
    llm.engine.check_integrity()
    assert llm.engine.spec.stats.drafted > 0


@pytest.mark.parametrize("wrong_at", [None, 0, 1])
def test_agreeing_drafts_are_accepted_and_save_target_forwards(tiny_mtp_model_dir, reference, oracle, wrong_at):
    oracle["wrong_at"] = wrong_at
    llm = make(tiny_mtp_model_dir, 3)
    assert tokens(llm.generate(prompts(), G)) == reference
    st = llm.engine.spec.stats
    generated = sum(len(r) for r in reference)
    forwards = len(reference) + st.verify_steps  # one prefill-end forward per request, then verify steps
    if wrong_at is None:
        assert st.accepted == st.drafted  # acceptance 100%
        assert forwards / generated < 0.45  # ideal 1/(k+1) plus the prefill forward
    else:
        # Drafts before the corrupted position are accepted, none from it on; the state commit then resumes
        # from the scratch slot of the last accepted token.
        assert st.accepted_at[wrong_at] == 0
        assert st.accepted == sum(st.accepted_at[:wrong_at]) and (wrong_at == 0 or st.accepted > 0)
    llm.engine.check_integrity()


@pytest.mark.parametrize("setting", ["prefix-cache", "chunked", "preemption"])
def test_greedy_equal_with_other_features(tiny_mtp_model_dir, reference, oracle, setting):
    oracle["wrong_at"] = 1
    kw = {
        "prefix-cache": dict(page_size=16, prefix_snapshot_interval=32),
        "chunked": dict(max_num_batched_tokens=24, page_size=4),
        "preemption": dict(num_kv_pages=14, page_size=16),
    }[setting]
    llm = make(tiny_mtp_model_dir, 3, **kw)
    assert tokens(llm.generate(prompts(), G)) == reference
    assert tokens(llm.generate(prompts(), G)) == reference  # again: hits the prefix cache
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_integrity()


@pytest.mark.parametrize("page_size", [1, 4])
def test_stop_inside_an_accepted_group(tiny_mtp_model_dir, reference, oracle, page_size):
    """A stop token among accepted drafts ends the output there although the whole group was cached: the tokens
    after it are dropped and the sequence donates nothing to the prefix tree (its state is past its tokens)."""
    oracle["wrong_at"] = None
    stops = [r[5] for r in reference]
    params = [dataclasses.replace(G, stop_token_ids=[t]) for t in stops]
    want = [r[: r.index(t) + 1] for r, t in zip(reference, stops)]
    llm = make(tiny_mtp_model_dir, 3, page_size=page_size)
    for _ in range(2):  # the second round meets the first round's prefix-cache donations
        outs = llm.generate(prompts(), params)
        assert tokens(outs) == want and all(o.outputs[0].finish_reason == "stop" for o in outs)
        llm.engine.check_integrity()


def test_aborts_leak_nothing(tiny_mtp_model_dir, reference, oracle):
    llm = make(tiny_mtp_model_dir, 2, enable_prefix_caching=False)
    eng = llm.engine
    ps = prompts()
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, G)
    for step in range(6):
        eng.step()
        eng.check_integrity()
        eng.abort(f"r{step}")
    while eng.has_unfinished():
        eng.step()
        eng.check_integrity()
    assert eng.kv_pool.num_used == 0 and eng.state_pool.num_used == 0


def test_sampling_keeps_the_target_distribution(tiny_mtp_model_dir):
    """Sampled tokens decided through verification (rejection sampling against real MTP drafts) follow the same
    distribution as plain decoding: empirical marginals of tokens 2 and 3 over 1500 seeds each agree within
    sampling noise (top_k 3 keeps the outcome count small: <= 9 and <= 27; expected total variation from noise
    alone is about 0.03 and 0.05)."""
    n = 1500
    p = prompts(3)[2]
    params = [SamplingParams(temperature=0.8, top_k=3, max_tokens=3, ignore_eos=True, seed=s) for s in range(n)]
    plain = tokens(make(tiny_mtp_model_dir).generate([p] * n, params))
    spec_llm = make(tiny_mtp_model_dir, 2)
    spec = tokens(spec_llm.generate([p] * n, params))
    assert spec_llm.engine.spec.stats.drafted > 0
    for pos, limit in ((1, 0.1), (2, 0.12)):
        a = collections.Counter(t[pos] for t in plain)
        b = collections.Counter(t[pos] for t in spec)
        tv = 0.5 * sum(abs(a[x] - b[x]) for x in set(a) | set(b)) / n
        assert tv < limit, (pos, tv)


def test_acceptance_is_visible_in_stats_and_the_policy_adapts(tiny_mtp_model_dir, oracle):
    from nextserve.engine.spec_decode import DraftPolicy

    oracle["wrong_at"] = 2
    llm = make(tiny_mtp_model_dir, 3)
    llm.generate(prompts(), G)
    st = llm.engine.stats()
    assert st["spec_acceptance_rate_pos0"] == 1.0 and st["spec_acceptance_rate_pos2"] == 0.0
    assert 1.0 < st["spec_mean_acceptance_length"] <= 4.0
    # The policy: a compute-bound cost (time grows with tokens) and poor acceptance -> no drafts; a fixed cost
    # and good acceptance -> all of them.
    policy = DraftPolicy(3)
    for _ in range(20):
        policy.observe_acceptance(3, 0)
        policy.observe_step(64, 0.064, 0.01, 3)
        policy.observe_step(256, 0.256, 0.01, 3)
    assert policy.choose(64) == 0
    good = DraftPolicy(3)
    for _ in range(20):
        good.observe_acceptance(3, 3)
        good.observe_step(8, 0.0100, 0.0001, 3)
        good.observe_step(32, 0.0101, 0.0001, 3)
    assert good.choose(8) == 3


def test_n_stop_strings_and_logprobs_with_speculation(tiny_mtp_model_dir, reference, oracle):
    oracle["wrong_at"] = 2
    plain, spec = make(tiny_mtp_model_dir), make(tiny_mtp_model_dir, 3)
    p = prompts()[3]
    text = plain.generate([p], G)[0].outputs[0].text
    stop = text[5:8]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[stop], logprobs=2)
    a, b = plain.generate([p], params)[0].outputs[0], spec.generate([p], params)[0].outputs[0]
    assert (b.text, b.token_ids, b.finish_reason, b.stop_reason) == (
        a.text,
        a.token_ids,
        a.finish_reason,
        a.stop_reason,
    )
    assert [x.token_id for x in b.logprobs] == b.token_ids
    assert all(abs(x.logprob - y.logprob) < 1e-4 and len(x.top) == 2 for x, y in zip(b.logprobs, a.logprobs))
    two = spec.generate([p], SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert [c.token_ids for c in two.outputs] == [reference[3], reference[3]]
    spec.engine.check_integrity()
