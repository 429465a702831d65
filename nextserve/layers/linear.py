"""Bias-free linear layers that know how to take their tensor-parallel shard of a checkpoint tensor.

A `Linear` holds only its local shard. `shard_fn` (layers/shard.py) maps the full checkpoint tensor to that shard
(identity at TP=1); the loader takes `shard_of(param, tensor, name)`. Column-parallel layers split output rows,
row-parallel ones split input columns and all-reduce their output through the communicator when `comm` is set.

With `fp8_block` the weight is float8_e4m3fn with its fp32 block scales beside it as `weight_scale_inv` (the
checkpoints' name), and the product runs through `ops.fp8.linear` (activations quantised per token per block).
The scales are sharded with the weight, block for block; a shard boundary inside a block is refused at build time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextserve.layers.shard import ShardFn, Split, replicated
from nextserve.loader.fp8 import FP8_DTYPE, scale_shape
from nextserve.ops import fp8 as fp8_ops
from nextserve.parallel import Communicator, ParallelContext


def shard_of(param: nn.Parameter, full: torch.Tensor, name: str) -> torch.Tensor:
    """The rank's shard of checkpoint tensor `full` for `param` (a view where it can be), after checking the full
    shape (errors name the tensor)."""
    shard_fn: ShardFn = getattr(param, "shard_fn", replicated)
    expected = shard_fn.full_shape(param.shape)
    if tuple(full.shape) != expected:
        sharded = "" if shard_fn is replicated else f" (this rank holds {tuple(param.shape)} of it)"
        raise ValueError(f"tensor {name!r} has shape {tuple(full.shape)}; the model expects {expected}{sharded}")
    return shard_fn(full)


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
            # The scales are cut where the weight is, in blocks: a cut inside a block is an error here, at build time.
            dim = getattr(shard_fn, "dim", 0)
            self.weight_scale_inv.shard_fn = shard_fn.for_blocks(fp8_block[dim])
            self.weight_scale_inv.fp8_block = fp8_block
        # Set only on row-parallel layers whose output is a partial sum.
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_block:
            y = fp8_ops.linear(x, self.weight, self.weight_scale_inv, self.fp8_block)
        else:
            y = F.linear(x, self.weight)
        return self.comm.all_reduce(y) if self.comm is not None else y


def column_parallel(ctx: ParallelContext, in_f: int, out_f: int, parts=None, dtype=None, fp8_block=None) -> Linear:
    """Output rows split across ranks. `out_f` is the full size; `parts` (summing to it) are split one by one."""
    shard = Split(ctx, 0, tuple(parts or (out_f,)))
    return Linear(in_f, ctx.split(out_f, "output features"), shard_fn=shard, dtype=dtype, fp8_block=fp8_block)


def row_parallel(
    ctx: ParallelContext, comm: Communicator | None, in_f: int, out_f: int, dtype=None, fp8_block=None
) -> Linear:
    """Input columns split across ranks; the output is all-reduced through `comm` (None: caller reduces)."""
    reduce = comm if (comm is not None and ctx.size > 1) else None
    in_local = ctx.split(in_f, "input features")
    return Linear(in_local, out_f, shard_fn=Split(ctx, 1, (in_f,)), comm=reduce, dtype=dtype, fp8_block=fp8_block)
