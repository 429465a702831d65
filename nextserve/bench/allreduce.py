"""`nextserve bench allreduce`: all-reduce latency per message size per backend, on --tp-size local processes.

Decode all-reduces carry hidden x 2 bytes per token (4 KB at batch 1 for the 80B model, 512 KB at batch 128), 96
of them per step, so small-message latency is what the all-reduce table (`nextserve/parallel/allreduce.py`) is set
from. Every backend of the table's registry that runs on the device is timed at every size: each rank runs
--iters all-reduces back to back after --warmup, and the reported latency is the slowest rank's mean. A first
all-reduce of known values checks each backend's sum.

On CUDA (NCCL, one GPU per rank) the processes pin cuda:<local rank>; on CPU they use gloo. Example:

    nextserve bench allreduce --tp-size 2 --device cuda --output-json allreduce.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nextserve.parallel import ParallelConfig, destroy_distributed, init_distributed
from nextserve.parallel.allreduce import BACKENDS
from nextserve.parallel.distributed import start_method

DEFAULT_SIZES = [4096 << i for i in range(9)]  # 4 KB .. 1 MB


def _sizes(text: str) -> list[int]:
    units = {"k": 1024, "m": 1024 * 1024}
    out = []
    for item in (v.strip().lower() for v in text.split(",") if v.strip()):
        try:
            n = int(item[:-1]) * units[item[-1]] if item[-1] in units else int(item)
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(f"expected sizes in bytes such as 4k,64k,1m, got {text!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one size")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp-size", type=int, default=2, help="processes (ranks) on this machine")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when present")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES, help="message sizes in bytes (4k,8k,...,1m)")
    parser.add_argument("--iters", type=int, default=200, help="timed all-reduces per size and backend")
    parser.add_argument("--warmup", type=int, default=20, help="untimed all-reduces first")
    parser.add_argument("--port", type=int, default=0, help="rendezvous port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--output-json", default=None)


def _check(args: argparse.Namespace, device: str) -> None:
    if args.tp_size < 2:
        raise ValueError("--tp-size must be >= 2 (an all-reduce needs two ranks)")
    if args.iters < 1 or args.warmup < 0:
        raise ValueError("--iters must be >= 1 and --warmup >= 0")
    if device == "cuda" and torch.cuda.device_count() < args.tp_size:
        raise ValueError(f"--tp-size {args.tp_size} needs {args.tp_size} GPUs, found {torch.cuda.device_count()}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_main(local_rank: int, args: argparse.Namespace, device: str, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    pc = ParallelConfig(tp_size=args.tp_size, dist_init_addr=f"127.0.0.1:{port}")
    ctx, comm = init_distributed(pc, local_rank, device, timeout_s=120)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    rows = []
    try:
        for name in BACKENDS:
            impl = BACKENDS[name](comm)
            if impl is None:
                continue
            for nbytes in args.sizes:
                n = max(1, nbytes // dtype.itemsize)
                check = torch.full((n,), float(ctx.rank + 1), dtype=dtype, device=dev)
                impl(check)
                want = args.tp_size * (args.tp_size + 1) / 2
                ok = bool((check == want).all())
                x = torch.zeros(n, dtype=dtype, device=dev)  # zeros: repeated in-place sums stay finite
                for _ in range(args.warmup):
                    impl(x)
                _sync(dev)
                comm.barrier()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    impl(x)
                _sync(dev)
                mean = torch.tensor([(time.perf_counter() - t0) / args.iters], dtype=torch.float64, device=dev)
                dist.all_reduce(mean, op=dist.ReduceOp.MAX)
                rows.append(
                    {
                        "backend": f"{name}/{dist.get_backend()}",
                        "bytes": n * dtype.itemsize,
                        "latency_us": mean.item() * 1e6,
                        "ok": ok,
                    }
                )
        if ctx.rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        destroy_distributed()


def bench(args: argparse.Namespace) -> list[dict]:
    """Runs the ranks (see `start_method`) and returns rank 0's rows."""
    import torch.multiprocessing as mp

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    _check(args, device)
    method = start_method(device, __name__)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        port = args.port or _free_port()
        mp.start_processes(_rank_main, (args, device, port, out), nprocs=args.tp_size, start_method=method)
        rows = json.loads(Path(out).read_text())
    for row in rows:
        row |= {"tp_size": args.tp_size, "device": device, "dtype": args.dtype}
    return rows


def run(args: argparse.Namespace) -> int:
    rows = bench(args)
    print(f"all-reduce over {args.tp_size} ranks ({rows[0]['device']}, {args.dtype}), slowest rank's mean latency")
    print(f"{'backend':>14} {'bytes':>9} {'latency us':>11} {'GB/s':>7}  sum")
    for r in rows:
        gbps = r["bytes"] / (r["latency_us"] * 1e-6) / 1e9
        print(
            f"{r['backend']:>14} {r['bytes']:>9} {r['latency_us']:>11.1f} {gbps:>7.2f}  {'ok' if r['ok'] else 'WRONG'}"
        )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nextserve bench allreduce", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
