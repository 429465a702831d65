"""Runs the same greedy generation at any TP degree: in-process at TP1, and in spawned gloo processes per rank.

`drive` is the model's side of an engine step, without the engine: a real KVPool and StatePool sized from the
(per-rank) layers and bound by ModelRunner, a chunked prefill of two prompts of different lengths, then greedy
decode steps, and optionally the MTP head over every position of each step. It records the logits of every step
(full vocabulary: the lm_head gathers them on every rank), the greedy tokens, and the MTP logits.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from nextserve.engine.kv_pool import KVLayout, KVPool
from nextserve.engine.runner import ModelRunner
from nextserve.engine.state_pool import StateLayout, StatePool
from nextserve.forward_batch import ForwardBatch
from nextserve.layers.quant import Fp8Config
from nextserve.loader.model_loader import build_dummy_model, load_model
from nextserve.model_config import ModelConfig
from nextserve.parallel import ParallelConfig, destroy_distributed, init_distributed

PAGE = 4
PROMPTS = ([5, 17, 3, 44, 9, 21, 60, 2, 33, 7, 81, 12, 6], [70, 11, 29, 4, 55, 8, 90])
# Steps of the prefill: (sequence, tokens of its prompt) per step; prompt 0 is prefilled in two chunks.
PREFILL = ([(0, 8)], [(0, 5), (1, 7)])


PRELOAD = ["torch.distributed", "nextserve.engine.runner", "nextserve.loader.model_loader", "nextserve.parallel"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(job: dict, ctx=None, comm=None):
    quant = Fp8Config(tuple(job["fp8_block"])) if job.get("fp8_block") else None
    kw = dict(ctx=ctx, comm=comm)
    if job.get("dummy"):
        cfg = ModelConfig.from_dict(job["config"])
        return build_dummy_model(cfg, torch.float32, torch.device("cpu"), job["mtp"], quant, seed=3, **kw)
    path = Path(job["model_dir"])
    cfg = ModelConfig.from_pretrained(path)
    cpu = torch.device("cpu")
    return load_model(
        path, cfg, dtype=torch.float32, device=cpu, with_mtp=job["mtp"], progress=False, quant=quant, **kw
    )


@torch.inference_mode()
def drive(model, decode_steps: int = 4) -> dict:
    cfg = model.config
    attn, gdn = model.attention_layers(), model.linear_attention_layers()
    kv = KVPool(KVLayout(len(attn), PAGE, attn[0].num_kv_heads, attn[0].head_dim, torch.float32), 32, "cpu")
    g0 = gdn[0]
    layout = StateLayout(
        len(gdn),
        g0.conv1d.weight.shape[0],
        cfg.linear_conv_kernel_dim,
        g0.hv,
        g0.dk,
        g0.dv,
        torch.float32,
        torch.float32,
    )
    states = StatePool(layout, 4, "cpu")
    ModelRunner(model, kv, states, torch.device("cpu"))  # binds the layers' cache views, as the engine does
    seqs = [list(p) for p in PROMPTS]
    slots = [states.allocate(), states.allocate()]
    pages = [kv.allocate(8), kv.allocate(8)]
    cached = [0, 0]
    out = {"logits": [], "mtp": [], "tokens": [[], []]}

    def step(work: list[tuple[int, list[int]]], sample: list[bool]):
        ids = [t for _, toks in work for t in toks]
        lens = [len(toks) for _, toks in work]
        batch = ForwardBatch.build(
            lens,
            [cached[b] for b, _ in work],
            [slots[b] for b, _ in work],
            [pages[b] for b, _ in work],
            PAGE,
            logits_indices=list(range(len(ids))),
        )
        hidden = model(torch.tensor(ids), batch)
        logits = model.compute_logits(hidden)  # [T, V]: every position
        out["logits"].append(logits)
        ends = batch.cu_seqlens[1:].long() - 1
        nxt = {}
        for (b, _), end, s in zip(work, ends.tolist(), sample):
            if s:
                nxt[b] = int(logits[end].argmax())
                out["tokens"][b].append(nxt[b])
        if model.mtp is not None:
            # MTP over every position: input token t+1 (the step's next token, then the sampled one), hidden at t.
            shifted = []
            for (b, toks), s in zip(work, sample):
                shifted += toks[1:] + [nxt[b] if s else seqs[b][cached[b] + len(toks)]]
            out["mtp"].append(model.compute_logits(model.mtp_forward(torch.tensor(shifted), hidden, batch)))
        for (b, toks), _ in zip(work, sample):
            cached[b] += len(toks)
        return nxt

    for chunks in PREFILL:
        work = [(b, seqs[b][cached[b] : cached[b] + n]) for b, n in chunks]
        sample = [cached[b] + n == len(seqs[b]) for b, n in chunks]
        for b, tok in step(work, sample).items():
            seqs[b].append(tok)
    for _ in range(decode_steps):
        for b, tok in step([(0, [seqs[0][-1]]), (1, [seqs[1][-1]])], [True, True]).items():
            seqs[b].append(tok)
    return out


def run_rank(index: int, tp: int, nnodes: int, port: int, jobs: list[dict], out_dir: str) -> None:
    """Spawned process `index` of tp: joins the gloo group (node index // ranks-per-node), runs every job, saves
    its results as rank<r>.pt."""
    torch.set_num_threads(1)
    per_node = tp // nnodes
    pc = ParallelConfig(tp_size=tp, nnodes=nnodes, node_rank=index // per_node, dist_init_addr=f"127.0.0.1:{port}")
    ctx, comm = init_distributed(pc, local_rank=index % per_node, device="cpu", timeout_s=120)
    try:
        results = {job["name"]: drive(build(job, ctx, comm)) for job in jobs}
        torch.save(results, Path(out_dir) / f"rank{ctx.rank}.pt")
    finally:
        destroy_distributed()


def run_tp(tp: int, jobs: list[dict], out_dir: Path, nnodes: int = 1) -> list[dict]:
    """Runs the jobs at TP `tp`, one process per rank; each rank's results, by rank.

    The processes fork from a fork server that imported torch and nextserve once (a clean single-threaded
    process, unlike pytest's): importing them costs seconds per process on CI's two cores. (Python 3.11's fork
    server ignores the parent's sys.path, so it preloads installed packages, not this module.)"""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    args = (tp, nnodes, free_port(), jobs, str(out_dir))
    mp.start_processes(run_rank, args, nprocs=tp, start_method="forkserver")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(tp)]
