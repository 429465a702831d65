"""Checkpoint tensors -> Qwen3NextForCausalLM parameters.

Names are the checkpoint's own, with one mapping: per-expert tensors `...mlp.experts.{e}.{gate,up,down}_proj.weight`
are packed into `...mlp.experts.gate_up_proj[e]` (gate rows, then up rows) and `...mlp.experts.down_proj[e]`.
Checkpoints that already store the fused tensors (newer transformers) load as they are. Each tensor is cut to
this rank's shard by the parameter's `shard_fn`. Every problem raises `WeightsError` naming the tensor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from nextserve.layers.linear import load_param

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
# Buffers some checkpoints carry that have no parameter here.
_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.weight_scale_inv)$")


class WeightsError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors."""


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    has_mtp = getattr(model, "mtp", None) is not None
    loaded: set[str] = set()
    expert_rows: dict[str, set[tuple[int, str]]] = {}
    skipped_mtp = 0
    for name, tensor in tensors:
        if _SKIP.search(name):
            continue
        if name.startswith("mtp.") and not has_mtp:
            skipped_mtp += 1
            continue
        m = _EXPERT.match(name)
        if m:
            _load_expert(params, m, tensor, name)
            expert_rows.setdefault(m["prefix"], set()).add((int(m["e"]), m["proj"]))
            continue
        if name not in params:
            raise WeightsError(f"unexpected tensor {name!r} in the checkpoint (no such parameter in the model)")
        try:
            load_param(params[name], tensor, name)
        except ValueError as e:
            raise WeightsError(str(e)) from None
        loaded.add(name)
    if skipped_mtp:
        logger.info("skipped %d mtp.* tensors (MTP head not enabled)", skipped_mtp)

    # Packed experts count as loaded when every (expert, projection) arrived, or when the fused tensor did.
    for prefix, seen in expert_rows.items():
        n_exp = params[prefix + ".gate_up_proj"].shape[0]
        missing = [(e, p) for e in range(n_exp) for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in seen]
        if missing:
            e, p = missing[0]
            raise WeightsError(f"missing tensor {prefix}.{e}.{p}.weight (and {len(missing) - 1} more expert tensors)")
        loaded.update({prefix + ".gate_up_proj", prefix + ".down_proj"})
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    if tied:
        loaded.add("lm_head.weight")
    missing = [n for n in params if n not in loaded]
    if missing:
        raise WeightsError(f"missing tensor {missing[0]!r} in the checkpoint ({len(missing)} missing in all)")


def _load_expert(params: dict[str, nn.Parameter], m: re.Match, tensor: torch.Tensor, name: str) -> None:
    e, proj = int(m["e"]), m["proj"]
    if proj == "down_proj":
        param = params.get(m["prefix"] + ".down_proj")
    else:
        param = params.get(m["prefix"] + ".gate_up_proj")
    if param is None:
        raise WeightsError(f"unexpected tensor {name!r} in the checkpoint (this layer has no routed experts)")
    if e >= param.shape[0]:
        raise WeightsError(f"tensor {name!r}: expert {e} out of range (the model has {param.shape[0]} experts)")
    if tuple(tensor.shape) != param.expert_shape:
        raise WeightsError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {param.expert_shape}")
    # Shard one expert through the packed parameter's shard_fn by giving it a leading expert axis of 1.
    if proj == "down_proj":
        local = param.shard_fn(tensor.unsqueeze(0))[0]
        target = param.data[e]
    else:
        half = param.shape[1] // 2
        local = param.shard_fn(torch.cat([tensor, tensor], dim=0).unsqueeze(0))[0][:half]
        rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
        target = param.data[e, rows]
    if local.shape != target.shape:
        raise WeightsError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {tuple(target.shape)} per expert shard"
        )
    target.copy_(local)
