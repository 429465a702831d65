"""ParallelContext (rank and world size, frozen) and Communicator, the only object that moves tensors between
ranks. At world size 1 every collective is a no-op, so the model code reads the same at any TP degree."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    size: int = 1

    def split(self, n: int, what: str) -> int:
        """n / size, with a clear error when n does not divide."""
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {self.size}")
        return n // self.size


class Communicator:
    def __init__(self, ctx: ParallelContext | None = None, group=None):
        self.ctx = ctx or ParallelContext()
        self.group = group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x
