"""Block-FP8 compute: weights stored float8_e4m3fn in [bn, bk] blocks with fp32 block scales (the checkpoints'
`weight_scale_inv`, which multiplies), activations quantised on the fly per token per bk channels (dynamic
scheme: scale = absmax / 448).

Numerics, which every path (CPU reference, Triton kernels, torch's scaled_mm) implements:

    xs[m, g]  = max(absmax(x[m, g*bk:(g+1)*bk]), EPS) / 448              (fp32)
    xq[m, c]  = e4m3(x[m, c] / xs[m, c // bk])                            (round to nearest even, saturating)
    y[m, n]   = sum_c xq[m, c] xs[m, c // bk] * wq[n, c] ws[n // bn, c // bk]   (fp32), rounded to x's dtype once

The reference dequantises both operands to fp32 and multiplies in fp32; kernels sum per K block and apply the two
scales per block, which is the same sum in another order.

Routed experts are packed like the bf16 ones: w13 [E, 2I, H] (gate rows, then up rows) with scales
[E, 2 ceil(I/bn), ceil(H/bk)] (the gate's block rows, then the up's: the two stay separately blocked even when I is
not a multiple of bn), w2 [E, H, I] with scales [E, ceil(H/bn), ceil(I/bk)]. The intermediate SiLU(gate) * up is
rounded to the model dtype, then quantised per row like any activation.

On CUDA the Triton kernels of `fp8_triton` run (or torch's block-scaled `scaled_mm` where `fp8_triton` finds it
faster and supported); elsewhere the references below.
Legend: M rows (tokens), K input features, N output features, G = ceil(K / bk) activation groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextserve.loader.fp8 import FP8_DTYPE, FP8_MAX, dequantize_block_fp8

try:  # Triton fast path; absent on CPU-only installs.
    from nextserve.ops import fp8_triton
except ImportError as e:
    fp8_triton, IMPORT_ERROR = None, e
else:
    IMPORT_ERROR = None

# Smallest activation scale: an all-zero group quantises to zeros instead of dividing by zero.
EPS = 1e-10


def quantize_act(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] floating -> (xq [M, K] float8_e4m3fn, xs [M, G] fp32), per token per `group` channels."""
    M, K = x.shape
    G = -(-K // group)
    xf = F.pad(x.to(torch.float32), (0, G * group - K)).view(M, G, group)
    xs = xf.abs().amax(dim=-1).clamp(min=EPS) / FP8_MAX  # [M, G]
    xq = (xf / xs[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq.view(M, G * group)[:, :K].contiguous(), xs


def dequantize_act(xq: torch.Tensor, xs: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of quantize_act, in fp32."""
    return xq.to(torch.float32) * xs.repeat_interleave(group, dim=1)[:, : xq.shape[1]]


def _act_ref(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as the FP8 kernels see it: quantised and dequantised, fp32 [M, K]."""
    return dequantize_act(*quantize_act(x, group), group)


def linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """y = x W^T with W [N, K] block-FP8 (scales [ceil(N/bn), ceil(K/bk)]); x [..., K] -> [..., N] in x's dtype."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.is_cuda and fp8_triton is not None and fp8_triton.supports(block):
        y = fp8_triton.linear(x2, w, w_scale, block)
    else:
        y = linear_reference(x2, w, w_scale, block)
    return y.view(*lead, w.shape[0])


def linear_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Torch reference of `linear` on 2-D x (defines the numerics)."""
    wd = dequantize_block_fp8(w, w_scale, block, torch.float32)
    return (_act_ref(x, block[1]) @ wd.T).to(x.dtype)


def gate_up_blocks(I: int, bn: int) -> int:
    """Block rows of one expert's gate (and of its up) projection in the packed w13 scales."""
    return -(-I // bn)


def dequantize_w13(w13: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """One expert's packed [2I, H] FP8 gate|up weight and its [2 ceil(I/bn), ceil(H/bk)] scales -> fp32 [2I, H]."""
    I, nb = w13.shape[0] // 2, gate_up_blocks(w13.shape[0] // 2, block[0])
    gate = dequantize_block_fp8(w13[:I], scale[:nb], block, torch.float32)
    up = dequantize_block_fp8(w13[I:], scale[nb:], block, torch.float32)
    return torch.cat([gate, up])


def experts_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    block: tuple[int, int],
) -> torch.Tensor:
    """sum_k weights[n, k] * expert_{ids[n, k]}(x[n]) with block-FP8 experts; the bf16 reference's order of
    roundings (GEMM outputs in x's dtype, weight x output in fp32 then cast, accumulation in x's dtype)."""
    from nextserve.ops.moe import expert_loop  # moe imports this module

    inter = w2.shape[-1]
    xa = _act_ref(x, block[1])  # each token is quantised once for all its experts

    def mlp(e: int, tok: torch.Tensor) -> torch.Tensor:
        h = (xa[tok] @ dequantize_w13(w13[e], w13_scale[e], block).T).to(x.dtype)  # [c, 2I]
        h = F.silu(h[:, :inter]) * h[:, inter:]
        wd = dequantize_block_fp8(w2[e], w2_scale[e], block, torch.float32)
        return (_act_ref(h, block[1]) @ wd.T).to(x.dtype)  # [c, H]

    return expert_loop(x, w13.shape[0], weights, ids, mlp)
