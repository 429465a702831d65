"""Tensor parallelism for the engine: one process per rank, one scheduler per rank on broadcast inputs.

Every rank runs a whole Engine (scheduler, cache manager, sampler) over its shard of the model. Rank 0 is the
leader: the API server or `LLM` talks to it alone. Before each of its steps the leader broadcasts what changed
since the last one (requests added and aborted, prefix-cache resets, and its draft policy's timing observations);
every follower applies the same changes in the same order and steps too. The ranks then decide the same batch:

- scheduling, preemption, prefix caching and capacity are deterministic functions of the commands and of the
  capacity, which the ranks agree on at start (the smallest budget of any rank);
- the logits are identical on every rank (the vocabulary-parallel lm_head all-gathers them), so greedy and seeded
  sampling agree, and unseeded sampling too: every rank seeds torch's generator with `--seed` and draws the same
  random numbers in the same order;
- the one timing-driven choice, how many tokens to draft, is fed the leader's measurements on every rank.

Why not a single scheduler broadcasting each batch: the step's metadata (page tables of every sequence) is far
larger than the commands, and followers would still need the sequences' token ids for sampling and drafting.

Processes: the leader starts the followers of its node (multiprocessing, spawn); on other nodes, `nextserve serve
--node-rank k` starts all of that node's ranks as followers. Followers exit when the leader closes or dies; a
follower that dies makes the leader exit with an error naming its rank (a watchdog thread), rather than hang in
the next collective.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from nextserve.config import EngineConfig
from nextserve.engine.engine import Engine
from nextserve.outputs import RequestOutput
from nextserve.parallel import ParallelConfig
from nextserve.parallel.distributed import destroy_distributed, init_distributed
from nextserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def make_engine(config: EngineConfig) -> Engine:
    """The engine for this process: the plain one at TP1, the leader of the ranks otherwise."""
    if config.tp_size == 1:
        return Engine(config)
    if config.node_rank != 0:
        raise ValueError("--node-rank > 0 runs followers only (`nextserve serve` does that); it cannot serve")
    check_parallel_config(config)
    return LeaderEngine(config)


def check_parallel_config(config: EngineConfig) -> None:
    """Clear errors before any process starts or anything loads: sizes the model cannot be split into, more ranks
    on this node than GPUs."""
    from nextserve.engine.engine import _default_model_dir
    from nextserve.model_config import ModelConfig
    from nextserve.models.sharding import check_tp_size

    model_dir = config.model or _default_model_dir()
    check_tp_size(ModelConfig.from_pretrained(model_dir, config.model_overrides()), config.tp_size)
    per_node = config.tp_size // config.nnodes
    if config.device.startswith("cuda:") and config.dist_backend != "gloo":
        raise ValueError(
            f"--device {config.device} puts every rank on one GPU, which only --dist-backend gloo can do (NCCL "
            "needs a GPU per rank); use --device cuda"
        )
    if config.dist_backend == "nccl" and (config.device == "cpu" or not torch.cuda.is_available()):
        raise ValueError("--dist-backend nccl needs GPUs; on a CPU the ranks use gloo")
    shared = config.device.startswith("cuda:")  # every rank on that one GPU
    if config.device != "cpu" and not shared and torch.cuda.is_available() and per_node > torch.cuda.device_count():
        raise ValueError(
            f"--tp-size {config.tp_size} over {config.nnodes} node(s) needs {per_node} GPUs on this node; "
            f"{torch.cuda.device_count()} are visible"
        )
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: no CUDA device is available")


@dataclass
class StepMessage:
    """What the leader broadcasts before a step."""

    commands: list[tuple] = field(default_factory=list)  # ("add", rid, ids, params) | ("abort", rid) | ("reset",)
    draft_observations: list[tuple] = field(default_factory=list)
    step: bool = True
    close: bool = False


class _RankEngine(Engine):
    """An Engine that is one rank of several: it builds its shard of the model and agrees on capacity."""

    def __init__(self, config: EngineConfig, local_rank: int):
        pc = ParallelConfig(config.tp_size, config.nnodes, config.node_rank, config.dist_init_addr)
        device = "cpu" if config.device == "cpu" or not torch.cuda.is_available() else "cuda"
        if device == "cuda" and config.device.startswith("cuda:"):
            device = config.device  # an explicit GPU: every local rank on it (over gloo: the kernels' check)
        self.ctx, self.comm = init_distributed(pc, local_rank, device, backend=config.dist_backend)
        import torch.distributed as dist

        # Commands travel as Python objects over a gloo group, also when the tensors go through NCCL.
        self.control = dist.new_group(backend="gloo")
        if device.startswith("cuda"):
            config = dataclasses.replace(config, device=f"cuda:{torch.cuda.current_device()}")
        super().__init__(config, ctx=self.ctx, comm=self.comm)

    def agree_budget(self, budget: int) -> int:
        """Every rank plans with the smallest cache budget, so that all make the same scheduling decisions."""
        import torch.distributed as dist

        t = torch.tensor([budget], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def _broadcast(self, msg: StepMessage | None) -> StepMessage:
        import torch.distributed as dist

        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


class LeaderEngine(_RankEngine):
    """Rank 0: the Engine the server and LLM use, forwarding every change to the followers."""

    def __init__(self, config: EngineConfig):
        if not config.dist_init_addr:
            config = dataclasses.replace(config, dist_init_addr=f"127.0.0.1:{_free_port()}")
        self._message = StepMessage()
        self._closing = False
        self._followers = _start_followers(config)
        threading.Thread(target=self._watch, name="nextserve-tp-watchdog", daemon=True).start()
        try:
            super().__init__(config, local_rank=0)
        except BaseException:
            self._stop_followers()
            raise
        if self.spec is not None:
            self.spec.policy.record = True
        logger.info("tensor parallelism: %d ranks over %d node(s)", config.tp_size, config.nnodes)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, **kw):
        req = super().add_request(request_id, prompt, params, **kw)  # the followers compile their own grammar
        self._message.commands.append(("add", request_id, list(req.prompt_token_ids), params or SamplingParams()))
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        out = super().abort(request_id)
        if out is not None:
            self._message.commands.append(("abort", request_id))
        return out

    def reset_prefix_cache(self) -> None:
        super().reset_prefix_cache()
        self._message.commands.append(("reset",))

    def step(self) -> list[RequestOutput]:
        self._check_open()
        msg, self._message = self._message, StepMessage()
        if self.spec is not None:
            msg.draft_observations = self.spec.policy.take_observations()
        self._broadcast(msg)
        return super().step()

    def close(self) -> None:
        if self.model is None:
            return
        self._closing = True
        for rid in list(self.requests):
            self.abort(rid)
        msg, self._message = self._message, StepMessage()
        msg.step, msg.close = False, True
        try:
            self._broadcast(msg)
        finally:
            super().close()
            destroy_distributed()
            self._stop_followers()

    def _stop_followers(self) -> None:
        _join(self._followers)

    def _watch(self) -> None:
        """A follower that dies takes the leader down with an error naming its rank (the next collective would
        otherwise wait for it until the process-group timeout)."""
        while not self._closing:
            for rank, p in enumerate(self._followers, start=1):
                if p.exitcode is not None and not self._closing:
                    logger.error("tensor-parallel rank %d exited (code %s): stopping", rank, p.exitcode)
                    for other in self._followers:
                        if other.is_alive():
                            other.kill()
                    os._exit(1)
            time.sleep(0.2)


class FollowerEngine(_RankEngine):
    def run(self) -> None:
        """Applies the leader's commands and steps with it until the leader closes."""
        if self.spec is not None:
            self.spec.policy.follower = True
        while True:
            msg = self._broadcast(None)
            for cmd in msg.commands:
                if cmd[0] == "add":
                    # A follower emits nothing: its text is decoded token by token only where stop strings need it.
                    Engine.add_request(self, cmd[1], cmd[2], cmd[3], stream=False)
                elif cmd[0] == "abort":
                    Engine.abort(self, cmd[1])
                else:
                    Engine.reset_prefix_cache(self)
            if self.spec is not None:
                self.spec.policy.replay(msg.draft_observations)
            if msg.close:
                return
            if msg.step:
                self.step()


def follow(config: EngineConfig, local_rank: int, leader_pid: int | None = None) -> None:
    """A follower process: one rank, until the leader closes. It exits when its parent (the leader on node 0) dies."""
    if leader_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(leader_pid,), daemon=True).start()
    logging.basicConfig(level=logging.WARNING)
    engine = FollowerEngine(config, local_rank)
    try:
        engine.run()
    finally:
        Engine.close(engine)
        destroy_distributed()


def run_node(config: EngineConfig) -> None:
    """`--node-rank k > 0`: runs this node's ranks as followers (local rank 0 here, the others as processes)."""
    procs = _start_followers(config)
    try:
        follow(config, 0)
    finally:
        _join(procs)


def _start_followers(config: EngineConfig) -> list[mp.process.BaseProcess]:
    """Local ranks 1.. of this node as processes (spawned: CUDA cannot be forked), each exiting with this one."""
    ctx, procs = mp.get_context("spawn"), []
    for local_rank in range(1, config.tp_size // config.nnodes):
        p = ctx.Process(target=follow, args=(config, local_rank, os.getpid()), name=f"nextserve-tp{local_rank}")
        p.daemon = True
        p.start()
        procs.append(p)
    return procs


def _join(procs: list[mp.process.BaseProcess]) -> None:
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()


def _exit_with_parent(pid: int) -> None:
    while True:
        if os.getppid() != pid:
            os._exit(1)
        time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
