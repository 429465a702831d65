"""`nextserve bench model --tp-size N`: the same points on N tensor-parallel ranks, one process each.

The parent checks what can be checked before any process starts (the flags, the geometry's split by
`check_tp_size`, the devices and the backend), prints the header, starts N processes (`start_method`: spawned on CUDA)
(rendezvous tcp://127.0.0.1:<free port>) and prints rank 0's table. Each rank joins the group (`init_distributed`:
NCCL on CUDA, gloo on the CPU or with --dist-backend gloo), checks that its shard of the weights fits its share of
its device, builds its shard (rank r's shard of the TP1 random weights of the same seed) and runs every point: the
all-reduces of every layer keep the ranks in lockstep, and the one decision that could split them (skipping a point
for memory) is taken on the smallest free memory of any rank. The roofline is measured by rank 0 alone while the
others wait, and is one device's: each rank reads its share of the weights, KV and state, so the floors are one
rank's bytes (FLOPs) over it. Ranks sharing one device (the CPU, or one GPU over gloo: a check of the sharded
kernels) share its bandwidth too, and the roofline does not apply to them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import tempfile
from pathlib import Path

import torch

from nextserve.bench import model as bench_model
from nextserve.bench.presets import check_weights_fit, param_counts, preset_config
from nextserve.engine.engine import resolve_device, resolve_dtype
from nextserve.models.sharding import check_tp_size
from nextserve.ops import backends
from nextserve.parallel import Communicator, ParallelConfig, ParallelContext, destroy_distributed, init_distributed
from nextserve.parallel.distributed import rank_device, start_method


@dataclasses.dataclass
class RankGroup:
    """What a rank's points need to know about the group (`args._tp` in each rank process)."""

    ctx: ParallelContext
    comm: Communicator
    ranks_per_device: int  # ranks on this rank's device, itself included

    def agreed_free(self, free: int | None) -> int | None:
        """The smallest share (free / ranks on the device) of any rank's free memory; None on the CPU."""
        if free is None:  # every rank is on the same kind of device
            return None
        import torch.distributed as dist

        frees = [None] * self.ctx.size
        dist.all_gather_object(frees, free // self.ranks_per_device)
        return min(frees)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan(args: argparse.Namespace) -> tuple[torch.device, str, list[torch.device]]:
    """Checks the size, device and backend before any process starts: (device, backend, each rank's device)."""
    n = args.tp_size
    if n < 1:
        raise ValueError(f"--tp-size must be >= 1, got {n}")
    device = resolve_device(args.device)
    backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("--dist-backend nccl needs CUDA devices; ranks on the CPU use gloo")
    devices = [rank_device(device, r) for r in range(n)]
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if any(d.index >= count for d in devices):
            raise ValueError(
                f"--tp-size {n} puts rank r on cuda:r, but {count} GPU(s) are visible; to run the ranks on one GPU "
                "name it (--device cuda:0) and use --dist-backend gloo"
            )
        if backend == "nccl" and len(set(devices)) < n:
            raise ValueError(
                f"NCCL needs one GPU per rank, but the {n} ranks would share {device}; use --device cuda (rank r on "
                "cuda:r), or --dist-backend gloo to run them on one GPU"
            )
    return device, backend, devices


def run_tp(args: argparse.Namespace) -> int:
    device, backend, devices = plan(args)
    backends.select(device)  # refuses a GPU run whose fast paths failed to import
    dtype = resolve_dtype(args.dtype, device)
    cfg = preset_config(args.preset, args.num_layers)
    bench_model._check(args, cfg)
    n = args.tp_size
    quants = {q: bench_model.QUANTIZATIONS[q] for q in args.quantization}
    for quant in quants.values():
        check_tp_size(cfg, n, quant)  # a size that does not split the model: one clear line, nothing started
    args = argparse.Namespace(**vars(args))
    args.dist_backend = backend  # spelled out in the JSON's command
    weights = {q: check_weights_fit(cfg, dtype, None, quant=quant, tp_size=n) for q, quant in quants.items()}
    where = f"{device}, tensor parallel {n} over {backend} (ranks on {', '.join(map(str, devices))})"
    print(bench_model.header(args, cfg, weights, dtype, where, weights_label="weights per rank"), flush=True)

    import torch.multiprocessing as mp

    method = start_method(devices[0], __name__)
    threads = max(1, torch.get_num_threads() // n)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        mp.start_processes(_rank_main, (args, free_port(), str(out), threads), nprocs=n, start_method=method, join=True)
        result = json.loads(out.read_text())
    if "error" in result:
        raise ValueError(result["error"])
    print(bench_model.roofline_line(result["roofline"], dtype))
    bench_model.finish(args, result)
    return 0


def _rank_main(local_rank: int, args: argparse.Namespace, port: int, out: str, threads: int) -> None:
    """One rank: joins the group, runs every point with the others, and rank 0 writes the result (or the error
    every rank agreed on) to `out`."""
    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    pc = ParallelConfig(tp_size=args.tp_size, dist_init_addr=f"127.0.0.1:{port}")
    ctx, comm = init_distributed(pc, local_rank, device, backend=args.dist_backend)
    try:
        result = rank_bench(args, ctx, comm, device)
        if ctx.rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        destroy_distributed()


def rank_bench(args: argparse.Namespace, ctx: ParallelContext, comm: Communicator, device: torch.device) -> dict:
    n = ctx.size
    devices = [str(rank_device(device, r)) for r in range(n)]
    dev = rank_device(device, ctx.rank)
    backends.select(dev)
    dtype = resolve_dtype(args.dtype, dev)
    cfg = preset_config(args.preset, args.num_layers)
    group = RankGroup(ctx, comm, devices.count(str(dev)))
    args = argparse.Namespace(**vars(args))
    args._tp = group  # read by the points (bench_model.point_free_memory, guarded, run_model)
    # Every format must fit alone in each rank's share of its device; the same figure on every rank, so every
    # rank takes the same decision.
    free = group.agreed_free(bench_model.free_memory(dev))
    try:
        for q in args.quantization:
            check_weights_fit(cfg, dtype, free, args.preset, bench_model.QUANTIZATIONS[q], tp_size=n)
    except ValueError as e:
        share = (
            f" (its share of a device that {group.ranks_per_device} ranks share)" if group.ranks_per_device > 1 else ""
        )
        return {"error": f"{e}{share}"}
    roofline, notes = bench_model.roofline_and_notes(args, dev, dtype) if ctx.rank == 0 else (None, None)
    roofline, notes = comm.broadcast_object((roofline, notes))  # rank 0's device alone: the others wait
    shared = len(set(devices)) < n
    if shared:
        tp_note = (
            f"the {n} ranks share {', '.join(sorted(set(devices)))} over {args.dist_backend}: the roofline (one "
            "process alone on the device) does not apply to their speed; tokens/s and fraction check the sharded "
            "kernels and the lockstep, not speed"
        )
    else:
        tp_note = (
            f"tensor parallel {n} over {args.dist_backend}, one rank per device: each rank reads its share of the "
            "weights, KV and state, so a decode floor is one rank's bytes / one device's copy bandwidth and a "
            f"prefill floor one rank's FLOPs / one device's matmul rate (measured on {dev} by rank 0 alone); the "
            "all-reduces' time is not in the floors"
        )
    runs = bench_model.run_models(cfg, args, dev, dtype, roofline)
    result = bench_model.make_result(
        args, cfg, str(device), bench_model.device_label(dev), dtype, roofline, [tp_note, *notes], runs
    )
    return result | {
        "tp_size": n,
        "dist_backend": args.dist_backend,
        "rank_devices": devices,
        "roofline_applies": not shared,
        "params_per_rank": dataclasses.asdict(param_counts(cfg, n)),
    }
