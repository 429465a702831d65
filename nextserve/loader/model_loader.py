"""Builds a Qwen3NextForCausalLM on a device and fills it from a checkpoint directory; loads the tokenizer and
the generation defaults that sit beside the weights.

Tensor parallelism: rank r of n builds and fills only its shard. In each worker process (one per rank):

    from nextserve.parallel import ParallelConfig, init_distributed
    from nextserve.models.sharding import check_tp_size

    check_tp_size(model_config, n, quant)             # cheap; once, before starting workers: clear size errors
    ctx, comm = init_distributed(ParallelConfig(tp_size=n, nnodes=..., node_rank=..., dist_init_addr=...),
                                 local_rank, device)  # device: "cuda" -> cuda:<local_rank>; "cpu" -> gloo
    model = load_model(model_dir, model_config, dtype=..., device=..., ctx=ctx, comm=comm, quant=quant)
    # or build_dummy_model(model_config, dtype, device, with_mtp, quant, seed=seed, ctx=ctx, comm=comm)

Every rank must then run the same forward calls in the same order (each decoder layer all-reduces twice, the
embedding once, `compute_logits` all-gathers): broadcast the step's inputs from one rank. `compute_logits` returns
the full-vocabulary logits on every rank. The layers' cache shapes are per rank (`attn.num_kv_heads`, `gdn.hv`,
`gdn.conv1d.weight.shape[0]`), so pools sized from them hold only the rank's share. Without ctx/comm the model
is TP1, as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nextserve.layers.quant import Fp8Config
from nextserve.loader.checkpoint import (
    DEFAULT_FP8_BLOCK,
    CheckpointError,
    fp8_block_size,
    fp8_modules,
    iter_checkpoint,
    read_config,
)
from nextserve.model_config import ModelConfig
from nextserve.models.qwen3_next import Qwen3NextForCausalLM
from nextserve.models.weights import keeps_fp8, load_weights
from nextserve.parallel import Communicator, ParallelContext

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("fp8",)
# Block sizes the FP8 kernels compute with (the CPU reference takes any, but is held to what the GPU runs).
SUPPORTED_FP8_BLOCKS = ((128, 128),)


def resolve_quantization(model_dir: str | Path, quantization: str | None, *, from_weights: bool = True):
    """The Fp8Config the model is built with, or None for weights in the model dtype.

    An FP8 checkpoint (config.json's quantization_config) is computed in FP8 whatever `quantization` says, module
    for module as stored (`from_weights`: read from its scales; without weights, e.g. dummy loading, by the official
    rule minus `modules_to_not_convert`). `quantization="fp8"` quantises any other checkpoint while loading."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"unsupported --quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    raw = read_config(model_dir)
    block = fp8_block_size(raw)
    if block is not None and block not in SUPPORTED_FP8_BLOCKS:
        raise CheckpointError(
            f"unsupported FP8 quantization_config.weight_block_size {list(block)}: nextserve computes with "
            f"{' or '.join(str(list(b)) for b in SUPPORTED_FP8_BLOCKS)} blocks"
        )
    if block is not None:
        if from_weights:
            return Fp8Config(block, modules=fp8_modules(model_dir))
        skip = raw["quantization_config"].get("modules_to_not_convert") or ()
        return Fp8Config(block, skip=tuple(skip))
    if quantization == "fp8":
        return Fp8Config(DEFAULT_FP8_BLOCK)
    return None


def load_model(
    model_dir: str | Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    with_mtp: bool | None = None,
    ctx: ParallelContext | None = None,
    comm: Communicator | None = None,
    progress: bool = True,
    quant: Fp8Config | None = None,
) -> Qwen3NextForCausalLM:
    """Build the model (block-FP8 where `quant` says) and fill it from the checkpoint, one tensor at a time: each is
    cut to this rank's shard on the host, and the shard moved to the device before any conversion, so quantising a
    bf16 checkpoint never holds it whole."""
    with torch.device(device):
        model = Qwen3NextForCausalLM(config, dtype=dtype, ctx=ctx, comm=comm, with_mtp=with_mtp, quant=quant)
    stream = iter_checkpoint(model_dir, dtype=dtype, progress=progress, keep_fp8=keeps_fp8(model))
    # FP8 tensors and their fp32 scales keep their dtypes; the rest arrive in the model dtype already.
    load_weights(model, stream)
    return model.eval()


def build_dummy_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    with_mtp: bool | None,
    quant: Fp8Config | None,
    seed: int = 0,
    ctx: ParallelContext | None = None,
    comm: Communicator | None = None,
) -> Qwen3NextForCausalLM:
    """`--load-format dummy`: the model built on the device and filled with random weights of realistic scales
    (FP8 ones quantised from them), nothing read from disk. With ctx/comm, rank ctx.rank's shard of the TP1
    dummy model of the same seed."""
    from nextserve.loader.dummy import init_dummy_weights

    with torch.device(device):
        model = Qwen3NextForCausalLM(config, dtype=dtype, ctx=ctx, comm=comm, with_mtp=with_mtp, quant=quant)
    init_dummy_weights(model, seed=seed)
    return model.eval()


def weights_summary(model: torch.nn.Module, dummy: bool) -> str:
    """What the weights take, by storage dtype: e.g. '75.10 GiB (float8_e4m3fn 71.90 GiB incl. 0.10 GiB of block
    scales, bfloat16 3.20 GiB), dummy (random) weights'."""
    by_dtype: dict[str, int] = {}
    scales = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.endswith("_scale_inv"):
            scales += nbytes
            by_dtype["float8_e4m3fn"] = by_dtype.get("float8_e4m3fn", 0) + nbytes
            continue
        key = str(p.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + nbytes
    parts = []
    for key, nbytes in sorted(by_dtype.items(), key=lambda kv: -kv[1]):
        extra = f" incl. {_size(scales)} of block scales" if key == "float8_e4m3fn" else ""
        parts.append(f"{key} {_size(nbytes)}{extra}")
    total = sum(by_dtype.values())
    return f"{_size(total)} ({', '.join(parts)})" + (", dummy (random) weights" if dummy else "")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def load_tokenizer(model_dir: str | Path, synthetic_for: ModelConfig | None = None):
    """The folder's tokenizer; with `synthetic_for` (dummy loading) and no tokenizer files in the folder, a
    synthetic one over that config's vocabulary, its EOS at the config's first EOS id
    (`loader/synthetic_tokenizer.py`)."""
    from transformers import AutoTokenizer

    if synthetic_for is not None and not has_tokenizer(model_dir):
        from nextserve.loader.synthetic_tokenizer import synthetic_tokenizer

        vocab, eos = synthetic_for.vocab_size, (synthetic_for.eos_token_ids or [None])[0]
        logger.info("no tokenizer in %s: using a synthetic one over %d ids", model_dir, vocab)
        return synthetic_tokenizer(vocab, eos_token_id=eos)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types here; the user needs the path and the cause
        raise CheckpointError(f"cannot load a tokenizer from {model_dir}: {e}") from e


def has_tokenizer(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))


def load_generation_defaults(model_dir: str | Path) -> dict:
    """generation_config.json (sampling defaults and EOS ids), or {} when absent."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
