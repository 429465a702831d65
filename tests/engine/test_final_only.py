"""Requests added with `stream=False` (how `LLM.generate` adds them): no output until the end, and text decoded once
at the end, equal to the text decoded token by token."""

import torch

from nextserve import LLM, SamplingParams


def _run(engine, prompts, params, stream: bool) -> tuple[dict, int]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params, stream=stream)
    final, unfinished_outputs = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
            else:
                unfinished_outputs += 1
    return final, unfinished_outputs


def test_final_only_outputs_and_text_equal_streamed(tiny_model_dir):
    g = torch.Generator().manual_seed(3)
    # Random ids: odd byte sequences (incomplete characters) and special tokens among them.
    prompts = [torch.randint(0, 1200, (n,), generator=g).tolist() for n in (3, 17, 40)]
    cases = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, skip_special_tokens=False, n=2, seed=1),
        SamplingParams(temperature=0.8, max_tokens=24, seed=5, stop=["e"]),  # stop strings: decoded token by token
    ]
    with LLM(model=str(tiny_model_dir), device="cpu", dtype="float32", disable_tqdm=True) as llm:
        for params in cases:
            streamed, n_stream = _run(llm.engine, prompts, params, stream=True)
            final, n_final = _run(llm.engine, prompts, params, stream=False)
            assert n_final == 0 and (n_stream > 0 or params.stop)
            assert final.keys() == streamed.keys()
            for rid, out in final.items():
                for a, b in zip(out.outputs, streamed[rid].outputs, strict=True):
                    assert (a.text, a.token_ids, a.finish_reason, a.stop_reason) == (
                        b.text,
                        b.token_ids,
                        b.finish_reason,
                        b.stop_reason,
                    )
                    if not params.stop:
                        assert a.text == llm.tokenizer.decode(
                            a.token_ids, skip_special_tokens=params.skip_special_tokens
                        )
            assert any(o.text for out in final.values() for o in out.outputs)
        llm.engine.check_integrity()


def test_aborted_final_only_request_keeps_its_text(tiny_model_dir):
    with LLM(model=str(tiny_model_dir), device="cpu", dtype="float32", disable_tqdm=True) as llm:
        engine = llm.engine
        engine.add_request("a", list(range(100, 120)), SamplingParams(temperature=0, max_tokens=50), stream=False)
        for _ in range(6):
            assert engine.step() == []
        out = engine.abort("a")
        engine.check_integrity()
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
