"""`nextserve bench model`: decode and prefill throughput of the model itself against a roofline measured in the
same run, on random weights of a named geometry (no checkpoint, scheduler or sampler), optionally beside
transformers' model on the same weights.

Decode point (B, C): B sequences whose KV is C tokens long and whose state slots hold random state; a step is one
token per sequence at position C (forward + lm_head), timed over --decode-steps steps per repetition (median).
Prefill point N: one sequence of N tokens in chunks of --max-num-batched-tokens, as the engine schedules it.

Roofline: copy bandwidth (device-to-device copy, bytes read + written / time) and matmul rate (a square GEMM in
the run's dtype, 2n^3 / time; with FP8 also `ops.fp8.linear` on a square block-FP8 weight). Decode floor = bytes a
step must read / bandwidth, the weights counted as stored (FP8 ones 1 byte per parameter plus fp32 block scales);
prefill floor = FP8 weights' FLOPs / FP8 rate + the other FLOPs (bf16 weights, attention, lm_head) / matmul rate.
The floors leave work out (GDN recurrence FLOPs, KV writes, activations), so they bound the time from below and
`fraction` (measured speed / floor speed) should stay at or under about 1.

Tensor parallelism (`--tp-size N`, `bench/model_tp.py`): N processes, each builds its shard of the model and runs
every point in lockstep with the others (the all-reduces force it); rank 0's times are reported. Each rank reads its
share of the weights, KV and state, so the floors are one rank's bytes and FLOPs against one device's roofline
(measured by rank 0 alone); for ranks sharing one device (gloo) the roofline does not apply.

`--quantization bf16,fp8` times both models one after the other against the same roofline (the first is freed
before the second is built); `runs` in the JSON holds one entry per quantization.

Legend: B sequences in a decode step, C context (tokens already cached), N prefill length, E experts, k experts
per token, P pages per sequence.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from nextserve.bench.config import hf_config_dict
from nextserve.bench.presets import (
    PRESETS,
    GiB,
    check_weights_fit,
    decode_bytes,
    expected_experts,
    init_random_weights,
    kv_layout,
    param_counts,
    prefill_flops,
    preset_config,
    state_layout,
)
from nextserve.engine.cuda_graph import DecodeGraphs, supports_graphs
from nextserve.engine.engine import resolve_device, resolve_dtype
from nextserve.engine.kv_pool import KVPool
from nextserve.engine.runner import ModelRunner
from nextserve.engine.state_pool import StatePool
from nextserve.forward_batch import ForwardBatch
from nextserve.layers.quant import Fp8Config
from nextserve.loader.fp8 import quantize_block_fp8
from nextserve.model_config import ModelConfig
from nextserve.models.qwen3_next import Qwen3NextForCausalLM, Qwen3NextSparseMoeBlock
from nextserve.ops import backends
from nextserve.ops import fp8 as fp8_ops
from nextserve.parallel import Communicator, ParallelContext

# Left free beyond the pools of a point for activations; a point that still runs out of memory is noted, not fatal.
ACTIVATION_RESERVE = 1 * GiB

# --quantization values: the weights' format (bf16: unquantised, in --dtype; fp8: the official checkpoints' rule).
QUANTIZATIONS = {"bf16": None, "fp8": Fp8Config()}


# ---- timing ----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int, inner: int = 1) -> float:
    """Median over `repeats` of the seconds per call of fn, timed over `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure_roofline(
    device: torch.device, dtype: torch.dtype, copy_bytes: int, gemm_n: int, fp8: bool = False
) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and matmul rate (FLOP/s) of this device; with `fp8` also
    the block-FP8 GEMM's rate (`fp8_matmul_rate`)."""
    roofline = {"copy_bandwidth": _copy_bandwidth(device, copy_bytes)}
    roofline["matmul_rate"] = _matmul_rate(device, dtype, gemm_n)
    if fp8:
        roofline["fp8_matmul_rate"] = _fp8_matmul_rate(device, dtype, gemm_n)
    return roofline


def _copy_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, warmup=2, repeats=5, inner=5)
    return 2 * src.numel() * src.element_size() / t


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = timed(lambda: torch.mm(a, b, out=out), device, warmup=2, repeats=5, inner=5)
    return 2 * n**3 / t


def _fp8_matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The model's FP8 GEMM (activations quantised per token per 128 channels, a 128x128-block weight), as the FP8
    linears call it: the rate includes the activation quantisation they pay too."""
    block = Fp8Config().block
    x = torch.randn(n, n, device=device).to(dtype)
    w, scale = quantize_block_fp8(torch.randn(n, n, device=device) / n**0.5, block)
    t = timed(lambda: fp8_ops.linear(x, w, scale, block), device, warmup=2, repeats=5, inner=5)
    return 2 * n**3 / t


def fp8_kernel(device: torch.device) -> str:
    """Which path `ops.fp8.linear` takes on `device` (said beside the FP8 numbers)."""
    if device.type == "cuda" and fp8_ops.fp8_triton is not None:
        rows = getattr(fp8_ops.fp8_triton, "SCALED_MM_MIN_M", None)
        mm = f"; torch's block-scaled scaled_mm from {rows} rows, where it works" if rows else ""
        return f"ops/fp8_triton.py (Triton kernels{mm})"
    return "the torch reference (dequantise, then fp32 matmul)"


def prefill_floor_seconds(flops: dict[str, float], roofline: dict[str, float]) -> float:
    """FP8 weights' FLOPs at the FP8 rate, everything else at the run dtype's matmul rate."""
    fp8 = flops.get("weights_fp8", 0)
    seconds = (flops["total"] - fp8) / roofline["matmul_rate"]
    return seconds + (fp8 / roofline["fp8_matmul_rate"] if fp8 else 0.0)


def free_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


# ---- the model and its caches -----------------------------------------------------------------------------------
def build_model(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    quant: Fp8Config | None = None,
    ctx: ParallelContext | None = None,
    comm: Communicator | None = None,
) -> Qwen3NextForCausalLM:
    """The model with random weights; with ctx/comm, rank ctx.rank's shard of the TP1 model of the same seed."""
    with torch.device(device):
        model = Qwen3NextForCausalLM(cfg, dtype=dtype, with_mtp=False, quant=quant, ctx=ctx, comm=comm)
    init_random_weights(model, seed)
    return model.eval()


def make_runner(model, num_pages: int, num_slots: int, page_size: int, ssm_dtype: torch.dtype) -> ModelRunner:
    """Pools for one point, filled with random KV and state, bound to the model's layers."""
    cfg, device, tp = model.config, next(model.parameters()).device, model.ctx.size
    kv = KVPool(kv_layout(cfg, page_size, model.dtype, tp), num_pages, device)  # this rank's share
    states = StatePool(state_layout(cfg, model.dtype, ssm_dtype, tp), num_slots, device)
    kv.k.normal_()
    kv.v.normal_()
    states.conv.normal_()
    states.ssm.normal_(0.0, 0.1)
    return ModelRunner(model, kv, states, device)


def unbind(model: Qwen3NextForCausalLM) -> None:
    """Drops the layers' views of the pools, so that a point's pools are freed with it."""
    for attn in model.attention_layers():
        attn.k_cache = attn.v_cache = None
    for gdn in model.linear_attention_layers():
        gdn.conv_state = gdn.ssm_state = None


class ExpertCounter:
    """Inside `with`: the distinct experts each MoE layer's router picks per forward (a check that routing on
    random weights spreads over experts as the roofline's expert count assumes) and the top-k softmax mass."""

    def __init__(self, model: Qwen3NextForCausalLM):
        self.blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, Qwen3NextSparseMoeBlock)]
        self.distinct: list[int] = []
        self.top_mass: list[float] = []

    def _hook(self, block: Qwen3NextSparseMoeBlock):
        # On the block's input: the small-batch path computes the router logits inside a fused GEMV, not via gate.
        def hook(module, inputs):
            top = torch.softmax(block.gate(inputs[0]).float(), dim=-1).topk(block.top_k, dim=-1)
            self.distinct.append(top.indices.unique().numel())
            self.top_mass.append(top.values.sum(-1).mean().item())

        return hook

    def __enter__(self) -> ExpertCounter:
        self.handles = [b.register_forward_pre_hook(self._hook(b)) for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


# ---- points ----------------------------------------------------------------------------------------------------
def point_free_memory(model, args) -> int | None:
    """Free device memory for a point's pools: under tensor parallelism the smallest share of any rank (every rank
    must take the same decision, or the skipping ones would leave the others waiting in an all-reduce)."""
    free = free_memory(next(model.parameters()).device)
    tp = getattr(args, "_tp", None)
    return free if tp is None else tp.agreed_free(free)


def decode_point(model, args, roofline: dict, batch: int, context: int) -> dict:
    cfg, device, tp = model.config, next(model.parameters()).device, model.ctx.size
    ps, ssm_dtype = args.page_size, getattr(torch, args.mamba_ssm_dtype)
    P = -(-(context + 1) // ps)  # the new token's KV goes at position C
    point = {"batch": batch, "context": context}
    need = (
        batch * P * kv_layout(cfg, ps, model.dtype, tp).page_bytes
        + (batch + 1) * state_layout(cfg, model.dtype, ssm_dtype, tp).slot_bytes
    )
    free = point_free_memory(model, args)
    if free is not None and need + ACTIVATION_RESERVE > free:
        return point | {"skipped": f"pools need {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"}
    make_runner(model, batch * P, batch, ps, ssm_dtype)
    fb = ForwardBatch.build(
        query_lens=[1] * batch,
        cached_lens=[context] * batch,
        state_slots=list(range(1, batch + 1)),
        page_tables=[list(range(1 + b * P, 1 + (b + 1) * P)) for b in range(batch)],
        page_size=ps,
        device=device,
    )
    ids = torch.randint(cfg.vocab_size, (batch,), device=device)

    def step():
        return model.compute_logits(model(ids, fb)[fb.logits_indices]).float()

    with ExpertCounter(model) as counter:
        step()
    if args.cuda_graph:
        # The engine's decode path: the step's inputs copied from host lists into a replayed graph.
        graphs = DecodeGraphs(model, ps, P, batch, device, sizes=[batch])
        graphs.capture()
        host = (ids.tolist(), [context] * batch, fb.state_slots.tolist(), fb.page_table.tolist())
        step = lambda: graphs.run(*host)  # noqa: E731
    t = timed(step, device, args.warmup, args.repeats, inner=args.decode_steps)
    cost = decode_bytes(cfg, model.dtype, ssm_dtype, batch, context, model.quant, tp)  # one rank's bytes
    floor = batch * roofline["copy_bandwidth"] / cost["total"]
    point |= {"step_ms": t * 1e3, "tokens_per_s": batch / t, "floor_tokens_per_s": floor}
    point |= {"fraction": point["tokens_per_s"] / floor, "bytes": cost}
    if counter.blocks:
        point["experts_touched"] = statistics.mean(counter.distinct)
        point["experts_expected"] = expected_experts(cfg.num_experts, cfg.num_experts_per_tok, batch)
        point["router_top_k_mass"] = statistics.mean(counter.top_mass)
    return point


def prefill_point(model, args, roofline: dict, length: int) -> dict:
    cfg, device, tp = model.config, next(model.parameters()).device, model.ctx.size
    ps, chunk, ssm_dtype = args.page_size, args.max_num_batched_tokens, getattr(torch, args.mamba_ssm_dtype)
    P = -(-length // ps)
    point = {"length": length}
    need = P * kv_layout(cfg, ps, model.dtype, tp).page_bytes
    need += 2 * state_layout(cfg, model.dtype, ssm_dtype, tp).slot_bytes
    free = point_free_memory(model, args)
    if free is not None and need + ACTIVATION_RESERVE > free:
        return point | {"skipped": f"pools need {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"}
    runner = make_runner(model, P, 1, ps, ssm_dtype)
    pages = list(range(1, P + 1))
    starts = range(0, length, chunk)
    batches = [ForwardBatch.build([min(chunk, length - s)], [s], [1], [pages], ps, device=device) for s in starts]
    ids = torch.randint(cfg.vocab_size, (length,), device=device)

    def prefill():
        runner.states.conv[:, 1].zero_()  # a new sequence starts from the zero state
        runner.states.ssm[:, 1].zero_()
        for s, fb in zip(starts, batches):
            model.compute_logits(model(ids[s : s + fb.query_lens[0]], fb)[fb.logits_indices]).float()

    t = timed(prefill, device, warmup=1, repeats=args.repeats)
    cost = prefill_flops(cfg, length, chunk, model.quant, tp)  # one rank's FLOPs
    floor = length / prefill_floor_seconds(cost, roofline)
    point |= {"seconds": t, "tokens_per_s": length / t, "floor_tokens_per_s": floor}
    return point | {"fraction": point["tokens_per_s"] / floor, "flops": cost}


def guarded(fn, model, args, roofline: dict, **point) -> dict:
    """Runs one point; running out of device memory skips the point with a note instead of ending the run, except
    under tensor parallelism (the other ranks would wait for this one in an all-reduce: the run ends instead)."""
    try:
        return fn(model, args, roofline, **point)
    except torch.OutOfMemoryError:
        if getattr(args, "_tp", None) is not None:
            raise
        # handled below, outside the except block, once the traceback's frames (and tensors) are gone
    finally:
        unbind(model)
    free_memory(next(model.parameters()).device)
    return point | {"skipped": "out of device memory"}


# ---- transformers ----------------------------------------------------------------------------------------------
def transformers_model(model: Qwen3NextForCausalLM):
    """transformers' Qwen3NextForCausalLM whose parameters share our tensors' storage (no second copy of the
    weights: the names and the packed expert layout [E, 2I, H] / [E, H, I] are the same)."""
    from transformers import Qwen3NextConfig
    from transformers import Qwen3NextForCausalLM as HFModel

    hf_cfg = Qwen3NextConfig(**hf_config_dict(model.config))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):  # parameters without storage; ours are put in their place
        hf = HFModel(hf_cfg)
    ours = dict(model.named_parameters(remove_duplicate=False))
    for name, p in list(hf.named_parameters(remove_duplicate=False)):
        src = ours.get(name)
        if src is None or src.shape != p.shape:
            raise RuntimeError(f"transformers parameter {name} {tuple(p.shape)} has no match in nextserve's model")
        owner, _, leaf = name.rpartition(".")
        hf.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(src.data, requires_grad=False)
    with torch.device(src.device):  # rotary buffers were made on meta too
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)
    left = [n for n, b in hf.named_buffers() if b.is_meta]
    assert not left, f"buffers left on meta: {left}"
    return hf.eval()


def transformers_decode(hf, args, context: int) -> dict:
    """transformers' decode at batch 1: prefill `context` tokens into its cache (in chunks), then time steps."""
    device = hf.lm_head.weight.device
    ids = torch.randint(hf.config.vocab_size, (1, context), device=device)
    cache = None
    for s in range(0, context, args.max_num_batched_tokens):
        out = hf(ids[:, s : s + args.max_num_batched_tokens], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    tok = ids[:, -1:]
    t = timed(
        lambda: hf(tok, past_key_values=cache, use_cache=True), device, args.warmup, args.repeats, args.decode_steps
    )
    return {"context": context, "step_ms": t * 1e3, "tokens_per_s": 1 / t}


def compare_transformers(model, args, roofline: dict, decode: list[dict], notes: list[str]) -> list[dict]:
    try:
        import transformers
    except ImportError:
        notes.append("transformers comparison skipped: transformers is not installed")
        return []
    # Which GDN kernels transformers found decides much of its speed: say so beside the numbers.
    fla = importlib.util.find_spec("fla") is not None
    kernels = "flash-linear-attention" if fla else "its torch reference (flash-linear-attention not installed)"
    notes.append(f"transformers {transformers.__version__}, gated delta rule through {kernels}")
    hf = transformers_model(model)
    rows = []
    for context in args.contexts:
        ours = next((p for p in decode if p["batch"] == 1 and p["context"] == context), None)
        if ours is None:
            ours = guarded(decode_point, model, args, roofline, batch=1, context=context)
        if "skipped" in ours:
            rows.append({"context": context, "skipped": f"nextserve point skipped: {ours['skipped']}"})
            continue
        # Its cache grows by concatenation, so the KV may briefly exist twice.
        need = 2 * context * kv_layout(model.config, 1, model.dtype).page_bytes
        free = free_memory(hf.lm_head.weight.device)
        if free is not None and need + ACTIVATION_RESERVE > free:
            rows.append({"context": context, "skipped": f"cache needs {need / GiB:.1f} GiB, {free / GiB:.1f} free"})
            continue
        try:
            row = transformers_decode(hf, args, context)
        except torch.OutOfMemoryError:
            row = {"context": context, "skipped": "out of device memory"}
        free_memory(hf.lm_head.weight.device)
        if "skipped" not in row:
            row |= {
                "nextserve_tokens_per_s": ours["tokens_per_s"],
                "speedup": ours["tokens_per_s"] / row["tokens_per_s"],
            }
        rows.append(row)
    return rows


# ---- command ---------------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _quantization_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in QUANTIZATIONS]
    if not values or bad or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct values from {', '.join(QUANTIZATIONS)}, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="qwen3-next-80b-a3b", choices=sorted(PRESETS), help="model geometry")
    parser.add_argument("--num-layers", type=int, default=None, help="first N layers (a multiple of 4)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32, 64, 128], help="decode batch sizes")
    parser.add_argument("--contexts", type=_int_list, default=[1024, 32768], help="decode KV lengths per sequence")
    parser.add_argument("--prefill-lens", type=_int_list, default=[2048, 8192, 32768], help="prefill lengths")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prefill chunk size")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument(
        "--quantization",
        type=_quantization_list,
        default=["bf16"],
        help="weight format: bf16 (unquantised, in --dtype), fp8 (128x128 block-FP8 as the official FP8 checkpoints), "
        "or a comma list such as bf16,fp8 to time each in turn against the same roofline",
    )
    parser.add_argument("--mamba-ssm-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--decode-steps", type=int, default=10, help="decode steps per timed repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cuda-graph", action=argparse.BooleanOptionalAction, default=True, help="decode through CUDA graphs (GPU)"
    )
    parser.add_argument("--compare-transformers", action="store_true", help="also time transformers' decode")
    parser.add_argument(
        "--tp-size",
        "--tp",
        "--tensor-parallel-size",
        dest="tp_size",
        type=int,
        default=1,
        help="tensor-parallel ranks: one process each, on cuda:<rank> (--device cuda) or all on one device "
        "(--device cpu, or cuda:N with --dist-backend gloo)",
    )
    parser.add_argument(
        "--dist-backend",
        default=None,
        choices=("nccl", "gloo"),
        help="collectives between ranks (default nccl on CUDA, gloo on CPU; gloo lets ranks share one GPU)",
    )
    parser.add_argument("--output-json", default=None)


def _check(args: argparse.Namespace, cfg: ModelConfig) -> None:
    for flag in ("max_num_batched_tokens", "page_size", "decode_steps", "repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    longest = max(max(args.contexts) + 1, max(args.prefill_lens))
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"{longest} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, every flag spelled out."""
    parts = ["nextserve bench model"]
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("command", "subcommand", "output_json"):
            continue
        flag = "--" + key.replace("_", "-")
        if (key, value) in (("tp_size", 1), ("dist_backend", None)):
            continue  # TP1 runs spell their command as before --tp-size existed
        if key == "cuda_graph":  # on by default: spell out either way
            parts.append(flag if value else "--no-cuda-graph")
        elif isinstance(value, bool):
            parts += [flag] if value else []
        elif value is not None:
            parts += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return " ".join(parts)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def run_model(cfg: ModelConfig, args: argparse.Namespace, device, dtype, quantization: str, roofline: dict) -> dict:
    """Builds the model in one format, times every point, and returns the run (the model is freed on return)."""
    args = argparse.Namespace(**vars(args))  # cuda_graph may be turned off for this model alone
    quant = QUANTIZATIONS[quantization]
    tp = getattr(args, "_tp", None)
    torch.manual_seed(args.seed)  # the same on every rank: every rank draws the same inputs
    if tp is None:
        model = build_model(cfg, device, dtype, args.seed, quant)
    else:
        model = build_model(cfg, device, dtype, args.seed, quant, ctx=tp.ctx, comm=tp.comm)
    notes: list[str] = []
    reason = supports_graphs(model, device)
    if reason is None and tp is not None and tp.comm.gloo:
        reason = "gloo collectives cannot be captured"
    if args.cuda_graph and reason is not None:
        args.cuda_graph = False
        notes.append(f"{quantization}: decode ran without CUDA graphs: {reason}")
    with torch.inference_mode():
        decode = [
            guarded(decode_point, model, args, roofline, batch=b, context=c)
            for c in args.contexts
            for b in args.batch_sizes
        ]
        prefill = [guarded(prefill_point, model, args, roofline, length=n) for n in args.prefill_lens]
        hf = []
        if args.compare_transformers and tp is not None:
            notes.append(f"{quantization}: transformers comparison skipped (it runs at --tp-size 1 only)")
        elif args.compare_transformers and quant is not None:
            # transformers' model would need its own FP8 weights: it shares ours only in bf16.
            notes.append(f"{quantization}: transformers comparison skipped (it runs on the bf16 model only)")
        elif args.compare_transformers:
            hf = compare_transformers(model, args, roofline, decode, notes)
    run = {"quantization": quantization, "cuda_graph": args.cuda_graph}
    weights = check_weights_fit(cfg, dtype, None, quant=quant, tp_size=model.ctx.size)  # one rank's
    run |= {"weight_bytes": weights, "decode": decode, "prefill": prefill}
    return run | {"transformers": hf, "notes": notes}


def run(args: argparse.Namespace) -> int:
    if args.tp_size != 1:
        from nextserve.bench.model_tp import run_tp

        return run_tp(args)
    device = resolve_device(args.device)
    backends.select(device)  # refuses a GPU run whose fast paths failed to import
    dtype = resolve_dtype(args.dtype, device)
    cfg = preset_config(args.preset, args.num_layers)
    _check(args, cfg)
    # Each model must fit alone (the first is freed before the second is built); checked before building anything.
    free = free_memory(device)
    weights = {q: check_weights_fit(cfg, dtype, free, args.preset, QUANTIZATIONS[q]) for q in args.quantization}
    device_name = device_label(device)
    print(header(args, cfg, weights, dtype, f"{device} ({device_name})"))
    roofline, notes = roofline_and_notes(args, device, dtype)
    print(roofline_line(roofline, dtype))
    runs = run_models(cfg, args, device, dtype, roofline)
    finish(args, make_result(args, cfg, str(device), device_name, dtype, roofline, notes, runs))
    return 0


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def header(
    args: argparse.Namespace,
    cfg: ModelConfig,
    weights: dict[str, int],
    dtype: torch.dtype,
    where: str,
    weights_label: str = "weights",
) -> str:
    sizes = ", ".join(f"{q} {b / GiB:.2f} GiB" for q, b in weights.items())
    return (
        f"bench model: {args.preset}, {cfg.num_hidden_layers} layers ({len(cfg.linear_attention_layers)} GDN + "
        f"{len(cfg.full_attention_layers)} attention), {weights_label} {sizes}, {_dtype_name(dtype)} on {where}"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def roofline_and_notes(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[dict, list[str]]:
    cuda = device.type == "cuda"
    fp8 = any(QUANTIZATIONS[q] is not None for q in args.quantization)
    roofline = measure_roofline(
        device, dtype, copy_bytes=GiB if cuda else 32 * 2**20, gemm_n=8192 if cuda else 256, fp8=fp8
    )
    return roofline, [f"FP8 GEMMs through {fp8_kernel(device)}"] if fp8 else []


def roofline_line(roofline: dict, dtype: torch.dtype) -> str:
    line = f"roofline: copy {roofline['copy_bandwidth'] / 1e9:.1f} GB/s, {_dtype_name(dtype)} matmul "
    line += f"{roofline['matmul_rate'] / 1e12:.3g} TFLOP/s"
    if "fp8_matmul_rate" in roofline:
        line += f", block-FP8 matmul {roofline['fp8_matmul_rate'] / 1e12:.3g} TFLOP/s"
    return line


def run_models(cfg: ModelConfig, args: argparse.Namespace, device, dtype, roofline: dict) -> list[dict]:
    runs = []
    for q in args.quantization:
        runs.append(run_model(cfg, args, device, dtype, q, roofline))
        free_memory(device)  # the model went with run_model's frame: hand its memory back before the next one
    return runs


def make_result(
    args: argparse.Namespace,
    cfg: ModelConfig,
    device: str,
    device_name: str,
    dtype: torch.dtype,
    roofline: dict,
    notes: list[str],
    runs: list[dict],
) -> dict:
    result = {
        "preset": args.preset,
        "num_layers": cfg.num_hidden_layers,
        "device": device,
        "device_name": device_name,
        "dtype": _dtype_name(dtype),
        "mamba_ssm_dtype": args.mamba_ssm_dtype,
        "torch_version": torch.__version__,
        "git_revision": _git_revision(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": _command(args),
        "page_size": args.page_size,
        "cuda_graph": args.cuda_graph,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "params": dataclasses.asdict(param_counts(cfg)),
        "roofline": roofline,
    }
    if len(runs) == 1:  # one format: the run's keys at the top level, as before --quantization existed
        (only,) = runs
        result |= only | {"notes": notes + only["notes"]}
    else:
        result |= {"runs": runs, "notes": notes + [n for r in runs for n in r["notes"]]}
    return result


def finish(args: argparse.Namespace, result: dict) -> None:
    print_table(result)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


def _point_name(p: dict) -> str:
    return f"decode B={p['batch']} C={p['context']}" if "batch" in p else f"prefill N={p['length']}"


def print_table(result: dict) -> None:
    runs = result.get("runs") or [result]
    if result.get("tp_size", 1) > 1:
        print(
            f"\ntensor parallel {result['tp_size']} over {result['dist_backend']} "
            f"({', '.join(result['rank_devices'])}): rank 0's times, floors from one rank's bytes and FLOPs"
        )
    for run in runs:
        if "runs" in result:
            print(f"\n{run['quantization']}: {run['weight_bytes'] / GiB:.2f} GiB of weights")
        print(f"\n{'point':<28}{'tokens/s':>12}{'floor tok/s':>14}{'fraction':>10}")
        for p in run["decode"] + run["prefill"]:
            name = _point_name(p)
            if "skipped" in p:
                print(f"{name:<28}  skipped: {p['skipped']}")
            else:
                print(f"{name:<28}{p['tokens_per_s']:>12.1f}{p['floor_tokens_per_s']:>14.1f}{p['fraction']:>10.3f}")
        for p in run["transformers"]:
            name = f"transformers B=1 C={p['context']}"
            if "skipped" in p:
                print(f"{name:<28}  skipped: {p['skipped']}")
            else:
                print(f"{name:<28}{p['tokens_per_s']:>12.1f}  nextserve {p['speedup']:.2f}x faster")
    by_format = {run["quantization"]: run for run in runs}
    if "bf16" in by_format and "fp8" in by_format:
        print(f"\n{'fp8 / bf16':<28}{'speed':>12}{'floor':>14}")
        bf16, fp8 = (by_format[q]["decode"] + by_format[q]["prefill"] for q in ("bf16", "fp8"))
        for old, new in zip(bf16, fp8):
            if "skipped" not in old and "skipped" not in new:
                speed = new["tokens_per_s"] / old["tokens_per_s"]
                floor = new["floor_tokens_per_s"] / old["floor_tokens_per_s"]
                print(f"{_point_name(new):<28}{speed:>11.2f}x{floor:>13.2f}x")
    for note in result["notes"]:
        print(f"note: {note}")
