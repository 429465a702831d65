"""Triton norm kernels against their torch references, and the references' own contract.

GPU section (pytest -m gpu): each kernel of `nextserve.ops.norm_triton` on random rows (fp32 and bf16, row lengths
128 / 256 / 2048, 1 / 7 / 300 rows, strided and multi-dim views) against the torch reference of `nextserve.ops.norm`
run on CPU copies; the public functions' dispatch; CUDA-graph capture. These tests also run on CPU under
TRITON_INTERPRET=1 (the kernels are then called directly: the public functions stay on the reference off CUDA).

CPU section (no mark, runs in CI): `add_rms_norm`'s reference path, argument checks, and CPU dispatch.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
import torch

from nextserve.ops import norm

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
EPS = 1e-6

needs_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET),
    reason="needs a CUDA GPU (or TRITON_INTERPRET=1); on a GPU a missing Triton module fails",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
kernels = norm.norm_triton


@pytest.fixture(autouse=True)
def _interpreter_rounds_like_the_gpu(monkeypatch):
    """The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even; give it the GPU's rounding so
    bf16 results can be held to the same bound on both (the kernels' own rounding steps are what is tested)."""
    if not (INTERPRET and DEVICE == "cpu" and kernels is not None):
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_fp_trunc

    def fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(BF16).view(torch.int16).numpy()
            return interp.TensorHandle(bits.view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_fp_trunc", fp_trunc)
    yield


def rows(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with per-row scales over three decades, so eps matters for the smallest ones."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.empty(*shape[:-1], 1).uniform_(-2, 1, generator=g)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def weight(D: int, dtype: torch.dtype, seed: int, center: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (center + 0.5 * torch.randn(D, generator=g)).to(dtype).to(DEVICE)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, steps: int = 1) -> None:
    """fp32: equal up to reduction order. bf16: equal, or a last-place step apart where the fp32 values straddle a
    rounding boundary (rare: a misplaced or missing rounding step flips far more elements). Chained roundings (the
    gated norm rounds three times) can carry one flip into a second step: `steps` bounds that."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    dtype = ref.dtype
    out, ref = out.cpu().double(), ref.cpu().double()
    assert torch.isfinite(out).all(), "NaN or inf in the kernel's output"
    if dtype == F32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-7)
        return
    diff = (out - ref).abs()
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    if os.environ.get("NORM_STATS"):
        print(f"flipped {float((diff > 0).double().mean()):.4f} max steps {float((diff / ulp).max()):.1f}")
    assert (diff <= steps * ulp).all(), (
        f"off by more than {steps} bf16 step(s): max {float((diff / ulp).max()):.1f} steps"
    )
    flipped = float((diff > 0).double().mean())
    assert flipped < 0.005, f"{flipped:.1%} of elements one bf16 step off: a rounding step is misplaced"


def cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy keeping the strides (the reference runs on the same view the kernel sees)."""
    return t.cpu() if t.is_cuda else t


# ---- GPU section: kernels against the references ----

SHAPES = [(n, d) for d in (128, 256, 2048) for n in (1, 7, 300)]


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("N,D", SHAPES)
def test_rms_norm(dtype, N, D):
    x, w = rows(N, D, dtype=dtype, seed=N + D), weight(D, dtype, seed=D)
    out = kernels.rms_norm(x, w, EPS)
    assert_matches(out, norm.rms_norm(cpu(x), cpu(w), EPS))


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("N,D", SHAPES)
def test_add_rms_norm(dtype, N, D):
    x, r = rows(N, D, dtype=dtype, seed=N + D), rows(N, D, dtype=dtype, seed=N + D + 1)
    w = weight(D, dtype, seed=D)
    y, h = kernels.add_rms_norm(x, r, w, EPS)
    ref_y, ref_h = norm.add_rms_norm(cpu(x), cpu(r), cpu(w), EPS)
    # One rounded add: the new residual stream must be bit-identical, whatever the dtype.
    assert h.dtype == dtype and torch.equal(h.cpu(), ref_h)
    assert_matches(y, ref_y)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("N,D", SHAPES)
def test_gated_rms_norm(dtype, N, D):
    hv = 2  # [T, Hv, dv] as the GDN layer passes it
    x, z = rows(N, hv, D, dtype=dtype, seed=N + D), rows(N, hv, D, dtype=dtype, seed=N + D + 1)
    w = weight(D, dtype, seed=D, center=1.0)  # plain weight around ones
    out = kernels.gated_rms_norm(x, z, w, EPS)
    assert_matches(out, norm.gated_rms_norm(cpu(x), cpu(z), cpu(w), EPS), steps=2)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rms_norm_views(dtype):
    T, heads, D = 7, 4, 256
    w = weight(D, dtype, seed=3)
    qg = rows(T, heads, 2 * D, dtype=dtype, seed=4)
    q = qg.split(D, dim=-1)[0]  # [T, heads, D], rows 2D apart: the q/k-norm view of the attention layer
    assert kernels._rows(q).data_ptr() == q.data_ptr(), "a collapsible view must not be copied"
    cases = {
        "per-head slice": q,
        "non-collapsible": qg[:, : heads - 1, :D],  # leading dims do not merge: copied first
        "transposed": rows(D, T, dtype=dtype, seed=5).t(),  # last dim not unit-stride
        "1-d": rows(D, dtype=dtype, seed=6),
    }
    for name, x in cases.items():
        out = kernels.rms_norm(x, w, EPS)
        assert out.shape == x.shape, name
        assert_matches(out, norm.rms_norm(cpu(x), cpu(w), EPS))
    r = rows(T, 2 * D, dtype=dtype, seed=7)[:, D:]  # a strided residual
    x = rows(T, D, dtype=dtype, seed=8)
    y, h = kernels.add_rms_norm(x, r, w, EPS)
    ref_y, ref_h = norm.add_rms_norm(cpu(x), cpu(r), cpu(w), EPS)
    assert torch.equal(h.cpu(), ref_h)
    assert_matches(y, ref_y)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gated_rms_norm_strided_z(dtype):
    T, hv, dv = 7, 4, 128
    xz = rows(T, hv, 2 * dv, dtype=dtype, seed=9)
    x, z = xz[..., :dv], xz[..., dv:]  # both strided views of one buffer
    w = weight(dv, dtype, seed=10, center=1.0)
    out = kernels.gated_rms_norm(x, z, w, EPS)
    assert out.is_contiguous()
    assert_matches(out, norm.gated_rms_norm(cpu(x), cpu(z), cpu(w), EPS), steps=2)


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gated_rms_norm_z_in_projection_layout(dtype):
    """The GDN's z as the model passes it: [T, Hk, r, dv] inside the [q | k | v | z] per-key-head projection rows
    (no single row stride), read in place."""
    T, hk, r, dv, dk = 9, 3, 2, 64, 32
    proj = rows(T, hk, 2 * dk + 2 * r * dv, dtype=dtype, seed=12)
    z = proj[..., 2 * dk + r * dv :].view(T, hk, r, dv)
    x = rows(T, hk * r, dv, dtype=dtype, seed=13).view(T, hk, r, dv)
    w = weight(dv, dtype, seed=14, center=1.0)
    out = kernels.gated_rms_norm(x, z, w, EPS)
    assert out.shape == x.shape
    assert_matches(out, norm.gated_rms_norm(cpu(x), cpu(z), cpu(w), EPS), steps=2)


@pytest.mark.gpu
@needs_kernels
def test_gated_rms_norm_mixed_weight_dtype():
    """An fp32 weight on bf16 activations: torch promotes w * n to fp32, so the kernel must not round it."""
    x, z = rows(7, 2, 128, dtype=BF16, seed=11), rows(7, 2, 128, dtype=BF16, seed=12)
    w = weight(128, F32, seed=13, center=1.0)
    assert_matches(kernels.gated_rms_norm(x, z, w, EPS), norm.gated_rms_norm(cpu(x), cpu(z), cpu(w), EPS), steps=2)


@pytest.mark.gpu
@needs_kernels
def test_empty_rows_and_bad_weight():
    w = weight(128, F32, seed=14)
    assert kernels.rms_norm(rows(0, 128, dtype=F32, seed=15), w, EPS).shape == (0, 128)
    with pytest.raises(ValueError, match="norm weight"):
        kernels.rms_norm(rows(3, 256, dtype=F32, seed=16), w, EPS)


@pytest.mark.gpu
@needs_cuda
def test_public_functions_dispatch_to_triton():
    assert kernels is not None, "Triton norm path failed to import on a CUDA machine"
    x, r, z = (rows(5, 2048, dtype=BF16, seed=s) for s in (17, 18, 19))
    w = weight(2048, BF16, seed=20)
    calls = {}
    for name in ("rms_norm", "add_rms_norm", "gated_rms_norm"):
        calls[name] = mock.patch.object(kernels, name, wraps=getattr(kernels, name))
    with calls["rms_norm"] as a, calls["add_rms_norm"] as b, calls["gated_rms_norm"] as c:
        norm.rms_norm(x, w, EPS)
        norm.add_rms_norm(x, r, w, EPS)
        norm.gated_rms_norm(x, z, w, EPS)
    assert a.call_count == b.call_count == c.call_count == 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture():
    """Capture all three with static inputs, refill the inputs, replay: outputs follow the new inputs."""
    N, D = 9, 2048
    x, r, z = (rows(N, D, dtype=BF16, seed=s) for s in (21, 22, 23))
    w = weight(D, BF16, seed=24)

    def step():
        return norm.rms_norm(x, w, EPS), *norm.add_rms_norm(x, r, w, EPS), norm.gated_rms_norm(x, z, w, EPS)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t, s in ((x, 25), (r, 26), (z, 27)):
        t.copy_(rows(N, D, dtype=BF16, seed=s))
    graph.replay()
    for out, want in zip(outs, step(), strict=True):
        assert torch.equal(out, want)


# ---- CPU section (no GPU mark): the torch path of add_rms_norm and the argument checks ----


def test_add_rms_norm_reference_bf16():
    g = torch.Generator().manual_seed(30)
    x, r = (torch.randn(5, 64, generator=g).to(BF16) for _ in range(2))
    w = (0.5 * torch.randn(64, generator=g)).to(BF16)
    y, h = norm.add_rms_norm(x, r, w, EPS)
    assert h.dtype == BF16 and torch.equal(h, (r.float() + x.float()).to(BF16)), "the sum is rounded once"
    # Independent formula in float64 over the rounded sum: the result is its bf16 rounding, up to one step.
    h64 = h.double()
    want = h64 / (h64.pow(2).mean(-1, keepdim=True) + EPS).sqrt() * (1 + w.double())
    assert y.dtype == BF16
    torch.testing.assert_close(y.double(), want, rtol=2**-7, atol=1e-6)
    assert torch.equal(y, norm.rms_norm(h, w, EPS)), "must be exactly the norm of the returned sum"


def test_add_rms_norm_reference_fp32_leading_dims():
    g = torch.Generator().manual_seed(31)
    x, r = torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    w = torch.zeros(32)  # zero offset: gain exactly 1
    y, h = norm.add_rms_norm(x, r, w, EPS)
    assert y.shape == h.shape == (2, 3, 32)
    want = (r + x) / ((r + x).pow(2).mean(-1, keepdim=True) + EPS).sqrt()
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_norms_reject_mismatched_inputs():
    x, w = torch.randn(4, 32), torch.zeros(32)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        norm.add_rms_norm(x, torch.randn(4, 16), w, EPS)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        norm.add_rms_norm(x, torch.randn(4, 32).to(BF16), w, EPS)
    with pytest.raises(ValueError, match="one shape and device"):
        norm.gated_rms_norm(x, torch.randn(4, 16), torch.ones(32), EPS)


def test_cpu_tensors_stay_on_the_reference():
    fake = mock.Mock()
    fake.supports.return_value = True
    x, w = torch.randn(3, 32), torch.zeros(32)
    with mock.patch.object(norm, "norm_triton", fake):
        norm.rms_norm(x, w, EPS)
        norm.add_rms_norm(x, x, w, EPS)
        norm.gated_rms_norm(x, x, torch.ones(32), EPS)
    assert not fake.rms_norm.called and not fake.add_rms_norm.called and not fake.gated_rms_norm.called
