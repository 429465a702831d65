"""Decode CUDA graphs against eager decoding (run on the device: pytest -m gpu).

The graph replays the same kernels as the eager step, so at a batch size that is a bucket the logits must be
bit-identical; a batch padded up to its bucket must stay close (the GEMMs see more rows); and the engine's greedy
outputs with graphs must equal its outputs without them.
"""

import random

import pytest
import torch

from nextserve import LLM, SamplingParams
from nextserve.engine.cuda_graph import DecodeGraphs
from nextserve.forward_batch import ForwardBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _llm(path, **kw):
    return LLM(model=str(path), device="cuda", dtype="bfloat16", disable_tqdm=True, mem_fraction_static=0.3, **kw)


@pytest.mark.parametrize("B", [4, 3])
def test_graph_step_matches_eager_step(tiny_model_dir, B):
    llm = _llm(tiny_model_dir, disable_cuda_graph=True)
    eng = llm.engine
    model, ps = eng.model, eng.config.page_size
    rng = random.Random(B)
    # B sequences with random context lengths, pages drawn at random from the pool (not in order).
    free = list(range(1, eng.kv_pool.num_pages))
    rng.shuffle(free)
    ctx = [rng.randint(0, 90) for _ in range(B)]
    tables = [[free.pop() for _ in range(c // ps + 1)] for c in ctx]
    slots = rng.sample(range(1, eng.state_pool.num_slots), B)
    ids = [rng.randrange(1000) for _ in range(B)]
    eng.kv_pool.k.normal_()
    eng.kv_pool.v.normal_()
    eng.state_pool.conv.normal_()
    eng.state_pool.ssm.normal_(0, 0.1)
    kv = (eng.kv_pool.k.clone(), eng.kv_pool.v.clone())
    states = (eng.state_pool.conv.clone(), eng.state_pool.ssm.clone())

    with torch.inference_mode():
        fb = ForwardBatch.build([1] * B, ctx, slots, tables, ps, device="cuda")
        hidden = model(torch.tensor(ids, device="cuda"), fb)
        eager = model.compute_logits(hidden).float()
        eager_ssm = eng.state_pool.ssm[:, slots].clone()
        # Same starting caches for the graph.
        eng.kv_pool.k.copy_(kv[0])
        eng.kv_pool.v.copy_(kv[1])
        eng.state_pool.conv.copy_(states[0])
        eng.state_pool.ssm.copy_(states[1])
        graphs = DecodeGraphs(model, ps, 16, 8, torch.device("cuda"), sizes=[4])
        graphs.capture()
        # Capture ran the model on padding rows only (dummy slot and page): restore the live caches.
        eng.kv_pool.k.copy_(kv[0])
        eng.kv_pool.v.copy_(kv[1])
        eng.state_pool.conv.copy_(states[0])
        eng.state_pool.ssm.copy_(states[1])
        _, logits = graphs.run(ids, ctx, slots, tables)
        graph_ssm = eng.state_pool.ssm[:, slots].clone()
    if B == 4:
        assert torch.equal(logits, eager)
        assert torch.equal(graph_ssm, eager_ssm)
    else:
        torch.testing.assert_close(logits, eager, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(graph_ssm, eager_ssm, rtol=2e-2, atol=2e-3)
    assert logits.argmax(-1).tolist() == eager.argmax(-1).tolist()


def _greedy(llm, n=9, max_tokens=24):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 1200, (int(torch.randint(1, 120, (1,), generator=g)),), generator=g).tolist()]
    prompts += [torch.randint(10, 1200, (17 * i + 3,), generator=g).tolist() for i in range(n - 1)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.engine.check_integrity()
    return outs


def _count_replays(llm) -> list[int]:
    """Wraps the engine's graph replays: the returned list gets the batch size (sequences) of every replay."""
    graphs = llm.engine.runner.graphs
    assert graphs is not None, "the engine did not capture decode graphs"
    batches = []
    run = graphs.run

    def counted(ids, *a):
        batches.append(len(ids))
        return run(ids, *a)

    graphs.run = counted
    return batches


def test_engine_greedy_with_graphs_equals_eager(tiny_model_dir):
    eager = _greedy(_llm(tiny_model_dir, disable_cuda_graph=True))
    llm = _llm(tiny_model_dir)
    replays = _count_replays(llm)
    graphs = _greedy(llm)
    assert len(replays) >= 20  # the decode steps went through the graphs
    # Padding changes the GEMMs' row counts, so a bf16 near-tie could in principle flip; none does on this model.
    assert graphs == eager


def test_engine_graphs_with_spec_decode_and_prefix_cache(tiny_mtp_model_dir):
    kw = dict(speculative_algorithm="NEXTN", speculative_num_steps=2, page_size=16, prefix_snapshot_interval=32)
    eager = _greedy(_llm(tiny_mtp_model_dir, disable_cuda_graph=True, **kw))
    llm = _llm(tiny_mtp_model_dir, **kw)
    replays = _count_replays(llm)
    assert _greedy(llm) == eager
    eng = llm.engine
    # Both kinds of decode step ran: verify steps (eager) and, once the adaptive policy drops to zero drafts on
    # this random MTP head, plain decode steps replayed from the graphs, with several sequences per replay.
    assert eng.spec.stats.verify_steps > 0, "no speculative verify step ran"
    assert len(replays) > 0, "no decode step replayed a CUDA graph"
    assert max(replays) > 1, f"every replay ran one sequence: {replays}"
    assert eng.cache.tree is not None and eng.cache.num_snapshots > 0  # snapshots beside the graphs
