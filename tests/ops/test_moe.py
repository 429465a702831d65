"""MoE: routing and the grouped-GEMM expert path against the reference loop."""

import pytest
import torch

from nextserve.ops.moe import experts_reference, grouped_experts, route


def case(N, E=8, K=3, H=32, I=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(device, dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    weights, ids = route(torch.randn(N, E, generator=g).to(device), K, True)
    return x, w13, w2, weights.to(dtype), ids


def test_route_renormalises_top_k():
    w, ids = route(torch.tensor([[0.0, 1.0, 2.0, -1.0]]), 2, True)
    assert ids.tolist() == [[2, 1]] and torch.allclose(w.sum(-1), torch.ones(1))


@pytest.mark.parametrize("N", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_reference(N, dtype):
    x, w13, w2, w, ids = case(N, dtype=dtype)
    ref = experts_reference(x.float(), w13.float(), w2.float(), w.float(), ids)
    out = grouped_experts(x, w13, w2, w, ids).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N", [1, 8, 64, 2048])
def test_grouped_on_cuda_bf16(N):
    x, w13, w2, w, ids = case(N, E=64, K=8, H=256, I=128, dtype=torch.bfloat16, device="cuda")
    ref = experts_reference(x.float(), w13.float(), w2.float(), w.float(), ids)
    out = grouped_experts(x, w13, w2, w, ids).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 3e-2 * max(1.0, ref.abs().max().item())
