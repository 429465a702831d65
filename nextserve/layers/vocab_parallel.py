"""Vocabulary-parallel embedding and lm_head: rank r holds vocabulary rows [r V/n, (r+1) V/n) of each.

The embedding looks up the ids that fall in the rank's rows, writes zeros for the others and all-reduces, so every
rank ends with the full [T, H] embedding (one all-reduce per forward). The lm_head computes the rank's slice of
the logits and all-gathers them: every rank returns the full-vocabulary [R, V] logits, so sampling can run on any
rank (or on all of them, deterministically). At TP1 both are a plain lookup and a plain matmul.

The vocabulary must divide by the TP size (Qwen3-Next's 151936 divides by 2..128).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextserve.layers.shard import Split
from nextserve.parallel import Communicator, ParallelContext


def _vocab_param(vocab: int, hidden: int, ctx: ParallelContext, dtype) -> nn.Parameter:
    p = nn.Parameter(torch.empty(ctx.split(vocab, "vocab_size"), hidden, dtype=dtype), requires_grad=False)
    p.shard_fn = Split(ctx, 0, (vocab,))
    return p


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, ctx: ParallelContext, comm: Communicator | None, dtype):
        super().__init__()
        self.weight = _vocab_param(vocab, hidden, ctx, dtype)
        self.num_local = self.weight.shape[0]
        self.start = ctx.rank * self.num_local
        self.comm = comm if ctx.size > 1 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, H]."""
        if self.comm is None:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        hit = (local >= 0) & (local < self.num_local)
        h = F.embedding(torch.where(hit, local, 0), self.weight)
        # Exactly one rank holds each id: the sum adds zeros to it, which is exact in any dtype.
        return self.comm.all_reduce(h.masked_fill_(~hit[:, None], 0))


class ParallelLMHead(nn.Module):
    def __init__(self, hidden: int, vocab: int, ctx: ParallelContext, comm: Communicator | None, dtype):
        super().__init__()
        self.weight = _vocab_param(vocab, hidden, ctx, dtype)
        self.comm = comm if ctx.size > 1 else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, H] -> full-vocabulary logits [R, V] on every rank."""
        logits = F.linear(hidden, self.weight)  # [R, V/n]
        return logits if self.comm is None else self.comm.all_gather(logits, dim=-1)
