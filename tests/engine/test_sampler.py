"""Batched sampler: greedy, seeds, the distribution each filter samples from, penalties, masking, logprobs."""

import math

import pytest
import torch

from nextserve.engine.sampler import SamplingRow, build_sampling_batch, process_logits, sample
from nextserve.sampling_params import SamplingParams

# Fixed logits over a 6-token vocabulary for the statistical tests; no filter cut-off lies near a boundary.
LOGITS = [2.0, 1.2, 0.9, 0.1, -0.6, -2.0]
NUM_DRAWS = 20_000
# Chi-square critical values at significance 1e-4, indexed by degrees of freedom.
CHI2_CRIT = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74}


def params(**kwargs) -> SamplingParams:
    return SamplingParams(**kwargs).resolved()


def run(logits: torch.Tensor, rows: list[SamplingRow]):
    return sample(logits, build_sampling_batch(rows, logits.shape[-1], logits.device))


def expected_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """The renormalised distribution, computed token by token in plain Python from the definitions."""
    scaled = [v / temperature for v in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k > 0 else order
    z = sum(math.exp(scaled[i]) for i in kept)
    probs = {i: math.exp(scaled[i]) / z for i in kept}
    nucleus, mass = [], 0.0
    for i in kept:  # kept is in descending order
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += probs[i]
    p_max = probs[order[0]]
    final = [i for i in nucleus if probs[i] >= min_p * p_max]
    z = sum(probs[i] for i in final)
    return [probs[i] / z if i in final else 0.0 for i in range(len(logits))]


def test_greedy_equals_argmax_also_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    rows = [SamplingRow(params(temperature=0.0 if i % 2 == 0 else 1.5)) for i in range(6)]
    ids = run(logits, rows).token_ids
    assert ids.dtype == torch.long and ids.shape == (6,)
    assert torch.equal(ids[::2], logits[::2].argmax(-1))
    all_greedy = run(logits, [SamplingRow(params(temperature=0.0)) for _ in range(6)]).token_ids
    assert torch.equal(all_greedy, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    torch.manual_seed(1)
    logits = torch.randn(64, 30)
    ids = run(logits, [SamplingRow(params(temperature=temperature, top_k=1)) for _ in range(64)]).token_ids
    assert torch.equal(ids, logits.argmax(-1))


def test_half_precision_input_is_accepted_and_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(3, 40).to(torch.bfloat16)
    before = logits.clone()
    row = SamplingRow(params(temperature=0.8, top_p=0.9, repetition_penalty=1.5), output_ids=[1, 2, 3])
    out = run(logits, [row] * 3)
    assert torch.equal(logits, before)
    assert out.token_ids.shape == (3,)


def seeded_tokens(
    seed: int, position: int, others: list[SamplingRow], steps: int = 8, device: str = "cpu"
) -> list[int]:
    """Tokens of one seeded row sampled over several steps while sitting at `position` among `others`."""
    torch.manual_seed(123)
    logits = torch.randn(steps, 1000, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    tokens = []
    for step in range(steps):
        row = SamplingRow(params(temperature=0.9, top_k=500, top_p=0.95), generator=generator)
        rows = others[:position] + [row] + others[position:]
        batch_logits = torch.randn(len(rows), 1000, device=device)
        batch_logits[position] = logits[step]
        tokens.append(run(batch_logits, rows).token_ids[position].item())
    return tokens


def check_seeds_ignore_the_batch(device: str) -> None:
    alone = seeded_tokens(seed=7, position=0, others=[], device=device)
    others = [
        SamplingRow(params(temperature=1.0)),
        SamplingRow(params(temperature=0.5, top_p=0.5), generator=torch.Generator(device).manual_seed(7)),
        SamplingRow(params(temperature=0.0)),
        SamplingRow(params(min_p=0.1, presence_penalty=1.0), output_ids=[5, 6]),
    ]
    assert seeded_tokens(seed=7, position=3, others=others, device=device) == alone
    assert seeded_tokens(seed=7, position=1, others=others[:2], device=device) == alone
    assert seeded_tokens(seed=8, position=0, others=[], device=device) != alone


def test_same_seed_gives_same_tokens_in_any_batch():
    check_seeds_ignore_the_batch("cpu")


@pytest.mark.parametrize(
    "config",
    [
        {"temperature": 1.0},
        {"temperature": 0.6},
        {"temperature": 2.0},
        {"temperature": 1.0, "top_k": 3},
        {"temperature": 1.0, "top_p": 0.8},
        {"temperature": 1.0, "min_p": 0.2},
        {"temperature": 1.5, "top_k": 5, "top_p": 0.9, "min_p": 0.3},
        {"temperature": 0.7, "top_p": 0.95},
        {"temperature": 1.0, "top_k": 3, "top_p": 0.75},
    ],
)
@pytest.mark.parametrize("companion", ["greedy", "top_p_only"])
def test_samples_follow_the_renormalised_distribution(config, companion):
    torch.manual_seed(1234)
    logits = torch.tensor(LOGITS).expand(NUM_DRAWS, -1)  # one independent draw per row
    # A companion row picks the path: a greedy row gives the mixed path; a top-p row without top-k forces
    # top-p over a full sort instead of over the top-k values.
    companion_params = params(temperature=0.0) if companion == "greedy" else params(top_p=0.5)
    rows = [SamplingRow(params(**config))] * (NUM_DRAWS - 1) + [SamplingRow(companion_params)]
    ids = run(logits, rows).token_ids[:-1]
    counts = torch.bincount(ids, minlength=len(LOGITS)).tolist()
    expected = expected_distribution(LOGITS, **config)
    n = NUM_DRAWS - 1
    support = [i for i, p in enumerate(expected) if p > 0]
    assert all(counts[i] == 0 for i in range(len(LOGITS)) if expected[i] == 0), (counts, expected)
    chi2 = sum((counts[i] - n * expected[i]) ** 2 / (n * expected[i]) for i in support)
    assert chi2 < CHI2_CRIT[len(support) - 1], (counts, [round(n * p) for p in expected])


def test_expected_distribution_is_not_trivial():
    # Guards the statistical test: the configurations above must actually cut tokens and reshape mass.
    def support(*args) -> int:
        return sum(p > 0 for p in expected_distribution(LOGITS, *args))

    assert (support(1.0, 3), support(1.0, 0, 0.8), support(1.0, 0, 1.0, 0.2)) == (3, 3, 3)
    # In the combined configuration each filter removes one more token, in vLLM's order.
    assert [support(1.5, 5), support(1.5, 5, 0.9), support(1.5, 5, 0.9, 0.3)] == [5, 4, 3]
    # top-p sees the top-k renormalised distribution: over all six tokens 0.75 would need three.
    assert (support(1.0, 3, 0.75), support(1.0, 0, 0.75)) == (2, 3)


def test_penalties_match_a_scalar_computation():
    torch.manual_seed(3)
    vocab = 12
    logits = torch.randn(3, vocab) * 3
    rows = [
        SamplingRow(
            params(repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=0.9),
            prompt_ids=[0, 1, 1, 2],
            output_ids=[2, 3, 3, 3, 11],
        ),
        SamplingRow(params(repetition_penalty=0.6), prompt_ids=[4], output_ids=[5, 5]),
        SamplingRow(params(frequency_penalty=-1.0, presence_penalty=0.5), prompt_ids=[6], output_ids=[7, 7, 8]),
    ]
    got = process_logits(logits, build_sampling_batch(rows, vocab, "cpu"))
    for b, row in enumerate(rows):
        p = row.params
        for t in range(vocab):
            v = logits[b, t].item()
            if t in row.prompt_ids or t in row.output_ids:
                v = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
            count = list(row.output_ids).count(t)  # prompt tokens never count for these two
            v -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
            assert got[b, t].item() == pytest.approx(v, rel=1e-6, abs=1e-6), (b, t)


def test_masked_ids_are_never_sampled():
    torch.manual_seed(4)
    logits = torch.randn(200, 8)
    logits[:, 3] = 10.0  # token 3 (think: EOS) dominates
    logits[:, 5] = 9.0
    masked = SamplingRow(params(temperature=1.0), masked_ids=[3, 5])
    free = SamplingRow(params(temperature=0.0))
    rows = [masked, free] * 100
    ids = run(logits, rows).token_ids
    assert not torch.isin(ids[0::2], torch.tensor([3, 5])).any()
    assert (ids[1::2] == 3).all()
    greedy_masked = run(logits[:1], [SamplingRow(params(temperature=0.0), masked_ids=[3])]).token_ids
    assert greedy_masked.item() == 5


def test_logprobs_come_from_raw_logits_and_top_is_sorted():
    torch.manual_seed(5)
    logits = torch.randn(3, 30)
    rows = [
        SamplingRow(params(temperature=0.5, logprobs=4, repetition_penalty=2.0), output_ids=[1, 2]),
        SamplingRow(params(temperature=0.0, logprobs=0)),
        SamplingRow(params(temperature=1.3)),
    ]
    out = run(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids.shape == (3, 4) and out.top_logprobs.shape == (3, 4)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.allclose(out.top_logprobs, raw.gather(1, out.top_ids))
    assert torch.equal(out.top_ids[:, 0], logits.argmax(-1))


def test_logprobs_are_skipped_unless_asked():
    logits = torch.randn(2, 10)
    out = run(logits, [SamplingRow(params())] * 2)
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
    only_sampled = run(logits, [SamplingRow(params(logprobs=0))] * 2)
    assert only_sampled.logprobs is not None and only_sampled.top_ids is None


def test_build_rejects_bad_input():
    with pytest.raises(ValueError, match="resolved"):
        build_sampling_batch([SamplingRow(SamplingParams())], 10, "cpu")
    with pytest.raises(ValueError, match="no rows"):
        build_sampling_batch([], 10, "cpu")


def mixed_rows(device: str) -> list[SamplingRow]:
    """One row per feature, so that a single call goes through every step of the sampler."""
    return [
        SamplingRow(params(temperature=0.0, logprobs=5)),
        SamplingRow(params(temperature=0.7, top_k=20, top_p=0.8), output_ids=[1, 1, 2]),
        SamplingRow(params(top_p=0.9, min_p=0.05), generator=torch.Generator(device).manual_seed(3)),
        SamplingRow(
            params(repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5, logprobs=0),
            prompt_ids=[3, 4],
            output_ids=[5, 5],
            masked_ids=[0, 7],
        ),
    ]


@pytest.mark.gpu
def test_cuda_sampling_has_no_host_sync_and_matches_cpu():
    torch.manual_seed(6)
    vocab = 151_936
    logits = torch.randn(4, vocab, device="cuda", dtype=torch.bfloat16) * 4
    batch = build_sampling_batch(mixed_rows("cuda"), vocab, "cuda")
    # Without the top-p-only row, top-p runs over topk values instead of a full sort.
    topk_batch = build_sampling_batch(mixed_rows("cuda")[:2] * 2, vocab, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits, batch)
        processed = process_logits(logits, batch)
        sample(logits, topk_batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_batch = build_sampling_batch(mixed_rows("cpu"), vocab, "cpu")
    cpu = sample(logits.cpu(), cpu_batch)
    assert out.token_ids[0].item() == cpu.token_ids[0].item() == logits[0].float().argmax().item()
    assert torch.allclose(processed.cpu(), process_logits(logits.cpu(), cpu_batch), atol=1e-4, rtol=1e-5)
    assert torch.allclose(out.top_logprobs.cpu(), cpu.top_logprobs, atol=1e-4)
    check_seeds_ignore_the_batch("cuda")


@pytest.mark.gpu
def test_cuda_samples_follow_the_renormalised_distribution():
    torch.manual_seed(7)
    config = {"temperature": 1.5, "top_k": 5, "top_p": 0.9, "min_p": 0.3}
    logits = torch.tensor(LOGITS, device="cuda").expand(NUM_DRAWS, -1)
    ids = run(logits, [SamplingRow(params(**config))] * NUM_DRAWS).token_ids
    counts = torch.bincount(ids, minlength=len(LOGITS)).tolist()
    expected = expected_distribution(LOGITS, **config)
    support = [i for i, p in enumerate(expected) if p > 0]
    chi2 = sum((counts[i] - NUM_DRAWS * expected[i]) ** 2 / (NUM_DRAWS * expected[i]) for i in support)
    assert sum(counts[i] for i in support) == NUM_DRAWS and chi2 < CHI2_CRIT[len(support) - 1], counts
