"""Prompt log-probabilities through the server (the real engine on the tiny model, CPU): `echo` + `logprobs` on
/v1/completions in the shapes lm-evaluation-harness reads, vLLM's `prompt_logprobs` on completions and chat, all
equal to what `LLM.generate(..., SamplingParams(max_tokens=0, prompt_logprobs=k))` computes for the same tokens."""

from __future__ import annotations

import openai
import pytest
import torch

from nextserve import LLM, SamplingParams

from .conftest import MODEL, real_engine_server

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs home."


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    yield from real_engine_server(tiny_model_dir, page_size=16)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(model=str(tiny_model_dir), dtype="float32", device="cpu", disable_tqdm=True) as llm:
        yield llm


@pytest.fixture
def client(real):
    with openai.OpenAI(base_url=real.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(10, 1200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def scored(llm, prompt: list[int], k: int):
    """The engine's own prompt scores: [None, TokenLogprob, ...]."""
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=k), use_tqdm=False)[0]
    return out.prompt_logprobs


def check_echo(lp, prompt: list[int], ref, tokenizer, k: int) -> None:
    """`lp` (a choice's logprobs) starts with the prompt's tokens, scored as `ref` says."""
    n = len(prompt)
    assert lp.tokens[:n] == [tokenizer.decode([t]) for t in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert lp.token_logprobs[1:n] == pytest.approx([e.logprob for e in ref[1:]], abs=1e-5)
    for top, e in zip(lp.top_logprobs[1:n], ref[1:]):
        want = {tokenizer.decode([t]): v for t, v in e.top}
        want.setdefault(tokenizer.decode([e.token_id]), e.logprob)  # the prompt token is always there
        assert top.keys() == want.keys() and list(top.values()) == pytest.approx(list(want.values()), abs=1e-5)
    assert len(ref[1].top) == k
    lengths = [len(t) for t in lp.tokens]
    assert lp.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]


def test_echo_logprobs_equal_llm_generate(client, llm, tokenizer):
    prompt = tokenizer.encode(TEXT)
    r = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=3, temperature=0)
    c = r.choices[0]
    assert c.text == TEXT and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(prompt) and "".join(c.logprobs.tokens) == TEXT
    check_echo(c.logprobs, prompt, scored(llm, prompt, 3), tokenizer, 3)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 0


def loglikelihood(choice, ctxlen: int) -> tuple[float, bool]:
    """What lm-evaluation-harness' OpenAI-completions backend computes from a choice (max_tokens=1: the last
    token is generated and dropped)."""
    lps = choice.logprobs.token_logprobs[ctxlen:-1]
    tops = choice.logprobs.top_logprobs[ctxlen:-1]
    return sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))


@pytest.mark.parametrize("as_text", [False, True], ids=["token-ids", "text"])
def test_lm_eval_loglikelihood_batch(client, llm, tokenizer, as_text):
    """lm-eval's request: a batch of prompts (context + continuation), max_tokens 1, logprobs 1, echo, greedy."""
    contexts = [ids(12, 1), ids(7, 2), ids(20, 3)]
    continuations = [ids(3, 4), ids(1, 5), ids(5, 6)]
    if as_text:  # text prompts: score what the server's tokenizer makes of them
        texts = [tokenizer.decode(c + x) for c, x in zip(contexts, continuations)]
        prompts = [tokenizer.encode(t) for t in texts]
    else:
        prompts = [c + x for c, x in zip(contexts, continuations)]
    r = client.completions.create(
        model=MODEL, prompt=texts if as_text else prompts, max_tokens=1, logprobs=1, echo=True, temperature=0, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice, prompt, cont in zip(r.choices, prompts, continuations):
        ref = scored(llm, prompt, 1)
        check_echo(choice.logprobs, prompt, ref, tokenizer, 1)
        assert len(choice.logprobs.tokens) == len(prompt) + 1  # the prompt, then the one generated token
        ctxlen = len(prompt) - len(cont)
        total, greedy = loglikelihood(choice, ctxlen)
        assert total == pytest.approx(sum(e.logprob for e in ref[ctxlen:]), abs=1e-4)
        assert greedy == all(e.token_id == e.top[0][0] for e in ref[ctxlen:])
        # The generated token's logprob is greedy too, and its text follows the prompt's.
        assert choice.logprobs.token_logprobs[-1] == max(choice.logprobs.top_logprobs[-1].values())
        assert choice.text.startswith(tokenizer.decode(prompt))
    # max_tokens 0 (lm-eval's older shape): the same scores, nothing generated.
    r0 = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, logprobs=1, echo=True, temperature=0)
    for c0, c1 in zip(r0.choices, r.choices):
        assert c0.logprobs.token_logprobs == pytest.approx(c1.logprobs.token_logprobs[:-1], abs=1e-6)
    assert r0.usage.completion_tokens == 0


def test_echo_stream_equals_non_stream(client, tokenizer):
    kw = dict(model=MODEL, prompt=TEXT, max_tokens=4, echo=True, logprobs=2, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.text and whole.text.startswith(TEXT)
    lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert chunks[0].choices[0].text.startswith(TEXT)  # the prompt goes out first, with its scores
    assert [t for lp in lps for t in lp.tokens] == whole.logprobs.tokens
    assert [v for lp in lps for v in lp.token_logprobs] == pytest.approx(whole.logprobs.token_logprobs)
    assert [o for lp in lps for o in lp.text_offset] == whole.logprobs.text_offset


def test_echo_without_logprobs_and_n2(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=[TEXT, "ROMEO:"], max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text.startswith(TEXT) and r.choices[1].text.startswith("ROMEO:")
    assert all(c.logprobs is None for c in r.choices)
    r = client.completions.create(model=MODEL, prompt=TEXT, n=2, max_tokens=2, echo=True, logprobs=1, seed=5)
    n = len(tokenizer.encode(TEXT))
    for c in r.choices:
        assert c.text.startswith(TEXT) and c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) == n + 2
    assert r.choices[0].logprobs.token_logprobs[:n] == r.choices[1].logprobs.token_logprobs[:n]


def check_vllm_prompt_logprobs(got, ref, tokenizer) -> None:
    """vLLM's shape: null, then {token id: {logprob, rank, decoded_token}}, the prompt token first."""
    assert len(got) == len(ref) and got[0] is None
    for entry, e in zip(got[1:], ref[1:]):
        keys = list(entry)
        assert keys[0] == str(e.token_id)
        assert entry[keys[0]]["logprob"] == pytest.approx(e.logprob, abs=1e-5)
        assert entry[keys[0]]["decoded_token"] == tokenizer.decode([e.token_id])
        for rank, (tid, lp) in enumerate(e.top, start=1):
            assert entry[str(tid)]["rank"] == rank and entry[str(tid)]["logprob"] == pytest.approx(lp, abs=1e-5)
        own_rank = next((r for r, (tid, _) in enumerate(e.top, 1) if tid == e.token_id), None)
        assert entry[keys[0]]["rank"] == own_rank


def test_vllm_prompt_logprobs_field(client, llm, tokenizer):
    prompt = ids(15, 7)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 2})
    check_vllm_prompt_logprobs(r.choices[0].model_extra["prompt_logprobs"], scored(llm, prompt, 2), tokenizer)
    assert r.choices[0].logprobs is None and not r.choices[0].text.startswith(tokenizer.decode(prompt))
    msgs = [{"role": "user", "content": "Speak, ROMEO."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, extra_body={"prompt_logprobs": 1})
    chat_ids = tokenizer.encode(
        tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )
    assert r.usage.prompt_tokens == len(chat_ids)
    check_vllm_prompt_logprobs(r.model_extra["prompt_logprobs"], scored(llm, chat_ids, 1), tokenizer)
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert "prompt_logprobs" not in plain.model_extra
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model=MODEL, prompt="x", stream=True, extra_body={"prompt_logprobs": 1})
