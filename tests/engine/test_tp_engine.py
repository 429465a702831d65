"""Tensor parallelism through the engine (gloo processes on the CPU): TP2 and TP4 generate what TP1 generates, with
chunked prefill, preemption, prefix caching and NEXTN speculation on (and guided decoding); the ranks agree on
capacity; a size the model cannot be split into is an error before any process starts. One engine per case: each
rank is a process."""

import json

import pytest
from tiny import engine_config, write_tiny_checkpoint

from nextserve import LLM, SamplingParams

pytestmark = pytest.mark.timeout(600)

CASES = {
    # 1 KV head: replicated on every rank; 4 key heads so that TP4 splits the Gated DeltaNet.
    "kv1": dict(num_key_value_heads=1, linear_num_key_heads=4, linear_num_value_heads=8),
    # Value heads 3x key heads: a rank's value heads are the 3 of each of its key heads.
    "v3k": dict(linear_num_key_heads=2, linear_num_value_heads=6),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, overrides in CASES.items():
        path = tmp_path_factory.mktemp(f"tp-{name}")
        write_tiny_checkpoint(path, engine_config(**overrides), mtp=name == "kv1")
        out[name] = path
    return out


PROMPTS = [list(range(20 + i, 60 + 7 * i)) for i in range(5)]


def generate(path, tp: int, **kw):
    """Greedy tokens and logprobs of PROMPTS (then the last again: a prefix-cache hit), and engine counters."""
    kw.setdefault("max_num_batched_tokens", 24)  # chunked prefill
    kw.setdefault("num_kv_pages", 16)  # 256 tokens for 5 sequences of up to 74 at once: preemption
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    with LLM(model=str(path), dtype="float32", device="cpu", disable_tqdm=True, page_size=16, tp_size=tp, **kw) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        again = llm.generate(PROMPTS[-1:], params, use_tqdm=False)[0]
        eng = llm.engine
        counters = {
            "preemptions": eng.scheduler.num_preemptions,
            "cached": again.num_cached_tokens,
            "capacity": eng.capacity,
            "drafted": eng.spec.stats.drafted if eng.spec else 0,
        }
        eng.check_integrity()
    return [o.outputs[0] for o in outs + [again]], counters


def assert_same(got, ref):
    for g, r in zip(got, ref, strict=True):
        assert g.token_ids == r.token_ids
        for a, b in zip(g.logprobs, r.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize(
    "case,tp,kw",
    [
        ("kv1", 2, {}),
        ("kv1", 4, {}),
        ("v3k", 2, {}),
        ("kv1", 2, {"speculative_algorithm": "NEXTN", "speculative_num_steps": 2, "num_kv_pages": 12}),
    ],
    ids=["kv1-tp2", "kv1-tp4", "v3k-tp2", "kv1-tp2-nextn"],
)
def test_tp_generates_what_tp1_generates(checkpoints, case, tp, kw):
    ref, ref_counters = generate(checkpoints[case], 1, **kw)
    got, counters = generate(checkpoints[case], tp, **kw)
    assert_same(got, ref)
    # The features under test really ran, the same way on both.
    assert counters["preemptions"] == ref_counters["preemptions"] > 0
    assert counters["cached"] == ref_counters["cached"] > 0
    if kw:  # how many: the adaptive policy's choice, from timings that differ between runs (not between ranks)
        assert counters["drafted"] > 0 and ref_counters["drafted"] > 0
    # Each rank holds 1/tp of the state (KV too where the KV heads split): the same pages, smaller.
    assert counters["capacity"].num_pages == ref_counters["capacity"].num_pages == kw.get("num_kv_pages", 16)
    assert counters["capacity"].slot_bytes * tp == ref_counters["capacity"].slot_bytes


def test_sizes_the_model_cannot_split_fail_before_any_process_starts(checkpoints):
    import multiprocessing

    with pytest.raises(ValueError, match="not divisible by 4"):
        LLM(model=str(checkpoints["v3k"]), device="cpu", disable_tqdm=True, tp_size=4)
    assert not multiprocessing.active_children()
    with pytest.raises(ValueError, match="--nnodes 3 must divide --tp-size 2"):
        LLM(model=str(checkpoints["v3k"]), device="cpu", disable_tqdm=True, tp_size=2, nnodes=3)
    with pytest.raises(ValueError, match="only --dist-backend gloo can do"):
        LLM(model=str(checkpoints["v3k"]), device="cuda:0", disable_tqdm=True, tp_size=2)
    with pytest.raises(ValueError, match="--dist-backend nccl needs GPUs"):
        LLM(model=str(checkpoints["v3k"]), device="cpu", disable_tqdm=True, tp_size=2, dist_backend="nccl")
    assert not multiprocessing.active_children()


def test_tp2_guided_decoding_equals_tp1(checkpoints):
    """Every rank compiles the broadcast request's grammar and keeps its own matchers: TP2 with NEXTN gives TP1's
    constrained outputs (a JSON schema and a choice in one batch, beside an unconstrained request)."""
    from schema_check import SCHEMAS, validate

    from nextserve import StructuredOutput

    json_p = SamplingParams(temperature=0, max_tokens=80, structured=StructuredOutput(json=SCHEMAS[0]))
    choice_p = SamplingParams(temperature=0, max_tokens=8, structured=StructuredOutput(choice=["aye", "nay"]))
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    params = [json_p, choice_p, plain]

    def run(tp):
        kw = dict(speculative_algorithm="NEXTN", speculative_num_steps=2, speculative_adaptive=False)
        with LLM(
            model=str(checkpoints["kv1"]), dtype="float32", device="cpu", disable_tqdm=True, tp_size=tp, **kw
        ) as llm:
            return [o.outputs[0] for o in llm.generate(PROMPTS[:3], params, use_tqdm=False)]

    ref, got = run(1), run(2)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    validate(json.loads(got[0].text), SCHEMAS[0])
    assert got[1].text in ("aye", "nay")
