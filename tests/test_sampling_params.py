"""SamplingParams: validation, normalisation, resolution from a generation config, greedy."""

import pytest

from nextserve.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_boundary_values_are_accepted():
    SamplingParams(
        temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0,
        repetition_penalty=0.01, max_tokens=1, min_tokens=1, logprobs=20, seed=0,
    )  # fmt: skip
    SamplingParams(max_tokens=None, min_tokens=10_000, logprobs=0)


def test_stop_is_normalised_to_a_list():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams().stop == []
    assert SamplingParams().stop_token_ids == []


def test_resolution_prefers_user_then_config_then_neutral():
    config = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": [1, 2]}
    p = SamplingParams(temperature=0.3, max_tokens=7, stop="x").resolved(config)
    assert (p.temperature, p.top_p, p.top_k) == (0.3, 0.95, 20)
    assert (p.min_p, p.repetition_penalty) == (0.0, 1.0)
    assert (p.max_tokens, p.stop) == (7, ["x"])
    assert p.is_resolved and not SamplingParams().is_resolved

    neutral = SamplingParams().resolved(None)
    assert (neutral.temperature, neutral.top_p, neutral.top_k, neutral.min_p, neutral.repetition_penalty) == (
        1.0, 1.0, 0, 0.0, 1.0,
    )  # fmt: skip
    # The original is untouched.
    assert SamplingParams(top_k=5).resolved({"top_k": 20}).top_k == 5


def test_resolution_maps_top_k_minus_one_to_disabled():
    assert SamplingParams(top_k=-1).resolved().top_k == 0
    assert SamplingParams().resolved({"top_k": -1}).top_k == 0


def test_resolution_validates_config_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams().resolved({"top_p": 0.0})


def test_greedy():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy
    assert not SamplingParams().resolved({"temperature": 0.6}).greedy
    assert SamplingParams().resolved({"temperature": 0.0}).greedy


def test_tiny_temperature_is_greedy():
    """vLLM's rule: a temperature below 1e-5 is greedy (dividing logits by it would overflow)."""
    assert SamplingParams(temperature=1e-30).resolved().greedy
    assert not SamplingParams(temperature=1e-3).resolved().greedy
