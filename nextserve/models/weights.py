"""Checkpoint tensors -> Qwen3NextForCausalLM parameters.

Names are the checkpoint's own, with one mapping: per-expert tensors `...mlp.experts.{e}.{gate,up,down}_proj.weight`
are packed into `...mlp.experts.gate_up_proj[e]` (gate rows, then up rows) and `...mlp.experts.down_proj[e]`.
Checkpoints that already store the fused tensors (newer transformers) load as they are. Each tensor is cut to
this rank's shard by the parameter's `shard_fn` where it arrives (on the host, from the checkpoint reader), and
only the shard moves to the parameter's device. Every problem raises `WeightsError` naming the tensor.

Block-FP8 parameters (float8_e4m3fn, with `X_scale_inv` beside them) take an FP8 checkpoint's weight and scale as
they are, or quantise a floating checkpoint tensor on the fly (`--quantization fp8`), one tensor at a time, the
rank's shard on the parameter's device (shards are whole blocks, so that is the shard of the whole tensor's
quantisation). `keeps_fp8(model)` tells the checkpoint reader which FP8 tensors to hand over undequantised.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from nextserve.layers.linear import shard_of
from nextserve.layers.shard import Split
from nextserve.loader.fp8 import FP8_DTYPE, quantize_block_fp8

logger = logging.getLogger(__name__)

_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight(?P<scale>_scale_inv)?$"
)
# Buffers some checkpoints carry that have no parameter here.
_SKIP = re.compile(r"rotary_emb\.inv_freq$")
SCALE = "_scale_inv"


class WeightsError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors."""


def keeps_fp8(model: nn.Module):
    """Predicate over checkpoint tensor names: whether the model holds that weight in FP8 (so an FP8 checkpoint's
    tensor and scale are wanted as stored)."""
    fp8 = {name for name, p in model.named_parameters() if p.dtype == FP8_DTYPE}

    def keep(name: str) -> bool:
        m = _EXPERT.match(name)
        if m:
            return m["prefix"] + (".down_proj" if m["proj"] == "down_proj" else ".gate_up_proj") in fp8
        return name in fp8

    return keep


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
            for proj in _load_expert(params, m, tensor, name):
                expert_rows.setdefault(m["prefix"], set()).add((int(m["e"]), proj))
            continue
        if name not in params:
            raise WeightsError(f"unexpected tensor {name!r} in the checkpoint (no such parameter in the model)")
        param = params[name]
        try:
            local = shard_of(param, tensor, name).to(param.device)
            if param.dtype == FP8_DTYPE and local.dtype != FP8_DTYPE:
                # --quantization fp8: quantise this rank's share now, on its device, with its scale.
                if name + SCALE not in params:
                    raise WeightsError(f"cannot quantise {name!r} of shape {tuple(tensor.shape)} to block FP8")
                scale_param = params[name + SCALE]
                local, scale = _quantize(local, scale_param.fp8_block, name.endswith(".gate_up_proj"))
                _copy(scale_param, scale, name + SCALE)
                loaded.add(name + SCALE)
            _copy(param, local, name)
        except ValueError as e:
            raise WeightsError(str(e)) from None
        loaded.add(name)
    if skipped_mtp:
        logger.info("skipped %d mtp.* tensors (MTP head not enabled)", skipped_mtp)

    # Packed experts count as loaded when every (expert, projection) arrived, or when the fused tensor did.
    for prefix, seen in expert_rows.items():
        n_exp = params[prefix + ".gate_up_proj"].shape[0]
        fp8 = params[prefix + ".gate_up_proj"].dtype == FP8_DTYPE
        kinds = (".weight", ".weight" + SCALE) if fp8 else (".weight",)
        wanted = [(e, p + k) for e in range(n_exp) for p in ("gate_proj", "up_proj", "down_proj") for k in kinds]
        missing = [(e, p) for e, p in wanted if (e, p) not in seen]
        if missing:
            e, p = missing[0]
            raise WeightsError(f"missing tensor {prefix}.{e}.{p} (and {len(missing) - 1} more expert tensors)")
        loaded.update({prefix + ".gate_up_proj", prefix + ".down_proj"})
        if fp8:
            loaded.update({prefix + ".gate_up_proj" + SCALE, prefix + ".down_proj" + SCALE})
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    if tied:
        loaded.add("lm_head.weight")
    missing = [n for n in params if n not in loaded]
    if missing:
        raise WeightsError(f"missing tensor {missing[0]!r} in the checkpoint ({len(missing)} missing in all)")


def _copy(param: nn.Parameter, local: torch.Tensor, name: str) -> None:
    if local.shape != param.shape:
        raise WeightsError(
            f"tensor {name!r}: this rank's share has shape {tuple(local.shape)}, not {tuple(param.shape)}"
        )
    param.data.copy_(local)


def _quantize(t: torch.Tensor, block: tuple[int, int], gate_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise a 2-D weight, or fused experts [E, rows, cols] one expert at a time (a gate_up's gate and up
    halves blocked apart, as the packed scales are)."""
    if t.dim() == 2:
        return quantize_block_fp8(t, block)
    experts = [[quantize_block_fp8(half, block) for half in w.chunk(2 if gate_up else 1)] for w in t]
    wq = torch.stack([torch.cat([q for q, _ in halves]) for halves in experts])
    scale = torch.stack([torch.cat([s for _, s in halves]) for halves in experts])
    return wq, scale


def _load_expert(params: dict[str, nn.Parameter], m: re.Match, tensor: torch.Tensor, name: str) -> list[str]:
    """Writes one expert's projection (or its FP8 scale) into the packed parameters; returns what arrived."""
    e, proj, prefix = int(m["e"]), m["proj"], m["prefix"]
    packed = prefix + (".down_proj" if proj == "down_proj" else ".gate_up_proj")
    param = params.get(packed)
    if param is None:
        raise WeightsError(f"unexpected tensor {name!r} in the checkpoint (this layer has no routed experts)")
    if e >= param.shape[0]:
        raise WeightsError(f"tensor {name!r}: expert {e} out of range (the model has {param.shape[0]} experts)")
    fp8 = param.dtype == FP8_DTYPE
    if m["scale"]:
        if not fp8:
            raise WeightsError(f"unexpected FP8 scale {name!r}: the experts of this layer are not FP8")
        scale_param = params[packed + SCALE]
        _place(scale_param, e, proj, _expert_share(scale_param, tensor, name), tensor.shape, name)
        return [proj + ".weight" + SCALE]
    if tuple(tensor.shape) != param.expert_shape:
        raise WeightsError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {param.expert_shape}")
    arrived = [proj + ".weight"]
    local = _expert_share(param, tensor, name).to(param.device)
    if fp8 and tensor.dtype != FP8_DTYPE:  # --quantization fp8: this rank's share of the projection, quantised now
        local, scale = quantize_block_fp8(local, params[packed + SCALE].fp8_block)
        _place(params[packed + SCALE], e, proj, scale, tensor.shape, name + SCALE)
        arrived.append(proj + ".weight" + SCALE)
    _place(param, e, proj, local, tensor.shape, name)
    return arrived


def _expert_share(param: nn.Parameter, tensor: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's share of one expert's gate, up or down tensor (a weight or an FP8 scale): the packed
    parameter's cut without its expert axis, for one half of a gate_up."""
    shard = param.shard_fn
    if isinstance(shard, Split):
        shard = Split(shard.ctx, shard.dim - 1, shard.parts[:1])
    try:
        return shard(tensor)
    except ValueError as e:
        raise WeightsError(f"tensor {name!r}: {e}") from None


def _place(param: nn.Parameter, e: int, proj: str, local: torch.Tensor, full_shape, name: str) -> None:
    """Copy this rank's share of expert e's gate/up/down tensor (a weight, or an FP8 scale: same layout rules)
    into its packed rows."""
    if proj == "down_proj":
        target = param.data[e]
    else:
        half = param.shape[1] // 2
        rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
        target = param.data[e, rows]
    if local.shape != target.shape:
        raise WeightsError(
            f"tensor {name!r} has shape {tuple(full_shape)}; expected {tuple(target.shape)} per expert shard"
        )
    target.copy_(local)
