"""Engine oracle 4: sampling controls end to end, through `LLM.generate` on the tiny random model.

Seeded sampling repeats exactly whatever it is batched with; the filters that reduce to argmax equal greedy;
stop strings, stop token ids, max_tokens and min_tokens end (or do not end) sequences as vLLM does; logprobs are
those of the model's raw logits; penalties act; generation_config.json fills the fields the user left unset.
Expected values are derived from greedy runs of the same model, never hard-coded.
"""

import json
import shutil

import pytest
import torch

from nextserve import LLM, SamplingParams

PROMPT = "Hello, my name is"
# Its greedy continuation on the tiny model repeats tokens, so that penalties have something to act on.
REPEATING_PROMPT = "hello world, this is a test"
OTHERS = ["The quick brown fox", "Once upon a time, in a land far away"]
SAMPLED = dict(temperature=0.8, top_p=0.9, max_tokens=16)


def make_llm(path, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    kw.setdefault("disable_tqdm", True)
    return LLM(model=str(path), **kw)


def completion(llm: LLM, params: SamplingParams, prompt=PROMPT):
    return llm.generate([prompt], params)[0].outputs[0]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make_llm(tiny_model_dir)


@pytest.fixture(scope="module")
def greedy(llm):
    """The greedy 16-token completion of PROMPT (EOS ignored so that the length is known)."""
    return completion(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))


def with_generation_config(src, dst, generation_config: dict):
    """A copy of the checkpoint at `src` whose generation_config.json is `generation_config`."""
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(generation_config))
    return dst


def first_new(tokens: list[int], start: int) -> int:
    """The first index >= start whose token does not occur earlier (so that it stops exactly there)."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i
    pytest.fail(f"no new token from index {start} in {tokens}")


def clean_substring(text: str, length: int, near: int) -> str:
    """A substring of `text` starting as close to `near` as possible, with no U+FFFD and not only blanks."""
    starts = sorted(range(len(text) - length + 1), key=lambda i: abs(i - near))
    for i in starts:
        s = text[i : i + length]
        if "\ufffd" not in s and s.strip():
            return s
    pytest.fail(f"no usable {length}-character substring in {text!r}")


# ---- seeds ---------------------------------------------------------------------------------------------------
def test_seeded_sampling_repeats_in_any_batch(llm, tiny_model_dir):
    seeded = SamplingParams(seed=1234, **SAMPLED)
    alone = completion(llm, seeded)
    # Batched with unseeded and differently seeded requests, in two orders.
    others = [SamplingParams(**SAMPLED), SamplingParams(seed=99, **SAMPLED)]
    first = llm.generate([PROMPT, *OTHERS], [seeded, *others])[0].outputs[0]
    last = llm.generate([*OTHERS, PROMPT], [*others, seeded])[2].outputs[0]
    # And on an engine that prefills in chunks of 4 tokens into 1-token pages.
    chunked = make_llm(tiny_model_dir, max_num_batched_tokens=4, page_size=1)
    rechunked = chunked.generate([OTHERS[1], PROMPT], [others[0], seeded])[1].outputs[0]
    assert len(alone.token_ids) == 16
    for out in (first, last, rechunked):
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text


def test_different_seeds_give_different_samples(llm):
    outs = llm.generate([PROMPT] * 3, [SamplingParams(seed=s, **SAMPLED) for s in (1, 2, 3)])
    tokens = [tuple(o.outputs[0].token_ids) for o in outs]
    assert len(set(tokens)) == 3


def test_n3_with_a_seed_gives_three_repeatable_samples(llm):
    params = SamplingParams(n=3, seed=7, **SAMPLED)
    out = llm.generate([PROMPT], params)[0]
    again = llm.generate([PROMPT], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_filters_that_keep_one_token_equal_greedy(llm, greedy):
    cases = [
        SamplingParams(temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=5, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=1.0, seed=6, max_tokens=16, ignore_eos=True),
    ]
    for out in llm.generate([PROMPT] * len(cases), cases):
        assert out.outputs[0].token_ids == greedy.token_ids
    # Control: plain sampling at temperature 1 does leave the greedy path.
    sampled = completion(llm, SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True))
    assert sampled.token_ids != greedy.token_ids


# ---- stop conditions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_ends_the_text(llm, greedy, include):
    text = greedy.text
    stop = clean_substring(text, 3, len(text) // 2)
    at = text.index(stop)
    out = completion(llm, SamplingParams(temperature=0, max_tokens=16, stop=[stop], include_stop_str_in_output=include))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (text[: at + len(stop)] if include else text[:at])
    if not include:
        assert stop not in out.text
    # It stopped on the token that completed the stop string, and generated the greedy tokens until then.
    assert out.token_ids == greedy.token_ids[: len(out.token_ids)]
    decode = llm.tokenizer.decode
    assert stop in decode(out.token_ids) and stop not in decode(out.token_ids[:-1])


def test_stop_token_id_ends_the_sequence(llm, greedy):
    g = greedy.token_ids
    stop_id = g[4]
    k = g.index(stop_id)
    out = completion(llm, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id]))
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # The stop id is the last token; its text is not part of the output (vLLM's convention).
    assert out.token_ids == g[: k + 1]
    assert out.text == llm.tokenizer.decode(g[:k], skip_special_tokens=True)


def test_max_tokens_gives_length(llm, greedy):
    out = completion(llm, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert out.finish_reason == "length" and out.stop_reason is None
    assert out.token_ids == greedy.token_ids[:5]


def test_min_tokens_holds_back_a_stop_token_id(llm, greedy):
    g = greedy.token_ids
    j = first_new(g, 1)
    stop_id = g[j]
    params = dict(temperature=0, max_tokens=10, stop_token_ids=[stop_id], ignore_eos=True)
    early = completion(llm, SamplingParams(**params))
    assert early.token_ids == g[: j + 1] and early.stop_reason == stop_id
    held = completion(llm, SamplingParams(min_tokens=j + 4, **params))
    assert len(held.token_ids) >= j + 4
    assert stop_id not in held.token_ids[: j + 4]
    assert held.token_ids[:j] == g[:j]
    if held.finish_reason == "stop":
        assert held.token_ids[-1] == stop_id


def test_min_tokens_holds_back_eos(llm, greedy, tiny_model_dir, tmp_path):
    # Make the greedy path hit EOS early: declare one of its first tokens the end-of-sequence token.
    g = greedy.token_ids
    i = first_new(g, 2)
    eos = with_generation_config(tiny_model_dir, tmp_path / "eos", {"eos_token_id": g[i]})
    eos_llm = make_llm(eos)
    stopped = completion(eos_llm, SamplingParams(temperature=0, max_tokens=12))
    assert stopped.token_ids == g[: i + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    held = completion(eos_llm, SamplingParams(temperature=0, max_tokens=12, min_tokens=i + 5))
    assert len(held.token_ids) >= i + 5 and g[i] not in held.token_ids[: i + 5]
    assert held.token_ids[:i] == g[:i]
    ignored = completion(eos_llm, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert ignored.token_ids == g[:12] and ignored.finish_reason == "length"


def test_min_tokens_holds_back_a_stop_string(llm, greedy):
    # A stop string inside the text of the first 3 greedy tokens; min_tokens asks for 8 tokens first.
    head = llm.tokenizer.decode(greedy.token_ids[:3], skip_special_tokens=True)
    stop = clean_substring(head, 2, 0)
    params = dict(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True)
    assert len(completion(llm, SamplingParams(**params)).token_ids) <= 3
    held = completion(llm, SamplingParams(min_tokens=8, **params))
    assert len(held.token_ids) >= 8


# ---- logprobs ------------------------------------------------------------------------------------------------
def test_logprobs_are_those_of_the_raw_logits(llm, monkeypatch):
    """The runner's logits are recorded as they leave the model: every TokenLogprob must be their log_softmax,
    untouched by temperature or top-p, with the top entries sorted best first."""
    recorded: list[torch.Tensor] = []
    execute = llm.engine.runner.execute

    def recording_execute(*args, **kwargs):
        hidden, logits = execute(*args, **kwargs)
        recorded.append(logits.clone())
        return hidden, logits

    monkeypatch.setattr(llm.engine.runner, "execute", recording_execute)
    for params, greedy in [
        (SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True), True),
        (SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=4, logprobs=3, ignore_eos=True), False),
    ]:
        recorded.clear()
        out = completion(llm, params)
        steps = [x[0] for x in recorded if x.shape[0] == 1]  # the request runs alone: one row per step
        assert len(steps) == len(out.token_ids) == len(out.logprobs) == 4
        for logits, token, lp in zip(steps, out.token_ids, out.logprobs):
            ref = torch.log_softmax(logits.double(), dim=-1)
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(ref[token].item(), abs=1e-5)
            best = ref.topk(3)
            assert [t for t, _ in lp.top] == best.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-5)
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            if greedy:
                assert token == int(ref.argmax())
    # logprobs=0: the sampled token's logprob only.
    out = completion(llm, SamplingParams(temperature=0, max_tokens=2, logprobs=0, ignore_eos=True))
    assert [lp.top for lp in out.logprobs] == [[], []] and all(lp.logprob <= 0 for lp in out.logprobs)


# ---- penalties and defaults ----------------------------------------------------------------------------------
def test_penalties_change_greedy_output(llm):
    base = dict(temperature=0, max_tokens=16, ignore_eos=True)
    cases = [
        SamplingParams(**base),
        SamplingParams(presence_penalty=2.0, **base),
        SamplingParams(frequency_penalty=2.0, **base),
        SamplingParams(repetition_penalty=2.0, **base),
    ]
    outs = [o.outputs[0].token_ids for o in llm.generate([REPEATING_PROMPT] * len(cases), cases)]
    plain = outs[0]
    # A presence or frequency penalty only acts on tokens generated before, so nothing changes until the
    # greedy path first repeats one.
    first_repeat = next((i for i, t in enumerate(plain) if t in plain[:i]), None)
    assert first_repeat is not None, "precondition: the greedy output repeats a token"
    for params, tokens in zip(cases[1:], outs[1:]):
        assert tokens != plain, params
        if params.repetition_penalty is None:
            assert tokens[:first_repeat] == plain[:first_repeat], params
            assert len(set(tokens)) > len(set(plain)), params


def test_generation_config_fills_unset_fields(llm, greedy, tiny_model_dir, tmp_path):
    cold = make_llm(with_generation_config(tiny_model_dir, tmp_path / "cold", {"temperature": 0.0}))
    unset = SamplingParams(seed=11, max_tokens=16, ignore_eos=True)
    assert completion(cold, unset).token_ids == greedy.token_ids
    # An explicit value wins over the config, and without the config the same params sample.
    explicit = SamplingParams(temperature=1.0, seed=11, max_tokens=16, ignore_eos=True)
    assert completion(cold, explicit).token_ids != greedy.token_ids
    assert completion(llm, unset).token_ids == completion(cold, explicit).token_ids
