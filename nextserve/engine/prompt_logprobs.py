"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`): what each prefill chunk's positions say of the prompt
tokens that follow them. `score` runs in a step's launch half (device work only) and `record` in its process half.

Position p's logits score prompt token p + 1; the first prompt token has no score (None). A sequence that asks
computes its whole prompt (it takes nothing from the prefix cache: see `Sequence.wants_prompt_logprobs`), and after
a preemption the positions scored before are not scored again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextserve.engine.request import Sequence
from nextserve.forward_batch import to_device
from nextserve.outputs import TokenLogprob

# Computed this many positions at a time: [rows, vocab] fp32 logits each.
ROWS = 256


@dataclass
class PromptScores:
    """Scores computed in one step, on the device: prompt tokens first+1 .. first+n, by positions first .. first+n-1."""

    seq: Sequence
    first: int
    token_logprobs: torch.Tensor  # [n]
    top_ids: torch.Tensor | None  # [n, k]
    top_logprobs: torch.Tensor | None


def score(model, scheduled, hidden: torch.Tensor, starts: dict, device: torch.device) -> list[PromptScores]:
    """The scores of the prompt tokens this step's chunks predict, for the sequences that asked. `starts` maps
    seq_id to (first position, first hidden row) of what the step computed."""
    out = []
    for s in scheduled:
        seq = s.seq
        if not seq.wants_prompt_logprobs:
            continue
        first, row = starts[seq.seq_id]
        lo = max(first, len(seq.prompt_logprobs) - 1)
        hi = min(first + s.num_tokens, seq.num_prompt - 1)
        if lo >= hi:
            continue
        k = seq.params.prompt_logprobs
        targets = to_device(seq.token_ids[lo + 1 : hi + 1], torch.int64, device)
        token_lp, top_ids, top_lp = [], [], []
        for a in range(lo, hi, ROWS):
            b = min(a + ROWS, hi)
            lp = torch.log_softmax(model.compute_logits(hidden[row + a - first : row + b - first]).float(), -1)
            token_lp.append(lp.gather(1, targets[a - lo : b - lo, None])[:, 0])
            if k:
                top = torch.topk(lp, k, dim=-1)
                top_ids.append(top.indices)
                top_lp.append(top.values)
        cat = torch.cat
        out.append(PromptScores(seq, lo, cat(token_lp), cat(top_ids) if k else None, cat(top_lp) if k else None))
    return out


def record(scores: list[PromptScores]) -> None:
    """Appends a step's scores to their sequences' `prompt_logprobs` (host reads: the process half)."""
    for sc in scores:
        seq = sc.seq
        if seq.finished:
            continue  # aborted since the launch
        ids = seq.token_ids[sc.first + 1 : sc.first + 1 + len(sc.token_logprobs)]
        lps = sc.token_logprobs.tolist()
        top_ids = sc.top_ids.tolist() if sc.top_ids is not None else [[]] * len(lps)
        top_lp = sc.top_logprobs.tolist() if sc.top_logprobs is not None else [[]] * len(lps)
        for tok, lp, ti, tl in zip(ids, lps, top_ids, top_lp):
            seq.prompt_logprobs.append(TokenLogprob(tok, lp, list(zip(ti, tl))))
