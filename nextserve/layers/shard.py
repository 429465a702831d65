"""How a checkpoint tensor maps to this rank's shard of a parameter (tensor parallelism).

Every parameter carries a `shard_fn`: the full checkpoint tensor -> this rank's part of it. Three kinds:

  replicated                     every rank holds the whole tensor (norms, the router, the MTP fc, ...)
  Split(ctx, dim, parts)         the tensor is cut along `dim` into `parts` (sizes summing to the full size: a fused
                                 layout such as the conv channels [q | k | v], or one part) and rank r takes the r-th
                                 1/size of every part, concatenated
  Take(dim, start, stop, full)   one fixed slice (a replicated KV head: the ranks that share a head take its rows)

Besides cutting, a shard function answers two questions:
- `full_shape(local_shape)`: the checkpoint's shape. Dummy weights are drawn at the full shape and then cut, so
  the TP-N dummy model is the TP1 dummy model, sharded.
- `for_blocks(block)`: the same cut on a block-scale tensor whose `dim` counts blocks of `block` elements (FP8's
  `weight_scale_inv`). A cut that falls inside a block has no consistent scale and raises ValueError when the model
  is built (TP8 over the 80B model's 512-wide experts gives 64 columns per rank: half a 128-block).

At TP1 (ctx.size == 1) every shard function returns its input unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nextserve.parallel import ParallelContext


class Replicated:
    """Every rank holds the whole tensor."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def full_shape(self, local: Sequence[int]) -> tuple[int, ...]:
        return tuple(local)

    def for_blocks(self, block: int) -> Replicated:
        return self

    def __repr__(self) -> str:
        return "replicated"


replicated = Replicated()


@dataclass(frozen=True)
class Split:
    """Cut along `dim`: every part of `parts` is divided into ctx.size equal pieces, rank r keeps piece r of each."""

    ctx: ParallelContext
    dim: int
    parts: tuple[int, ...]

    def __post_init__(self):
        for p in self.parts:
            if p % self.ctx.size:
                raise ValueError(f"cannot split size {p} across {self.ctx.size} tensor-parallel ranks")

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.ctx.size == 1:
            return t
        if t.shape[self.dim] != sum(self.parts):
            raise ValueError(f"expected size {sum(self.parts)} along dim {self.dim} to split, got {tuple(t.shape)}")
        r, n = self.ctx.rank, self.ctx.size
        pieces = [p.chunk(n, self.dim)[r] for p in t.split(list(self.parts), self.dim)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)

    def full_shape(self, local: Sequence[int]) -> tuple[int, ...]:
        shape = list(local)
        shape[self.dim] = sum(self.parts)
        return tuple(shape)

    def for_blocks(self, block: int) -> Split:
        """The cut of a scale tensor with one entry per `block` elements along `dim`."""
        if self.ctx.size == 1:
            return Split(self.ctx, self.dim, tuple(-(-p // block) for p in self.parts))
        for p in self.parts:
            local = p // self.ctx.size
            if local % block:
                raise ValueError(
                    f"FP8 block {block} is cut by tensor parallelism: {p} features over {self.ctx.size} ranks gives "
                    f"{local} per rank, not a multiple of {block} (use a smaller --tp-size or unquantised weights)"
                )
        return Split(self.ctx, self.dim, tuple(p // block for p in self.parts))


@dataclass(frozen=True)
class Take:
    """Rows start:stop of `dim` (whose full size is `full`), the same on every rank that holds them."""

    dim: int
    start: int
    stop: int
    full: int

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[self.dim] != self.full:
            raise ValueError(f"expected size {self.full} along dim {self.dim}, got {tuple(t.shape)}")
        return t.narrow(self.dim, self.start, self.stop - self.start)

    def full_shape(self, local: Sequence[int]) -> tuple[int, ...]:
        shape = list(local)
        shape[self.dim] = self.full
        return tuple(shape)

    def for_blocks(self, block: int) -> Take:
        if self.start % block or (self.stop % block and self.stop != self.full):
            raise ValueError(
                f"FP8 block {block} is cut by tensor parallelism: rows {self.start}:{self.stop} of {self.full} "
                "are not whole blocks"
            )
        return Take(self.dim, self.start // block, -(-self.stop // block), -(-self.full // block))


ShardFn = Replicated | Split | Take


def split_parts(ctx: ParallelContext, dim: int, parts: Sequence[int]) -> Split:
    return Split(ctx, dim, tuple(parts))
