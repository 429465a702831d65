"""Regressions found in review of the overlapped engine: logprobs read from a replayed graph's output after the next
replay, a request id reused while an aborted request's step is pending, and short sequences' tails pinned at the
prefix tree's root where page eviction never reached them."""

import torch

from nextserve import LLM, SamplingParams


def make(path, overlap=True, **kw):
    return LLM(
        model=str(path), dtype="float32", device="cpu", disable_tqdm=True, disable_overlap_schedule=not overlap, **kw
    )


def graph_like_outputs(engine) -> None:
    """On CPU, makes decode steps return views of one static buffer that the next decode step overwrites: what a
    replayed CUDA graph returns (`DecodeGraphs.run`: views valid until the next replay)."""
    execute, static = engine.runner.execute, {}

    def run(scheduled, snapshots=(), pending=None):
        hidden, logits = execute(scheduled, snapshots, pending)
        if not snapshots and all(s.num_tokens == 1 and not s.draft for s in scheduled):
            buf = static.setdefault("logits", torch.empty(64, logits.shape[-1]))
            buf[: logits.shape[0]].copy_(logits)
            return hidden, buf[: logits.shape[0]]
        return hidden, logits

    engine.runner.execute = run


def test_logprobs_with_graph_outputs_are_those_of_their_own_step(tiny_model_dir):
    def logprobs(overlap: bool):
        with make(tiny_model_dir, overlap) as llm:
            graph_like_outputs(llm.engine)
            p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
            outs = llm.generate([[5, 6, 7, 8, 9], [11, 12, 13]], p, use_tqdm=False)
        return [[(lp.token_id, round(lp.logprob, 4), lp.top) for lp in o.outputs[0].logprobs] for o in outs]

    assert logprobs(True) == logprobs(False)


def test_a_request_id_reused_after_an_abort_with_a_step_pending(tiny_model_dir):
    with make(tiny_model_dir) as llm:
        eng = llm.engine
        p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        eng.add_request("A", [5, 6, 7, 8], p)
        eng.add_request("B", [9, 10, 11, 12], p)
        for _ in range(3):
            eng.step()
        assert eng._pending is not None
        eng.abort("A")  # B still runs: the launched step holding the old A stays pending
        eng.add_request("A", [20, 21, 22], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        finished = {}
        for _ in range(50):
            if not eng.has_unfinished():
                break
            for out in eng.step():
                assert out.outputs[0].finish_reason != "abort", "the old request's output under the new one's id"
                if out.finished:
                    finished[out.request_id] = out
        assert finished["A"].outputs[0].finish_reason == "length" and len(finished["A"].outputs[0].token_ids) == 3
        assert not eng.scheduler.running and not eng.scheduler.waiting
        eng.check_integrity()


def test_short_sequences_do_not_pin_pages(tiny_model_dir):
    """Sequences shorter than a page once left tails at the root, which no page eviction reached: with 8 pages the
    ninth short request was never admitted."""
    with make(tiny_model_dir, page_size=16, num_kv_pages=8) as llm:
        eng = llm.engine
        p = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for i in range(20):
            eng.add_request(f"r{i}", [10 + i, 20 + i, 30 + i], p)
            for _ in range(50):
                if not eng.has_unfinished():
                    break
                eng.step()
            assert not eng.has_unfinished(), f"request {i} never ran: {eng.kv_pool.num_free} pages free"
        eng.check_integrity()
