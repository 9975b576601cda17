"""Number formats of the official checkpoint and the reference's quantisation simulations (SPEC §7).

* E8M0: unsigned 8-bit power-of-two exponent, value 2^(e-127); code 255 is NaN.
* FP8 e4m3fn weights with one E8M0 scale per 128x128 tile.
* MXFP4 (OCP): e2m1 codes, two per byte along K (element 2j = low nibble), one E8M0 scale per 32 elements.
* Activation simulation: per-block quantise/dequantise with power-of-two scales (FP8 e4m3, or FP4 e2m1).

Everything is vectorised torch and exportable (no Python loops over elements, no data-dependent shapes).
Packed tensors are carried as uint8 (a view of the stored bytes), which every back end understands.
"""

from __future__ import annotations

import torch

from .config import FP4_BLOCK, FP8_BLOCK

FP8_MAX = 448.0
FP4_MAX = 6.0
E8M0_BIAS = 127
E8M0_NAN = 255

# e2m1 code -> value (SPEC §7.3): codes 0..7 positive, 8..15 the same magnitudes negated (8 is -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def up(x: torch.Tensor) -> torch.Tensor:
    """Promote to the accumulation dtype: fp32, or fp64 when the model runs in fp64 (exactness tests)."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def e2m1_lut(device=None) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


# ---- E8M0 --------------------------------------------------------------------------------------------
def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> float32 2^(e-127); 255 -> NaN. Exact for every code (2^-127 is an fp32 subnormal)."""
    e = codes.to(torch.int32)
    v = torch.exp2((e - E8M0_BIAS).to(torch.float32))
    return torch.where(e == E8M0_NAN, torch.full_like(v, float("nan")), v)


def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """Positive power-of-two float scales -> uint8 E8M0 codes. Raises if a scale is not an exact power of two."""
    s = scale.to(torch.float32)
    if not torch.all(torch.isfinite(s) & (s > 0)):
        raise ValueError("e8m0_encode: scales must be finite and > 0")
    m, e = torch.frexp(s)
    if not torch.all(m == 0.5):
        raise ValueError("e8m0_encode: scales must be exact powers of two")
    code = e.to(torch.int32) - 1 + E8M0_BIAS
    if not torch.all((code >= 0) & (code <= 254)):
        raise ValueError("e8m0_encode: scale outside 2^-127 .. 2^127")
    return code.to(torch.uint8)


def ceil_pow2(v: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(v)) for positive normal fp32 v, exact (the reference computes it from the IEEE bits).

    log2 may round an argument just above a power of two down onto it; the two corrections make the result
    exact using only comparisons with exact powers of two.
    """
    p = torch.exp2(torch.ceil(torch.log2(v)))
    p = torch.where(p < v, p * 2, p)
    return torch.where(p * 0.5 >= v, p * 0.5, p)


# ---- rounding onto the low-precision grids ---------------------------------------------------------------
def fp8_e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already within +-448) to the nearest e4m3fn value, ties to even."""
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already within +-6) to the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even mantissa."""
    a = x.abs()
    step = torch.where(a < 2.0, torch.full_like(a, 0.5), torch.where(a < 4.0, torch.ones_like(a), torch.full_like(a, 2.0)))
    return torch.sign(x) * torch.round(a / step) * step


# ---- activation / KV / indexer simulations (reference QAT, SPEC §7.4) --------------------------------------
def _blockwise(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the quantisation block {block}")
    return up(x).unflatten(-1, (x.shape[-1] // block, block))


def fp8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (e4m3 grid values [..., n/block, block], power-of-two scales [..., n/block, 1]), both in the
    accumulation dtype: the reference act_quant before the multiply. value * scale is exact (no rounding)."""
    xb = _blockwise(x, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = ceil_pow2(amax * (1.0 / FP8_MAX))
    return fp8_e4m3_round((xb / s).clamp(-FP8_MAX, FP8_MAX)), s


def fp4_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (e2m1 grid values [..., n/block, block], power-of-two scales [..., n/block, 1]), as fp8_blocks
    with the reference fp4_act_quant's scale rule."""
    xb = _blockwise(x, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
    s = ceil_pow2(amax * (1.0 / FP4_MAX))
    return e2m1_round((xb / s).clamp(-FP4_MAX, FP4_MAX)), s


def fp8_act_qdq(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Quantise to e4m3 per `block` channels with power-of-two scales and dequantise (reference act_quant)."""
    v, s = fp8_blocks(x, block)
    return (v * s).flatten(-2).to(x.dtype)


def fp4_act_qdq(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Quantise to e2m1 per `block` channels with power-of-two scales and dequantise (reference fp4_act_quant)."""
    v, s = fp4_blocks(x, block)
    return (v * s).flatten(-2).to(x.dtype)


def hadamard_matrix(n: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised Sylvester Walsh-Hadamard matrix (natural order), H @ H = I; n a power of two."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * (n**-0.5)


# ---- weight dequantisation -----------------------------------------------------------------------------
def fp8_block_dequant(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 e4m3 weight [O, I] (uint8 bytes or float8_e4m3fn) with E8M0 tile scales [ceil(O/b), ceil(I/b)] -> fp32."""
    if w.dtype == torch.uint8:
        w = w.view(torch.float8_e4m3fn)
    if scale.dtype == torch.float8_e8m0fnu:
        scale = scale.view(torch.uint8)
    o, i = w.shape
    s = e8m0_decode(scale)
    if o % block == 0 and i % block == 0:  # whole tiles: broadcast the scales instead of materialising them
        return (w.to(torch.float32).view(o // block, block, i // block, block) * s[:, None, :, None]).view(o, i)
    s = s.repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
    return w.to(torch.float32) * s


def mxfp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> e2m1 codes uint8 [..., K]; element 2j is the low nibble, 2j+1 the high nibble."""
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def mxfp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes uint8 [..., K] (values 0..15) -> packed uint8 [..., K/2] (element 2j in the low nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError("mxfp4_pack: K must be even")
    c = codes.to(torch.uint8).unflatten(-1, (codes.shape[-1] // 2, 2))
    return c[..., 0] | (c[..., 1] << 4)


def mxfp4_dequant(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """MXFP4 weight: packed uint8 [O, K/2] with E8M0 scales [O, K/32] -> fp32 [O, K]."""
    if scale.dtype == torch.float8_e8m0fnu:
        scale = scale.view(torch.uint8)
    codes = mxfp4_unpack(packed)
    vals = e2m1_lut(packed.device)[codes.long()]
    return vals * e8m0_decode(scale).repeat_interleave(block, -1)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Values already on the e2m1 grid -> codes 0..15 (negative zero encodes as 0)."""
    mags = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=v.device)
    idx = (v.abs().unsqueeze(-1) == mags).to(torch.uint8).argmax(-1).to(torch.uint8)
    if not torch.all(mags[idx.long()] == v.abs()):
        raise ValueError("e2m1_encode: value not on the e2m1 grid")
    return torch.where((v < 0) & (idx > 0), idx + 8, idx).to(torch.uint8)


def _e2m1_bounds(device=None) -> torch.Tensor:
    """Decision points between neighbouring e2m1 magnitudes for bucketize(right=False), i.e. code = #{b < |x|}.

    Midpoints 0.25, 1.25, 2.5, 5 round down to the even code (|x| must exceed them); 0.75, 1.75, 3.5 round up
    to the even code, so they are moved one fp32 ulp down and |x| equal to them already counts.
    """
    mid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32, device=device)
    down = torch.nextafter(mid, torch.zeros_like(mid))
    return torch.where(torch.tensor([False, True, False, True, False, True, False], device=device), down, mid)


def e2m1_quantize(x: torch.Tensor) -> torch.Tensor:
    """fp32 values -> e2m1 codes 0..15: round to nearest, ties to even mantissa, saturate at +-6, -0 -> 0.

    The same rounding as ``e2m1_encode(e2m1_round(x.clamp(-6, 6)))`` in one bucketize (about 10x faster).
    """
    x = x.to(torch.float32)
    mag = torch.bucketize(x.abs(), _e2m1_bounds(x.device)).to(torch.uint8)
    return torch.where((x < 0) & (mag > 0), mag + 8, mag)


def _amax(t: torch.Tensor, dims) -> torch.Tensor:
    """max |t| over dims without materialising |t| in a strided layout (max and -min are contiguous reductions)."""
    return torch.maximum(t.amax(dim=dims), -t.amin(dim=dims))


def fp8_block_quantize(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weight [O, I] -> (float8_e4m3fn [O, I], uint8 E8M0 scales [ceil(O/b), ceil(I/b)]), pow-2 scales.

    Scale per tile: 2^ceil(log2(amax / 448)) with amax clamped to >= 1e-4, as the reference's weight quantiser.
    """
    o, i = w.shape
    po, pi = -o % block, -i % block
    wp = w.float()
    if po or pi:
        wp = torch.nn.functional.pad(wp, (0, pi, 0, po))
    tiles = wp.view((o + po) // block, block, (i + pi) // block, block)  # [O/b, b, I/b, b], same memory as wp
    s = ceil_pow2(_amax(tiles, (1, 3)).clamp_min(1e-4) * (1.0 / FP8_MAX))  # [O/b, I/b]
    q = (tiles * (1.0 / s)[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # exact: s is 2^k
    q = q.view(o + po, i + pi)
    if po or pi:
        q = q[:o, :i].contiguous()
    return q, e8m0_encode(s)


def mxfp4_quantize(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weight [O, K] -> (packed uint8 [O, K/2], uint8 E8M0 scales [O, K/32]); round to nearest, ties to even.

    Scale per 32 elements: 2^ceil(log2(amax / 6)) with amax clamped to >= 6 * 2^-126.
    """
    wb = _blockwise(w, block)
    s = ceil_pow2(_amax(wb, -1).clamp_min(FP4_MAX * 2.0**-126) * (1.0 / FP4_MAX))  # [O, K/32]
    codes = e2m1_quantize(wb * (1.0 / s).unsqueeze(-1)).flatten(-2)
    return mxfp4_pack(codes), e8m0_encode(s)
