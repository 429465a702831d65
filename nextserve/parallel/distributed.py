"""Process-group set-up for tensor parallelism: one process per rank, world size = tp_size.

    pc = ParallelConfig(tp_size=4, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:29500")
    ctx, comm = init_distributed(pc, local_rank=0, device="cuda")   # this process is global rank 2, on cuda:0
    ...                                                              # build rank 2's model with ctx, comm
    destroy_distributed()

Numbering follows SGLang's `--nnodes --node-rank --dist-init-addr`: each node runs tp_size / nnodes processes,
local ranks 0..n-1, and global rank = node_rank * (tp_size / nnodes) + local_rank; on CUDA the local rank is the
GPU index. Rendezvous is torch.distributed's own: `tcp://<dist_init_addr>` (the address and a free port of node 0),
or `env://` (MASTER_ADDR, MASTER_PORT, as torchrun sets them) when no address is given. NCCL on CUDA, gloo on CPU;
`backend="gloo"` on CUDA runs several ranks on one GPU (collectives staged where gloo needs host tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

from nextserve.parallel.allreduce import DEFAULT_TABLE, AllReduceTable
from nextserve.parallel.comm import Communicator, ParallelContext


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # "host:port" of node 0; None: env:// (MASTER_ADDR / MASTER_PORT)

    def __post_init__(self):
        if self.tp_size < 1:
            raise ValueError(f"--tp-size must be >= 1, got {self.tp_size}")
        if self.nnodes < 1 or self.tp_size % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} must divide --tp-size {self.tp_size} (ranks per node)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} is not in [0, --nnodes {self.nnodes})")
        if self.dist_init_addr is not None and not _host_port(self.dist_init_addr):
            raise ValueError(f"--dist-init-addr must be host:port, got {self.dist_init_addr!r}")

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def global_rank(self, local_rank: int) -> int:
        if not 0 <= local_rank < self.ranks_per_node:
            raise ValueError(f"local rank {local_rank} is not in [0, {self.ranks_per_node}) on this node")
        return self.node_rank * self.ranks_per_node + local_rank

    @property
    def init_method(self) -> str:
        return f"tcp://{self.dist_init_addr}" if self.dist_init_addr else "env://"


def _host_port(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    return bool(host and sep and port.isdigit())


def rank_device(device: torch.device | str, local_rank: int) -> torch.device:
    """The device of a local rank: cuda -> cuda:<local_rank>; an explicit index or the CPU is kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def start_method(device: torch.device | str, preload: str) -> str:
    """How to start a benchmark's local ranks. CUDA cannot be used in a child forked from a process that touched it
    (a fork server that imported the benchmark already has), so CUDA ranks are spawned; CPU ranks fork from a fork
    server that imported `preload` once, much faster than a fresh interpreter each."""
    if torch.device(device).type == "cuda":
        return "spawn"
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload([preload])
    return "forkserver"


def init_distributed(
    pc: ParallelConfig,
    local_rank: int = 0,
    device: torch.device | str = "cpu",
    *,
    backend: str | None = None,
    table: AllReduceTable = DEFAULT_TABLE,
    timeout_s: float = 600.0,
) -> tuple[ParallelContext, Communicator]:
    """Joins this process to the tensor-parallel group as rank pc.global_rank(local_rank) and returns its
    (ParallelContext, Communicator). TP1 starts no process group. `device` is where the model runs (cuda: this
    process's GPU becomes the current device); `backend` defaults to NCCL on CUDA, gloo elsewhere."""
    rank = pc.global_rank(local_rank)
    ctx = ParallelContext(rank, pc.tp_size)
    if pc.tp_size == 1:
        return ctx, Communicator(ctx)
    import torch.distributed as dist

    device = rank_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    dist.init_process_group(
        backend, init_method=pc.init_method, world_size=pc.tp_size, rank=rank, timeout=timedelta(seconds=timeout_s)
    )
    return ctx, Communicator(ctx, group=None, table=table, gloo=backend == "gloo")


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
