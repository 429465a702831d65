"""Bias-free linear layers that know how to take their tensor-parallel shard of a checkpoint tensor.

A `Linear` holds only its local shard. `shard_fn` maps the full checkpoint tensor to that shard (identity at
TP=1); the loader calls `load_full(tensor)`. Column-parallel layers split output rows, row-parallel ones split
input columns and all-reduce their output through the communicator when `reduce` is set.

With `fp8_block` the weight is float8_e4m3fn with its fp32 block scales beside it as `weight_scale_inv` (the
checkpoints' name), and the product runs through `ops.fp8.linear` (activations quantised per token per block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nextserve.loader.fp8 import FP8_DTYPE, scale_shape
from nextserve.ops import fp8 as fp8_ops
from nextserve.parallel import Communicator, ParallelContext

ShardFn = Callable[[torch.Tensor], torch.Tensor]


def split_parts(ctx: ParallelContext, dim: int, parts: Sequence[int] | None = None) -> ShardFn:
    """Shard along `dim`: the tensor is cut into `parts` (sizes along dim; one part if None) and this rank takes
    its 1/size of each part, concatenated (for fused layouts such as conv channels [q | k | v])."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        if ctx.size == 1:
            return t
        pieces = t.split(list(parts), dim) if parts else (t,)
        out = []
        for p in pieces:
            if p.shape[dim] % ctx.size:
                raise ValueError(f"cannot split size {p.shape[dim]} across {ctx.size} ranks")
            out.append(p.chunk(ctx.size, dim)[ctx.rank])
        return torch.cat(out, dim)

    return fn


def replicated(t: torch.Tensor) -> torch.Tensor:
    return t


def load_param(param: nn.Parameter, full: torch.Tensor, name: str) -> None:
    """Copies the rank's shard of `full` into `param`, checking the shape (errors name the tensor)."""
    shard_fn: ShardFn = getattr(param, "shard_fn", replicated)
    local = shard_fn(full)
    if local.shape != param.shape:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(full.shape)}; the model expects {tuple(param.shape)}"
            + ("" if local is full else " for this rank's shard")
        )
    param.data.copy_(local)


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        shard_fn: ShardFn = replicated,
        comm: Communicator | None = None,
        dtype: torch.dtype | None = None,
        fp8_block: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.fp8_block = fp8_block
        wdtype = FP8_DTYPE if fp8_block else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype), requires_grad=False)
        self.weight.shard_fn = shard_fn
        if fp8_block:
            scales = scale_shape((out_features, in_features), fp8_block)
            self.weight_scale_inv = nn.Parameter(torch.empty(scales, dtype=torch.float32), requires_grad=False)
            self.weight_scale_inv.shard_fn = _fp8_shard_fn(shard_fn)
            self.weight_scale_inv.fp8_block = fp8_block
        # Set only on row-parallel layers whose output is a partial sum.
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_block:
            y = fp8_ops.linear(x, self.weight, self.weight_scale_inv, self.fp8_block)
        else:
            y = F.linear(x, self.weight)
        return self.comm.all_reduce(y) if self.comm is not None else y


def _fp8_shard_fn(shard_fn: ShardFn) -> ShardFn:
    """The scales' shard function: tensor parallelism over FP8 weights is not wired yet, so a weight whose shard
    function cuts anything (TP > 1) is refused with a clear error; unsharded, the scales load whole."""
    if shard_fn is replicated:
        return replicated

    def fn(t: torch.Tensor) -> torch.Tensor:
        probe = shard_fn(t)
        if probe is t or probe.shape == t.shape:
            return t
        raise ValueError("FP8 weights cannot be sharded across tensor-parallel ranks yet")

    return fn


def column_parallel(ctx: ParallelContext, in_f: int, out_f: int, parts=None, dtype=None, fp8_block=None) -> Linear:
    """Output rows split across ranks. `out_f` is the full size."""
    shard = split_parts(ctx, 0, parts)
    return Linear(in_f, ctx.split(out_f, "output features"), shard_fn=shard, dtype=dtype, fp8_block=fp8_block)


def row_parallel(
    ctx: ParallelContext, comm: Communicator | None, in_f: int, out_f: int, dtype=None, fp8_block=None
) -> Linear:
    """Input columns split across ranks; the output is all-reduced through `comm` (None: caller reduces)."""
    reduce = comm if (comm is not None and ctx.size > 1) else None
    in_local = ctx.split(in_f, "input features")
    return Linear(in_local, out_f, shard_fn=split_parts(ctx, 1), comm=reduce, dtype=dtype, fp8_block=fp8_block)
