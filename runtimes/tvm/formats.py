"""Number formats as TIR expressions, exact: the packed weight codes (E8M0, FP8 e4m3fn, e2m1) decoded with bit
arithmetic, and rounding onto the FP8 grid (models/quant.py is the reference of every function here).

* E8M0 code c -> 2^(c-127) (c = 0 is the fp32 subnormal 2^-127, c = 255 NaN);
* FP8 e4m3fn byte -> sign * (8+m) * 2^(e-10), or m * 2^-9 when e = 0, NaN for S.1111.111;
* e2m1 nibble -> sign * {0, .5, 1, 1.5, 2, 3, 4, 6}[code & 7];
* fp8_round_expr / ceil_pow2 in fp32 or fp64, from the IEEE bits (one rounding step, as torch's cast).
"""

from __future__ import annotations

import struct

from tvm import tirx

F32 = "float32"
FP8_BLOCK = 128  # models/config.FP8_BLOCK (the weight tile), repeated to keep runtimes free of torch imports
FP4_BLOCK = 32  # models/config.FP4_BLOCK
FP8_MAX = 448.0


def dt(v: tirx.PrimExpr) -> str:
    """dtype of a TIR expression (TVM 0.27: a Var's type lives in ``.ty``)."""
    try:
        return str(v.dtype)
    except AttributeError:
        return str(v.ty)


def up(v: tirx.PrimExpr, acc: str = F32) -> tirx.PrimExpr:
    return v if dt(v) == acc else v.astype(acc)


def f32_bits(v: int | tirx.PrimExpr) -> tirx.PrimExpr:
    """The fp32 with IEEE bits `v`. A constant becomes a float literal (TVM's CUDA codegen prints it exactly, as a
    hex float or CUDART_NAN_F / CUDART_INF_F): a reinterpret of a constant is printed as
    ``*(float *)(&(2143289344))``, which nvcc rejects (the address of a literal)."""
    if isinstance(v, int):
        return tirx.const(struct.unpack("<f", struct.pack("<I", v & 0xFFFFFFFF))[0], F32)
    return tirx.reinterpret(F32, v)


def e8m0(code: tirx.PrimExpr) -> tirx.PrimExpr:
    """uint8 E8M0 code -> fp32 2^(c-127), exactly (quant.e8m0_decode)."""
    c = code.astype("int32")
    return tirx.Select(c == 0, f32_bits(0x00400000),
                       tirx.Select(c == 255, f32_bits(0x7FC00000), f32_bits(c * (1 << 23))))


def fp8_e4m3(byte: tirx.PrimExpr) -> tirx.PrimExpr:
    """uint8 e4m3fn byte -> fp32, exactly."""
    b = byte.astype("int32")
    e = tirx.bitwise_and(tirx.shift_right(b, 3), 15)
    m = tirx.bitwise_and(b, 7)
    normal = f32_bits((e + 120) * (1 << 23) + m * (1 << 20))  # (1 + m/8) * 2^(e-7)
    mag = tirx.Select(e == 0, m.astype(F32) * tirx.const(2.0**-9, F32), normal)
    mag = tirx.Select(tirx.all(e == 15, m == 7), f32_bits(0x7FC00000), mag)
    return tirx.Select(b >= 128, -mag, mag)


def e2m1(code: tirx.PrimExpr) -> tirx.PrimExpr:
    """e2m1 code (0..15, int32) -> fp32: 0, .5, 1, 1.5, 2, 3, 4, 6 and their negations."""
    e = tirx.bitwise_and(tirx.shift_right(code, 1), 3)
    half = tirx.bitwise_and(code, 1).astype(F32) * tirx.const(0.5, F32)
    scale = tirx.shift_left(tirx.const(1, "int32"), tirx.max(e - 1, 0)).astype(F32)
    mag = tirx.Select(e == 0, half, (tirx.const(1.0, F32) + half) * scale)
    return tirx.Select(code >= 8, -mag, mag)


def nibble(packed: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
    """e2m1 code of element k of a packed row (element 2j = low nibble of byte j)."""
    b = packed.astype("int32")
    return tirx.Select(tirx.floormod(k, 2) == 0, tirx.bitwise_and(b, 15), tirx.shift_right(b, 4))


FLOAT_BITS = {"float32": ("int32", 23, 127, 255), "float64": ("int64", 52, 1023, 2047)}  # int, mantissa, bias, exp


def pow2(e: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """2^e as a `dtype` float built from its bits (e in the normal range)."""
    itype, mant, bias, _ = FLOAT_BITS[dtype]
    return tirx.reinterpret(dtype, tirx.shift_left((e + bias).astype(itype), tirx.const(mant, itype)))


def ceil_pow2(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^ceil(log2 v) for a positive normal float, exactly, from its IEEE bits (quant.ceil_pow2)."""
    dtype = dt(v)
    itype, mant, _, _ = FLOAT_BITS[dtype]
    bits = tirx.reinterpret(itype, v)
    frac = tirx.bitwise_and(bits, tirx.const((1 << mant) - 1, itype))
    return tirx.Select(frac == 0, v, tirx.reinterpret(dtype, bits - frac + tirx.const(1 << mant, itype)))


def fp8_round_expr(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """v rounded to the nearest e4m3fn value in one step, ties to even, saturating at +-448 (ONNX Cast,
    saturate=1). The quantum of |v| is 2^(max(E, -6) - 3), E its binary exponent read from the IEEE bits."""
    dtype = dt(v)
    itype, mant, bias, emask = FLOAT_BITS[dtype]
    a = tirx.abs(v)
    e = tirx.bitwise_and(tirx.shift_right(tirx.reinterpret(itype, a), tirx.const(mant, itype)),
                         tirx.const(emask, itype)) - tirx.const(bias, itype)
    q = pow2(tirx.max(e, tirx.const(-6, itype)) - tirx.const(3, itype), dtype)
    r = tirx.min(tirx.nearbyint(a / q) * q, tirx.const(FP8_MAX, dtype))
    return tirx.Select(tirx.isnan(v), v, tirx.Select(v < tirx.const(0, dtype), -r, r))
