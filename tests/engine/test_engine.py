"""Engine oracle 2: batching, chunked prefill, page size, pool sizes and preemption change nothing in greedy
outputs; and oracle 1 end to end: greedy outputs equal transformers' generate."""

import pytest
import torch
from tiny import engine_config, hf_model

from nextserve import LLM, SamplingParams


def prompts(n=16, seed=0, vocab=1200):
    g = torch.Generator().manual_seed(seed)
    lens = [1, 300, 7, 64, 65, 2, 130, 33, 1, 250, 16, 17, 90, 3, 200, 45][:n]
    return [torch.randint(10, vocab, (L,), generator=g).tolist() for L in lens]


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def make_llm(path, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    kw.setdefault("disable_tqdm", True)
    return LLM(model=str(path), **kw)


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts()]


@pytest.mark.parametrize("budget", [16, 64, 4096])
@pytest.mark.parametrize("page_size", [1, 16])
def test_batch_equals_alone(tiny_model_dir, alone, budget, page_size):
    llm = make_llm(tiny_model_dir, max_num_batched_tokens=budget, page_size=page_size)
    outs = llm.generate(prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == alone
    llm.engine.check_integrity()
    llm.engine.reset_prefix_cache()  # what remains is the prefix cache's; without it, nothing
    assert llm.engine.kv_pool.num_used == 0 and llm.engine.state_pool.num_used == 0


@torch.inference_mode()
def test_greedy_equals_transformers_generate(tiny_model_dir, alone):
    ref = hf_model(engine_config(), seed=0)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    for p, ours in list(zip(prompts(), alone))[:6]:
        out = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)
        assert out[0, len(p) :].tolist() == ours


def test_greedy_32_tokens_equals_transformers(tiny_model_dir):
    ref = hf_model(engine_config(), seed=0)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    p = prompts()[3]
    out = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)
    ours = make_llm(tiny_model_dir).generate([p], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert ours[0].outputs[0].token_ids == out[0, len(p) :].tolist()


def test_two_state_slots_serve_twenty_requests(tiny_model_dir):
    ps = prompts() + prompts(4, seed=1)
    big = make_llm(tiny_model_dir).generate(ps, GREEDY)
    llm = make_llm(tiny_model_dir, max_mamba_cache_size=2)
    small = llm.generate(ps, GREEDY)
    assert llm.engine.capacity.num_slots == 2
    assert [o.outputs[0].token_ids for o in small] == [o.outputs[0].token_ids for o in big]
    llm.engine.check_integrity()


def test_small_kv_pool_preempts_and_outputs_are_unchanged(tiny_model_dir, alone):
    # 40 pages of 16 tokens: the 300-token prompt alone needs 20; all 16 prompts need ~90.
    llm = make_llm(tiny_model_dir, num_kv_pages=40, page_size=16)
    outs = llm.generate(prompts(), GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    llm.engine.check_integrity()
    llm.engine.reset_prefix_cache()
    assert llm.engine.kv_pool.num_used == 0


def test_bf16_recurrent_state_stays_close(tiny_model_dir):
    """--mamba-ssm-dtype bfloat16 halves the state pool. Every decode step (and every prefill chunk after the
    first, with a 64-token budget) starts from the stored state, so 24 greedy tokens and their logprobs must track
    a run with fp32 state: a state that is not stored, or stored wrongly, makes them diverge within a few steps."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    ref = make_llm(tiny_model_dir, max_num_batched_tokens=64).generate(prompts(), params)
    llm = make_llm(tiny_model_dir, mamba_ssm_dtype="bfloat16", max_num_batched_tokens=64)
    assert llm.engine.state_pool.ssm.dtype == torch.bfloat16
    outs = llm.generate(prompts(), params)
    whole, diffs = 0, []
    for ours, theirs in zip(outs, ref):
        a, b = ours.outputs[0], theirs.outputs[0]
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(b.token_ids))
        whole += n == len(b.token_ids) == 24
        # Logprobs of the same tokens after the same context: bf16 rounding of the state moves them by ~1e-3.
        diffs += [abs(x.logprob - y.logprob) for x, y in zip(a.logprobs[:n], b.logprobs[:n])]
    assert whole >= len(ref) - 2, f"only {whole} of {len(ref)} greedy continuations agree for 24 tokens"
    assert max(diffs) < 0.2 and sum(diffs) / len(diffs) < 5e-3, (max(diffs), sum(diffs) / len(diffs))
