"""ParallelContext (rank and world size, frozen) and Communicator, the only object that moves tensors between
ranks. At world size 1 every collective is a no-op, so the model code reads the same at any TP degree.

The model calls `all_reduce` (two per decoder layer, one in the vocabulary-parallel embedding) and `all_gather`
(the lm_head's logits); the engine may use `broadcast` / `broadcast_object` for step metadata and `barrier`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextserve.parallel.allreduce import BACKENDS, DEFAULT_TABLE, AllReduceFn, AllReduceTable


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in [0, {self.size})")

    def split(self, n: int, what: str) -> int:
        """n / size, with a clear error when n does not divide."""
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {self.size}")
        return n // self.size


class Communicator:
    """Collectives over `group` (None: the default process group). `table` picks the all-reduce per message size;
    `gloo` says the group runs gloo, whose all-gather takes only CPU tensors (CUDA ones are staged through the
    host: two processes sharing one GPU over gloo, the sharded kernels' test)."""

    def __init__(
        self,
        ctx: ParallelContext | None = None,
        group=None,
        table: AllReduceTable = DEFAULT_TABLE,
        gloo: bool = False,
    ):
        self.ctx = ctx or ParallelContext()
        self.group = group
        self.table = table
        self.gloo = gloo
        self._impls: dict[str, AllReduceFn] = {}
        if self.ctx.size > 1:
            for name in table.names():
                impl = BACKENDS[name](self)
                if impl is None:
                    raise ValueError(f"all-reduce backend {name!r} cannot run here")
                self._impls[name] = impl

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        if self.ctx.size == 1:
            return x
        return self._impls[self.table.choose(x.numel() * x.element_size())](x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along `dim`, in rank order."""
        if self.ctx.size == 1:
            return x
        import torch.distributed as dist

        staged = x.cpu() if (self.gloo and x.is_cuda) else x.contiguous()
        parts = [torch.empty_like(staged) for _ in range(self.ctx.size)]
        dist.all_gather(parts, staged, group=self.group)
        return torch.cat(parts, dim=dim).to(x.device)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x of rank `src` on every rank, in place; returns x."""
        if self.ctx.size == 1:
            return x
        import torch.distributed as dist

        dist.broadcast(x, src=src, group=self.group)
        return x

    def broadcast_object(self, obj=None, src: int = 0):
        """A picklable object of rank `src` on every rank (host metadata: small, not per layer)."""
        if self.ctx.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.ctx.size == 1:
            return
        import torch.distributed as dist

        dist.barrier(group=self.group)
