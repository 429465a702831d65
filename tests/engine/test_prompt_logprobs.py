"""Prompt log-probabilities (vLLM's `prompt_logprobs`, what echo + logprobs on completions returns): equal to
transformers' log-softmax over the same prompt, whatever the chunking, with the prefix cache on (cached prompts are
recomputed, not skipped), and with max_tokens=0 nothing is generated and nothing leaks."""

import pytest
import torch

from nextserve import LLM, SamplingParams


def reference(model_dir, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V] log-probabilities of transformers' model: row i predicts prompt token i + 1."""
    from transformers import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    p = prompt(70, 3)
    return p, reference(tiny_model_dir, p)


def check(out, p, ref_lp, k):
    got = out.prompt_logprobs
    assert len(got) == len(p) and got[0] is None
    for i, entry in enumerate(got[1:]):
        assert entry.token_id == p[i + 1]
        assert entry.logprob == pytest.approx(ref_lp[i, p[i + 1]].item(), abs=1e-4)
        top = torch.topk(ref_lp[i], k)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("budget", [None, 16], ids=["one-chunk", "chunked-16"])
def test_prompt_logprobs_equal_transformers(tiny_model_dir, ref, budget):
    p, ref_lp = ref
    kw = {"max_num_batched_tokens": budget} if budget else {}
    with LLM(model=str(tiny_model_dir), dtype="float32", device="cpu", disable_tqdm=True, **kw) as llm:
        out = llm.generate([p], SamplingParams(max_tokens=0, prompt_logprobs=3, temperature=0), use_tqdm=False)[0]
        check(out, p, ref_lp, 3)
        assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
        # With tokens generated too, the prompt part is the same and the generation is unchanged.
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        plain = llm.generate([p], params, use_tqdm=False)[0]
        params.prompt_logprobs = 0
        both = llm.generate([p], params, use_tqdm=False)[0]
        assert both.outputs[0].token_ids == plain.outputs[0].token_ids
        assert [e.logprob for e in both.prompt_logprobs[1:]] == [e.logprob for e in out.prompt_logprobs[1:]]
        assert all(e.top == [] for e in both.prompt_logprobs[1:])
        llm.engine.check_integrity()


def test_cached_prompt_is_recomputed_for_its_logprobs(tiny_model_dir, ref):
    p, ref_lp = ref
    with LLM(model=str(tiny_model_dir), dtype="float32", device="cpu", disable_tqdm=True, page_size=16) as llm:
        greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        llm.generate([p], greedy, use_tqdm=False)
        again = llm.generate([p], greedy, use_tqdm=False)[0]
        assert again.num_cached_tokens > 0, "the prompt should be in the prefix cache"
        out = llm.generate([p], SamplingParams(max_tokens=0, prompt_logprobs=2), use_tqdm=False)[0]
        assert out.num_cached_tokens == 0
        check(out, p, ref_lp, 2)
        llm.engine.check_integrity()
