"""Tensor parallelism: who this process is (ParallelContext) and the one seam for GPU-to-GPU traffic."""

from nextserve.parallel.comm import Communicator, ParallelContext

__all__ = ["Communicator", "ParallelContext"]
