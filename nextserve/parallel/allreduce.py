"""All-reduce implementations, and the table that picks one per message size.

Decode all-reduces are small (hidden size x 2 bytes per token: 4 KB at batch 1) and run twice per layer, so their
latency, not bandwidth, sets the cost. A one-shot all-reduce over torch symmetric memory (every rank reads its
peers' buffers over P2P and sums locally; no NVLink multicast, which stays off on the multi-GPU machines) is the
intended small-message path; NCCL (gloo on CPU) is the default and, until a multi-GPU run measures the crossover,
the only entry of the table.

A backend is a name in `BACKENDS` whose factory takes the Communicator and returns `fn(x) -> x` (sum in place),
or None when it cannot run there (wrong device, feature missing); the table maps message sizes to backend names:

    AllReduceTable(((64 * 1024, "symm_one_shot"),), default="dist")  # <= 64 KB one-shot, larger NCCL

`nextserve bench allreduce` times every backend that runs per message size: the numbers the table is set from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nextserve.parallel.comm import Communicator

AllReduceFn = Callable[[torch.Tensor], torch.Tensor]


def _dist(comm: Communicator) -> AllReduceFn:
    import torch.distributed as dist

    def fn(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=comm.group)
        return x

    return fn


# name -> factory(comm) -> fn or None. "symm_one_shot" (torch.distributed._symmetric_memory's one-shot all-reduce
# over a symmetric staging buffer) goes here once a multi-GPU machine can test it.
BACKENDS: dict[str, Callable[[Communicator], AllReduceFn | None]] = {"dist": _dist}


@dataclass(frozen=True)
class AllReduceTable:
    """(max message bytes, backend) rows in increasing size; messages larger than every row take `default`."""

    rows: tuple[tuple[int, str], ...] = ()
    default: str = "dist"

    def __post_init__(self):
        for _, name in (*self.rows, (0, self.default)):
            if name not in BACKENDS:
                raise ValueError(f"unknown all-reduce backend {name!r}; known: {', '.join(BACKENDS)}")
        sizes = [n for n, _ in self.rows]
        if sizes != sorted(sizes):
            raise ValueError(f"all-reduce table rows must be in increasing size, got {sizes}")

    def choose(self, nbytes: int) -> str:
        for limit, name in self.rows:
            if nbytes <= limit:
                return name
        return self.default

    def names(self) -> list[str]:
        return list(dict.fromkeys([*(n for _, n in self.rows), self.default]))


DEFAULT_TABLE = AllReduceTable()
