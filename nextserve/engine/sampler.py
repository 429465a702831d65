"""Batched token sampling: penalties, min_tokens masking, temperature, top-k, top-p, min-p, then a draw.

Contract: `build_sampling_batch(rows, vocab_size, device)` turns per-row data (resolved SamplingParams, an
optional torch.Generator, the token history, the ids to forbid this step, a grammar's token mask) into tensors once
per step;
`sample(logits, batch)` then runs on CPU or CUDA without reading anything back to the host, and returns the
chosen ids plus, when some row asked for them, log-probabilities of the RAW logits (before penalties and
temperature, as vLLM does). `process_logits` exposes the final distribution for speculative decoding.

Order of operations per row (vLLM's): repetition, frequency and presence penalties -> -inf on the forbidden
ids and on the ids a grammar does not allow -> divide by temperature -> keep the top_k largest -> keep the smallest
most-probable set of mass >= top_p -> drop tokens with p < min_p * p_max -> draw. Greedy rows (temperature 0 or
top_k 1) take the argmax of the penalised logits. Filters act as value thresholds in vocabulary order, so tokens
tied with a cut-off are kept.

A draw is the exponential race argmax_i(p_i / q_i), q_i ~ Exp(1), in log space: argmax(logit_i - log q_i).
The noise is indexed by vocabulary id and a seeded row draws it from its own generator, so a given seed gives
the same tokens whatever else is in the batch and wherever the row sits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nextserve.engine.structured import apply_token_bitmask
from nextserve.forward_batch import to_device
from nextserve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence for one step."""

    params: SamplingParams  # resolved (SamplingParams.resolved)
    prompt_ids: Sequence[int] = ()  # read only for the repetition penalty
    output_ids: Sequence[int] = ()  # read for all three penalties
    generator: torch.Generator | None = None  # set for seeded requests; lives as long as the request
    # Ids to forbid this step, e.g. EOS and stop_token_ids while fewer than min_tokens have been generated.
    masked_ids: Sequence[int] = ()
    # Guided decoding: fills row `row` of a host int32 bitmask [B, ceil(V / 32)] (bit i of word w set: token
    # 32 w + i allowed) with the tokens the row's grammar allows; rows without one stay all ones.
    token_mask: Callable[[torch.Tensor, int], None] | None = None


@dataclass
class SamplingBatch:
    """Per-step sampling tensors (B rows, V vocab). A None field means that no row needs that step."""

    temperature: torch.Tensor  # [B] f32; 1.0 on greedy rows so that dividing is harmless
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    any_greedy: bool
    seeded: list[tuple[int, torch.Generator]]  # (row, generator) for rows that draw their own noise
    num_logprobs: int | None  # K = max requested top logprobs; None: no row asked for logprobs
    top_k: torch.Tensor | None = None  # [B] long; V on rows without top-k
    max_top_k: int = 0  # largest enabled top_k
    top_p: torch.Tensor | None = None  # [B, 1] f32
    top_p_without_top_k: bool = False  # some row needs top-p over the whole vocabulary
    log_min_p: torch.Tensor | None = None  # [B, 1] f32; log(min_p), -inf where min_p is 0
    repetition_penalty: torch.Tensor | None = None  # [B, 1] f32
    seen: torch.Tensor | None = None  # [B, V] bool: token occurs in the prompt or the output
    frequency_penalty: torch.Tensor | None = None  # [B, 1] f32
    presence_penalty: torch.Tensor | None = None  # [B, 1] f32
    output_counts: torch.Tensor | None = None  # [B, V] f32: occurrences in the output
    masked_flat: torch.Tensor | None = None  # [M] long: row * V + id for each of the M ids set to -inf
    token_bitmask: torch.Tensor | None = None  # [B, ceil(V / 32)] int32: allowed tokens (grammars); -1 = all


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] long
    logprobs: torch.Tensor | None  # [B] f32: logprob of the sampled token
    top_ids: torch.Tensor | None  # [B, K] long, best first; None when K is 0
    top_logprobs: torch.Tensor | None  # [B, K] f32


def build_sampling_batch(rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str) -> SamplingBatch:
    """Gather per-row data into tensors on `device`; penalty tensors only when some row uses them."""
    if not rows:
        raise ValueError("cannot build a sampling batch with no rows")
    device = torch.device(device)
    params = [r.params for r in rows]
    for p in params:
        if not p.is_resolved:
            raise ValueError("SamplingParams must be resolved (SamplingParams.resolved) before sampling")
    for r in rows:
        if r.generator is not None and r.generator.device.type != device.type:
            raise ValueError(f"a row's generator is on {r.generator.device}, the batch on {device}")

    # Filters are skipped on greedy rows: they cannot change the argmax.
    greedy = [p.greedy for p in params]
    temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
    top_k = [p.top_k if p.top_k > 0 and not g else vocab_size for p, g in zip(params, greedy)]
    top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
    log_min_p = [math.log(p.min_p) if p.min_p > 0 and not g else -math.inf for p, g in zip(params, greedy)]
    repetition = [p.repetition_penalty for p in params]
    frequency = [p.frequency_penalty for p in params]
    presence = [p.presence_penalty for p in params]
    # One host-to-device copy for all per-row scalars; top_k is exact in f32 for vocabularies below 2**24.
    names = ["temperature", "greedy", "top_p", "log_min_p", "repetition", "frequency", "presence", "top_k"]
    values = [temperature, greedy, top_p, log_min_p, repetition, frequency, presence, top_k]
    column = dict(zip(names, to_device(values, torch.float32, device)))  # each [B]

    batch = SamplingBatch(
        temperature=column["temperature"],
        greedy=column["greedy"] > 0,
        all_greedy=all(greedy),
        any_greedy=any(greedy),
        seeded=[(i, r.generator) for i, (r, g) in enumerate(zip(rows, greedy)) if r.generator is not None and not g],
        num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=None),
    )
    if min(top_k) < vocab_size:
        batch.top_k = column["top_k"].long()
        batch.max_top_k = max(k for k in top_k if k < vocab_size)
    if min(top_p) < 1.0:
        batch.top_p = column["top_p"][:, None]
        batch.top_p_without_top_k = any(p < 1.0 and k >= vocab_size for p, k in zip(top_p, top_k))
    if max(log_min_p) > -math.inf:
        batch.log_min_p = column["log_min_p"][:, None]

    # Histories are only scattered for rows whose penalty is not neutral, to keep host work small.
    if any(r != 1.0 for r in repetition):
        batch.repetition_penalty = column["repetition"][:, None]
        history = [[*r.prompt_ids, *r.output_ids] if r.params.repetition_penalty != 1.0 else [] for r in rows]
        batch.seen = _token_counts(history, vocab_size, device) > 0
    if any(f != 0.0 or p != 0.0 for f, p in zip(frequency, presence)):
        batch.frequency_penalty = column["frequency"][:, None]
        batch.presence_penalty = column["presence"][:, None]
        history = [r.output_ids if r.params.frequency_penalty or r.params.presence_penalty else [] for r in rows]
        batch.output_counts = _token_counts(history, vocab_size, device)

    masked = [i * vocab_size + t for i, r in enumerate(rows) for t in r.masked_ids]
    if masked:
        batch.masked_flat = to_device(masked, torch.long, device)
    if any(r.token_mask is not None for r in rows):
        # One bitmask for the batch, filled on the host by each constrained row's matcher, one copy to the device.
        bitmask = torch.full((len(rows), -(-vocab_size // 32)), -1, dtype=torch.int32)
        for i, r in enumerate(rows):
            if r.token_mask is not None:
                r.token_mask(bitmask, i)
        batch.token_bitmask = to_device(bitmask, bitmask.dtype, device)
    return batch


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The f32 logits [B, V] that rows are drawn from: penalised, masked, scaled, filtered (-inf: dropped).

    Greedy rows are penalised and masked only; softmax of a sampled row is its final distribution (what
    speculative decoding needs). The input tensor is not modified.
    """
    assert logits.dim() == 2 and logits.shape[0] == batch.temperature.shape[0], "logits must be [B, V]"
    # NOTE: an explicit copy: the in-place steps below must leave the caller's raw logits for the logprobs.
    x = logits.to(torch.float32, copy=True)
    _apply_penalties(x, batch)
    if batch.masked_flat is not None:
        # Flat indices: scalar assignment through [rows, cols] indexing would synchronise with the host.
        x.view(-1).index_fill_(0, batch.masked_flat, -math.inf)
    if batch.token_bitmask is not None:
        apply_token_bitmask(x, batch.token_bitmask)
    if not batch.all_greedy:
        x.div_(batch.temperature[:, None])
        _apply_filters(x, batch)
    return x


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Choose one token per row of `logits` [B, V]; the input tensor is not modified."""
    x = process_logits(logits, batch)
    # Greedy rows have temperature 1 and no filters, so this is the argmax of their penalised logits.
    greedy_ids = x.argmax(dim=-1) if batch.any_greedy else None
    if batch.all_greedy:
        return _with_logprobs(logits, greedy_ids, batch.num_logprobs)
    noise = _exponential_noise(x, batch).log_()
    token_ids = torch.sub(x, noise, out=noise).argmax(dim=-1)  # reuses the noise buffer
    if greedy_ids is not None:
        token_ids = torch.where(batch.greedy, greedy_ids, token_ids)
    return _with_logprobs(logits, token_ids, batch.num_logprobs)


def _apply_penalties(x: torch.Tensor, batch: SamplingBatch) -> None:
    """vLLM's definitions: repetition divides positive / multiplies negative logits of any seen token; then
    logit -= frequency_penalty * count + presence_penalty * (count > 0), counting output tokens only."""
    if batch.seen is not None:
        rp = batch.repetition_penalty
        x.copy_(torch.where(batch.seen, torch.where(x > 0, x / rp, x * rp), x))
    if batch.output_counts is not None:
        counts = batch.output_counts
        x.sub_(batch.frequency_penalty * counts + batch.presence_penalty * (counts > 0))


def _apply_filters(x: torch.Tensor, batch: SamplingBatch) -> None:
    """Top-k, top-p and min-p on temperature-scaled logits, folded into one per-row floor: below it is -inf."""
    floor = None  # [B, 1]
    best = None  # [B, C]: the C largest logits of each row, best first
    if batch.top_k is not None or batch.top_p is not None:
        vocab = x.shape[-1]
        # C covers every row's top_k, so top-p needs a full sort only when some row asks for top-p without
        # top-k (generation configs usually set both, and topk(20) is far cheaper than sorting 150k values).
        c = vocab if batch.top_p_without_top_k else min(batch.max_top_k, vocab)
        best = x.sort(dim=-1, descending=True).values if c == vocab else x.topk(c, dim=-1).values
    if batch.top_k is not None:
        kth = best.gather(1, batch.top_k.clamp(max=best.shape[-1])[:, None] - 1)
        floor = torch.where(batch.top_k[:, None] >= x.shape[-1], -math.inf, kth)  # V means no top-k
        best = best.masked_fill(best < floor, -math.inf)
    if batch.top_p is not None:
        # A top-p row's survivors of top-k all lie in `best`, so its softmax is the renormalised distribution
        # (up to exact ties with the k-th value beyond position C, which are kept but not counted).
        probs = best.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Keep token i while the tokens before it hold less than top_p: the smallest set of mass >= top_p.
        keep = (mass_before < batch.top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
        # top_p = 1 keeps everything even if rounding pushed the running sum to 1 early.
        cut = torch.where(batch.top_p >= 1.0, -math.inf, best.gather(1, keep - 1))
        floor = cut if floor is None else torch.maximum(floor, cut)
    if batch.log_min_p is not None:
        # p_i < min_p * p_max  <=>  logit_i < max_logit + log(min_p); the ratio ignores renormalisation.
        top = best[:, :1] if best is not None else x.amax(dim=-1, keepdim=True)
        cut = top + batch.log_min_p
        floor = cut if floor is None else torch.maximum(floor, cut)
    if floor is not None:
        x.masked_fill_(x < floor, -math.inf)


def _exponential_noise(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """q ~ Exp(1) of x's shape; seeded rows draw theirs from their own generator."""
    q = torch.empty_like(x).exponential_()
    for row, generator in batch.seeded:
        # A fresh contiguous tensor per row, so the draw cannot depend on the row's position in the batch.
        q[row] = torch.empty_like(x[row]).exponential_(generator=generator)
    # NOTE: the CPU generator can return q = 0, and -inf - log(0) is NaN, which argmax would pick.
    return q.clamp_(min=torch.finfo(torch.float32).tiny)


def _with_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int | None) -> SamplerOutput:
    out = SamplerOutput(token_ids=token_ids, logprobs=None, top_ids=None, top_logprobs=None)
    if k is None:
        return out
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V] of the raw logits
    out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if k > 0:
        out.top_logprobs, out.top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return out


def _token_counts(history: list[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] f32 occurrence counts of each row's ids, scattered on the device from one padded copy."""
    width = max((len(h) for h in history), default=0)
    # Padding points at an extra column V that is dropped afterwards.
    padded = torch.full((len(history), max(width, 1)), vocab_size, dtype=torch.long)
    for i, h in enumerate(history):
        if h:
            padded[i, : len(h)] = torch.as_tensor(h, dtype=torch.long)
    padded = to_device(padded, padded.dtype, device)
    counts = torch.zeros(len(history), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]
