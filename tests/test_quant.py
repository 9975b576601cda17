"""models/quant.py: the checkpoint's number formats, bit for bit (SPEC §7.2-§7.4).

Oracles are independent of quant.py: ml_dtypes' float4_e2m1fn / float8_e4m3fn / float8_e8m0fnu casts and
hand-decoded bit patterns.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from dsv4.models import quant


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- MXFP4 packing -----------------------------------------------------------------------------------------
def test_mxfp4_pack_unpack_every_code_pair():
    """All 16x16 (low, high) code pairs pack to byte lo | hi << 4 and unpack back, element 2j = low nibble."""
    codes = torch.tensor([[c for b in range(256) for c in (b % 16, b // 16)]], dtype=torch.uint8)  # lo0 hi0 lo1 ..
    packed = quant.mxfp4_pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 256)
    assert torch.equal(packed[0], torch.arange(256, dtype=torch.uint8))
    assert torch.equal(quant.mxfp4_unpack(packed), codes)
    assert torch.equal(quant.mxfp4_unpack(packed.view(torch.int8)), codes)  # the checkpoint stores I8


def test_e2m1_code_values_match_ml_dtypes():
    """Every 4-bit code decodes (scale 2^0) to the OCP e2m1 value; ml_dtypes float4_e2m1fn is the oracle."""
    codes = torch.arange(16, dtype=torch.uint8)
    ref = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    got = quant.mxfp4_dequant(quant.mxfp4_pack(codes.repeat(2).unsqueeze(0)), torch.full((1, 1), 127, dtype=torch.uint8))
    np.testing.assert_array_equal(got[0, :16].numpy(), ref)
    np.testing.assert_array_equal(got[0, 16:].numpy(), ref)
    assert list(quant.E2M1_VALUES) == ref.tolist()


# ---- E8M0 ----------------------------------------------------------------------------------------------------
def test_e8m0_decode_every_code():
    """Codes 0..254 are exactly 2^(c-127) (2^-127 .. 2^127, subnormal at the bottom); 255 is NaN."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    v = quant.e8m0_decode(codes)
    assert v.dtype == torch.float32
    for c in range(255):
        assert v[c].item() == math.ldexp(1.0, c - 127), c
    assert math.isnan(v[255].item())
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(v.numpy(), ref)  # NaN positions compare equal in assert_array_equal
    torch.testing.assert_close(codes.view(torch.float8_e8m0fnu).float(), v, rtol=0, atol=0, equal_nan=True)


def test_e8m0_encode_roundtrip_and_rejects():
    codes = torch.arange(255, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(quant.e8m0_encode(quant.e8m0_decode(codes)), codes)
    for bad in (0.0, 3.0, float("inf"), float("nan"), -2.0):
        with pytest.raises(ValueError):
            quant.e8m0_encode(torch.tensor([bad]))


def test_ceil_pow2_exact_at_power_boundaries():
    k = torch.arange(-120, 120, dtype=torch.float32)
    p = torch.exp2(k)
    assert torch.equal(quant.ceil_pow2(p), p)
    assert torch.equal(quant.ceil_pow2(p * (1 + 2**-23)), p * 2)  # one ulp above -> next power
    assert torch.equal(quant.ceil_pow2(p * (1 - 2**-24)), p)  # one ulp below -> this power


# ---- FP8 e4m3 blocks -------------------------------------------------------------------------------------------
def test_fp8_block_dequant_known_block():
    """A hand-decoded 256x384 weight: three 128x128 tiles per row of tiles, scale codes chosen per tile."""
    w = torch.zeros(256, 384, dtype=torch.uint8)
    # e4m3fn bytes: 0x38 = +1.0, 0xC0 = -2.0, 0x01 = 2^-9 (min subnormal), 0x7E = +448 (max), 0x35 = 0.8125
    w[0, 0], w[5, 130], w[1, 1], w[2, 300], w[200, 383], w[255, 0] = 0x38, 0xC0, 0x01, 0x7E, 0x35, 0xC0
    scale = torch.tensor([[130, 125, 127], [0, 254, 100]], dtype=torch.uint8)  # 2^3, 2^-2, 1 / 2^-127, 2^127, 2^-27
    d = quant.fp8_block_dequant(w, scale)
    expect = {(0, 0): 8.0, (5, 130): -0.5, (1, 1): 2.0**-6, (2, 300): 448.0, (200, 383): 0.8125 * 2.0**-27,
              (255, 0): -2.0 * 2.0**-127}
    for (o, i), v in expect.items():
        assert d[o, i].item() == v, (o, i)
    mask = torch.ones_like(d, dtype=torch.bool)
    for o, i in expect:
        mask[o, i] = False
    assert (d[mask] == 0).all()
    # the float8 view and the E8M0 dtype give the same, and ragged shapes use the edge tiles' scales
    assert torch.equal(quant.fp8_block_dequant(w.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu)), d)
    assert torch.equal(quant.fp8_block_dequant(w[:130, :260].contiguous(), scale), d[:130, :260])


@pytest.mark.parametrize("shape", [(256, 384), (130, 260), (1, 7)])
def test_fp8_block_quantize_bits_and_error_bound(shape):
    """Codes equal ml_dtypes' e4m3fn cast of w / s; scale is the smallest power of two with amax / s <= 448;
    |error| <= 2^-4 |w| (3 mantissa bits, round to nearest) or half the subnormal step 2^-10 s."""
    g = gen(1)
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 8, (shape[0], 1), generator=g).float())
    q, s = quant.fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.uint8 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    sf = quant.e8m0_decode(s).repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    ref = (w / sf).numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(q.view(torch.uint8).numpy(), ref)
    d = quant.fp8_block_dequant(q, s)
    err = (d - w).abs()
    assert (err <= torch.maximum(w.abs() * 2.0**-4, sf * 2.0**-10)).all()
    for bo in range(s.shape[0]):
        for bi in range(s.shape[1]):
            amax = w[bo * 128:(bo + 1) * 128, bi * 128:(bi + 1) * 128].abs().max().item()
            sv = 2.0 ** (int(s[bo, bi]) - 127)
            assert amax / sv <= 448 and (amax / sv > 224 or sv == quant.ceil_pow2(torch.tensor(1e-4 / 448)).item())


# ---- MXFP4 quantisation --------------------------------------------------------------------------------------
def test_e2m1_quantize_rounding_matches_ml_dtypes():
    """Round to nearest, ties to even mantissa, saturate at 6; every tie point and random values."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e9, 0.0, -0.0, 0.2, 0.26, 5.01])
    x = torch.cat([ties, -ties, torch.randn(100_000, generator=gen(2)) * 3])
    ref = x.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    ref = np.where(ref == 8, 0, ref)  # -0 -> code 0 (the quantiser writes +0)
    np.testing.assert_array_equal(quant.e2m1_quantize(x).numpy(), ref)
    on_grid = torch.tensor(quant.E2M1_VALUES)
    assert torch.equal(quant.e2m1_quantize(on_grid), quant.e2m1_encode(on_grid))


def test_mxfp4_quantize_bits_and_error_bound():
    """Codes equal ml_dtypes' e2m1 cast of w / s per 32 elements; |error| <= max(|w|, s) / 4."""
    g = gen(3)
    w = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-20, 10, (64, 8), generator=g).float()
                                                       ).repeat_interleave(32, 1)
    w[0, :32] = 0.0  # an all-zero block takes the clamp floor
    packed, s = quant.mxfp4_quantize(w)
    assert packed.shape == (64, 128) and s.shape == (64, 8) and packed.dtype == s.dtype == torch.uint8
    sf = quant.e8m0_decode(s).repeat_interleave(32, 1)
    ref = (w / sf).numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    ref = np.where(ref == 8, 0, ref)
    np.testing.assert_array_equal(quant.mxfp4_unpack(packed).numpy(), ref)
    d = quant.mxfp4_dequant(packed, s)
    assert ((d - w).abs() <= torch.maximum(w.abs(), sf) / 4).all()
    amax = w.view(64, 8, 32).abs().amax(-1)
    assert ((amax / quant.e8m0_decode(s) <= 6) & ((amax / quant.e8m0_decode(s) > 3) | (amax == 0))).all()
    assert torch.equal(quant.mxfp4_dequant(*quant.mxfp4_quantize(d)), d)  # idempotent on its own grid


# ---- activation simulations (SPEC §7.4) ----------------------------------------------------------------------
def test_act_qdq_on_grid_and_idempotent():
    x = torch.randn(3, 5, 256, generator=gen(4)) * 10
    for f, block, cast in ((quant.fp8_act_qdq, 128, ml_dtypes.float8_e4m3fn), (quant.fp4_act_qdq, 32,
                                                                                ml_dtypes.float4_e2m1fn)):
        y = f(x)
        assert y.shape == x.shape and torch.equal(f(y), y)
        xb, yb = x.view(-1, block), y.view(-1, block)
        s = yb.abs().amax(-1, keepdim=True)
        s = quant.ceil_pow2(xb.abs().amax(-1, keepdim=True) / (448.0 if block == 128 else 6.0))
        v = (yb / s).numpy()
        np.testing.assert_array_equal(v.astype(cast).astype(np.float32), v)  # y / s lies on the format's grid


def test_hadamard_is_orthonormal():
    for n in (1, 2, 32, 128):
        h = quant.hadamard_matrix(n, dtype=torch.float64)
        torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        quant.hadamard_matrix(12)
