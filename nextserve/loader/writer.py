"""Write a Hugging Face style safetensors checkpoint; tests and benchmarks make synthetic checkpoints with it.

Output: ``config.json`` plus either ``model.safetensors`` or shards ``model-0000i-of-0000N.safetensors``
with a ``model.safetensors.index.json`` ({"metadata": {"total_size": bytes}, "weight_map": {name: file}}).
Shards are filled greedily in insertion order; a tensor larger than ``max_shard_bytes`` gets a shard of its
own. With ``fp8_block`` the 2-D floating ``*.weight`` tensors are stored block-quantised, each followed by its
``weight_scale_inv``, and config.json gains the matching ``quantization_config``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nextserve.loader.checkpoint import CONFIG_FILE, INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE
from nextserve.loader.fp8 import check_block, quantize_block_fp8


def _quantise(
    tensors: dict[str, torch.Tensor], block: tuple[int, int], skip: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and t.dim() == 2 and t.is_floating_point() and not skip(name):
            out[name], out[name + SCALE_SUFFIX] = quantize_block_fp8(t, block)
        else:
            out[name] = t
    return out


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Split tensors greedily, in order, into groups of at most ``max_shard_bytes`` (bar lone big ones)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses tensors that share storage (tied weights, views of one buffer); clone those.
    seen: set[int] = set()
    ready: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        ready[name] = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    save_file(ready, str(path), metadata={"format": "pt"})


def write_checkpoint(
    model_dir: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    max_shard_bytes: int | None = None,
    fp8_block: tuple[int, int] | None = None,
    fp8_skip: Callable[[str], bool] | None = None,
) -> None:
    """Write ``tensors`` and ``config`` to ``model_dir`` (created if needed) in Hugging Face's layout.

    ``fp8_skip(name)`` returning True keeps that weight unquantised (e.g. norms, routers, lm_head).
    """
    if not tensors:
        raise ValueError("write_checkpoint needs at least one tensor")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    # A stale single file would shadow new shards (the loader prefers it), and stale shards would linger.
    for old in [model_dir / SINGLE_FILE, model_dir / INDEX_FILE, *model_dir.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    config = dict(config)  # never mutate the caller's dict
    if fp8_block is not None:
        block = check_block(fp8_block)
        skip = fp8_skip or (lambda name: False)
        tensors = _quantise(tensors, block, skip)
        # As the official FP8 checkpoints do: name the modules whose 2-D weights stayed unquantised.
        kept = [n.removesuffix(".weight") for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2]
        kept = [n for n in kept if n + ".weight" + SCALE_SUFFIX not in tensors]
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
            "modules_to_not_convert": kept,
        }
    (model_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _save(shards[0], model_dir / SINGLE_FILE)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, model_dir / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
