"""Block FP8 quantise/dequantise against an index-gather reference and e4m3's rounding bounds."""

import pytest
import torch

from nextserve.loader.fp8 import FP8_MAX, dequantize_block_fp8, quantize_block_fp8, scale_shape

# e4m3: 3 mantissa bits, so round-to-nearest is within 2^-4 relative for normals; below the smallest normal
# (2^-6) the spacing is the smallest subnormal 2^-9, so the absolute error is at most 2^-10 (times the scale).
HALF_ULP_REL = 2.0**-4
HALF_SUBNORMAL = 2.0**-10


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Reference: S[i // bs0, j // bs1] for every (i, j), by explicit index gather."""
    rows = torch.arange(shape[0])[:, None] // block[0]
    cols = torch.arange(shape[1])[None, :] // block[1]
    return scale[rows, cols]


def _random_fp8(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Uniformly random finite e4m3fn values (every bit pattern except the two NaNs)."""
    bits = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are NaN in e4m3fn
    return bits.view(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "shape,block",
    [
        ((5, 7), (2, 3)),
        ((130, 257), (128, 128)),
        ((128, 256), (128, 128)),
        ((1, 1), (128, 128)),
        ((64, 96), (64, 32)),
    ],
)
def test_dequantize_matches_gather_reference(shape, block):
    gen = torch.Generator().manual_seed(0)
    wq = _random_fp8(shape, gen)
    scale = torch.rand(scale_shape(shape, block), generator=gen) + 0.01
    out = dequantize_block_fp8(wq, scale, block, torch.float32)
    expected = wq.to(torch.float32) * _expand(scale, shape, block)
    assert out.shape == shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # bf16 output is the fp32 product rounded once.
    torch.testing.assert_close(
        dequantize_block_fp8(wq, scale, block, torch.bfloat16), expected.to(torch.bfloat16), rtol=0, atol=0
    )


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((128, 128), (128, 128)), ((7, 45), (4, 16))])
def test_round_trip_within_e4m3_rounding(shape, block):
    gen = torch.Generator().manual_seed(1)
    # Vary magnitude per row so blocks have very different scales and many values fall in the subnormal range.
    w = torch.randn(shape, generator=gen) * torch.logspace(-4, 2, shape[0])[:, None]
    wq, scale = quantize_block_fp8(w, block)
    assert wq.dtype == torch.float8_e4m3fn and wq.shape == w.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape(shape, block)

    # Each block's scale maps its largest magnitude onto 448.
    s = _expand(scale, shape, block)
    amax = torch.empty(scale.shape)
    for bi in range(scale.shape[0]):  # small reference loop, fine in a test
        for bj in range(scale.shape[1]):
            amax[bi, bj] = w[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]].abs().max()
    torch.testing.assert_close(scale, amax / FP8_MAX)

    back = dequantize_block_fp8(wq, scale, block, torch.float32)
    err = (back - w).abs()
    bound = HALF_ULP_REL * w.abs() + HALF_SUBNORMAL * s
    assert torch.all(err <= bound * (1 + 1e-5)), (err / bound).max()
    # The brief's looser statement: relative precision 2^-3 times the block scale covers the whole block.
    assert torch.all(err <= 2.0**-3 * s * FP8_MAX)


def test_exactly_representable_values_reconstruct_exactly():
    gen = torch.Generator().manual_seed(2)
    shape, block = (200, 300), (128, 128)
    q = _random_fp8(shape, gen).to(torch.float32)
    grid = scale_shape(shape, block)
    # Power-of-two scales and a 448 in every block make amax/448 exact, so w / scale recovers q exactly.
    pow2 = 2.0 ** torch.randint(-8, 8, grid, generator=gen).to(torch.float32)
    for bi in range(grid[0]):
        for bj in range(grid[1]):
            q[bi * block[0], bj * block[1]] = -FP8_MAX if (bi + bj) % 2 else FP8_MAX
    w = q * _expand(pow2, shape, block)
    wq, scale = quantize_block_fp8(w, block)
    torch.testing.assert_close(scale, pow2, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_block_fp8(wq, scale, block, torch.float32), w, rtol=0, atol=0)


def test_zero_blocks_give_finite_scales_and_zeros():
    w = torch.randn(256, 200)
    w[:128, 128:] = 0  # one whole zero block
    w[128:, :] = 0  # and a partial-width zero row of blocks
    wq, scale = quantize_block_fp8(w, (128, 128))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    back = dequantize_block_fp8(wq, scale, (128, 128), torch.float32)
    assert torch.isfinite(back).all()
    assert (back[:128, 128:] == 0).all() and (back[128:] == 0).all()
    assert (back[:128, :128] != 0).any()

    wq, scale = quantize_block_fp8(torch.zeros(3, 5))
    assert torch.isfinite(scale).all()
    assert (dequantize_block_fp8(wq, scale) == 0).all()


def test_quantize_accepts_bf16_and_default_block():
    w = torch.randn(130, 129, dtype=torch.bfloat16)
    wq, scale = quantize_block_fp8(w)
    assert tuple(scale.shape) == (2, 2)
    back = dequantize_block_fp8(wq, scale)
    assert back.dtype == torch.bfloat16
    torch.testing.assert_close(back.float(), w.float(), rtol=2**-3, atol=1e-2)


def test_invalid_inputs_raise_value_error():
    wq, scale = quantize_block_fp8(torch.randn(10, 10), (4, 4))
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        dequantize_block_fp8(wq, scale[:2], (4, 4))
    with pytest.raises(ValueError, match="block"):
        quantize_block_fp8(torch.randn(4, 4), (0, 4))
    with pytest.raises(ValueError, match="block"):
        quantize_block_fp8(torch.randn(4, 4), (True, 4))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_block_fp8(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.randn(4))
