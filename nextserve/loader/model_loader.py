"""Builds a Qwen3NextForCausalLM on a device and fills it from a checkpoint directory; loads the tokenizer and
the generation defaults that sit beside the weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nextserve.loader.checkpoint import CheckpointError, iter_checkpoint
from nextserve.model_config import ModelConfig
from nextserve.models.qwen3_next import Qwen3NextForCausalLM
from nextserve.models.weights import load_weights
from nextserve.parallel import Communicator, ParallelContext

logger = logging.getLogger(__name__)


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
) -> Qwen3NextForCausalLM:
    with torch.device(device):
        model = Qwen3NextForCausalLM(config, dtype=dtype, ctx=ctx, comm=comm, with_mtp=with_mtp)
    tensors = ((name, t.to(device)) for name, t in iter_checkpoint(model_dir, dtype=dtype, progress=progress))
    load_weights(model, tensors)
    return model.eval()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types here; the user needs the path and the cause
        raise CheckpointError(f"cannot load a tokenizer from {model_dir}: {e}") from e


def load_generation_defaults(model_dir: str | Path) -> dict:
    """generation_config.json (sampling defaults and EOS ids), or {} when absent."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
