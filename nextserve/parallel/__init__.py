"""Tensor parallelism: who this process is (ParallelContext), the one seam for traffic between ranks
(Communicator), the all-reduce table, and the process-group set-up (`init_distributed`)."""

from nextserve.parallel.allreduce import AllReduceTable
from nextserve.parallel.comm import Communicator, ParallelContext
from nextserve.parallel.distributed import ParallelConfig, destroy_distributed, init_distributed

__all__ = [
    "AllReduceTable",
    "Communicator",
    "ParallelConfig",
    "ParallelContext",
    "destroy_distributed",
    "init_distributed",
]
