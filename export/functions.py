"""ONNX function bodies of the dsv4 ops: standard ops only, so any runtime can run a dsv4 node by inlining.

Each body is the ONNX face of one registry row (export/custom_ops.py) and computes what the eager reference
in models/kernels.py computes, in fp32, casting the result back like the reference. Written once, at
BODY_OPSET; ``custom_ops.attach_functions`` stamps them with the model's opset (every op used here has kept
its semantics from opset 19 through 26).

Rules that keep every back end able to import the inlined bodies (ECOSYSTEM.md V11.6):
* ``Shape(...)`` results go through ``Cast(to=INT64)`` before arithmetic;
* index ramps are ``CumSum(ConstantOfShape(n, 1)) - 1``, never ``Range`` over a dynamic dim;
* TopK has a constant k (the indexer pads with -inf and returns exactly top_k, -1 padded);
* no Expand to computed shapes: broadcasting does the work;
* attributes select with ``Where`` where both sides are valid, ``If`` where one side would fail (act_quant);
  loop counts from attributes use ``Loop``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxscript
from onnxscript import opset23 as op
from onnxscript.values import Opset

from dsv4.models.config import FP8_BLOCK
from dsv4.models.quant import E2M1_VALUES, E8M0_BIAS, FP8_MAX

DOMAIN = "dsv4"
DOMAIN_VERSION = 1
BODY_OPSET = 23
dsv4 = Opset(DOMAIN, DOMAIN_VERSION)

# Lookup tables, exact: byte -> value of an e4m3fn byte, of an E8M0 scale byte (2^(e-127), 255 = NaN),
# e2m1 nibble -> value, and a packed MXFP4 byte -> its two values (element 2j = low nibble).
FP8_E4M3_LUT = [float(v) for v in np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)]
E8M0_LUT = [float(np.ldexp(np.float32(1.0), e - E8M0_BIAS)) if e != 255 else float("nan") for e in range(256)]
E2M1_LUT = [float(v) for v in E2M1_VALUES]
E2M1_PAIRS = [E2M1_LUT[b & 15] if j == 0 else E2M1_LUT[b >> 4] for b in range(256) for j in (0, 1)]  # byte -> (lo, hi)
FP8_BLOCK_I64 = FP8_BLOCK
# TensorProto element types used as Cast targets
FLOAT, INT32, INT64, BOOL, FLOAT8E4M3FN = 1, 6, 7, 9, 17
INV_FP8_MAX = 1.0 / FP8_MAX
QDQ_AMAX_MIN = 1e-4
# fp32 literals of the bodies whose exact double value fp64 models use (custom_ops._to_double restores them)
EXACT_DOUBLES = (INV_FP8_MAX, QDQ_AMAX_MIN)


# ---- weight dequantisation -------------------------------------------------------------------------------
@onnxscript.script(dsv4, default_opset=op)
def Fp8Dequant(weight, scale):
    """uint8 e4m3 bytes [..., O, I] with E8M0 scales [..., ceil(O/128), ceil(I/128)] -> fp32 [..., O, I].

    Bytes through a 256-entry table; the tile scales are applied by broadcasting over the weight viewed as
    [..., O/128, 128, I/128, 128] (padded to whole tiles, then cut back): no per-element scale gather.
    """
    w = op.Gather(op.Constant(value_floats=FP8_E4M3_LUT), op.Cast(weight, to=INT32), axis=0)
    s = op.Gather(op.Constant(value_floats=E8M0_LUT), op.Cast(scale, to=INT32), axis=0)  # [..., Ob, Ib]
    blk = op.Constant(value_ints=[FP8_BLOCK_I64])
    rows = op.Cast(op.Shape(weight, start=-2, end=-1), to=INT64)
    cols = op.Cast(op.Shape(weight, start=-1), to=INT64)
    ob = op.Cast(op.Shape(scale, start=-2, end=-1), to=INT64)
    ib = op.Cast(op.Shape(scale, start=-1), to=INT64)
    lead = op.Cast(op.Shape(weight, end=-2), to=INT64)
    zero = op.Constant(value_ints=[0])
    wp = op.Pad(w, op.Concat(zero, zero, ob * blk - rows, ib * blk - cols, axis=0), None,
                op.Constant(value_ints=[-2, -1]))
    tiles = op.Reshape(wp, op.Concat(lead, ob, blk, ib, blk, axis=0)) * op.Unsqueeze(s, [-3, -1])
    out = op.Reshape(tiles, op.Concat(lead, ob * blk, ib * blk, axis=0))
    return op.Slice(out, op.Constant(value_ints=[0, 0]), op.Concat(rows, cols, axis=0), op.Constant(value_ints=[-2, -1]))


@onnxscript.script(dsv4, default_opset=op)
def Mxfp4Dequant(weight, scale):
    """packed e2m1 uint8 [..., O, K/2] (element 2j = low nibble) with E8M0 scales [..., O, K/32] -> fp32 [..., O, K].

    One lookup per byte gives both of its values (table [256, 2], nibbles split when the table is built): half
    the gathers of a per-nibble lookup and no bit operations in the graph (measured 1.9x faster in ORT).
    """
    pairs = op.Reshape(op.Constant(value_floats=E2M1_PAIRS), op.Constant(value_ints=[256, 2]))
    v = op.Gather(pairs, op.Cast(weight, to=INT32), axis=0)  # [..., O, K/2, 2]
    s = op.Gather(op.Constant(value_floats=E8M0_LUT), op.Cast(scale, to=INT32), axis=0)  # [..., O, K/32]
    lead = op.Cast(op.Shape(scale), to=INT64)
    v = op.Reshape(v, op.Concat(lead, op.Constant(value_ints=[-1]), axis=0))  # [..., O, K/32, 32]
    out = v * op.Unsqueeze(s, [-1])
    return op.Reshape(out, op.Concat(op.Cast(op.Shape(weight, end=-1), to=INT64), op.Constant(value_ints=[-1]), axis=0))


@onnxscript.script(dsv4, default_opset=op)
def Fp8Linear(x, weight, scale):
    """x [..., I] @ Fp8Dequant(weight, scale)^T in fp32, cast back to x's type."""
    xf = op.Cast(x, to=FLOAT)
    w = op.CastLike(dsv4.Fp8Dequant(weight, scale), xf)  # dequant is fp32; fp64 models compute in fp64
    return op.CastLike(op.MatMul(xf, op.Transpose(w, perm=[1, 0])), x)


@onnxscript.script(dsv4, default_opset=op)
def Mxfp4Linear(x, weight, scale):
    """x [..., K] @ Mxfp4Dequant(weight, scale)^T in fp32, cast back to x's type."""
    xf = op.Cast(x, to=FLOAT)
    w = op.CastLike(dsv4.Mxfp4Dequant(weight, scale), xf)
    return op.CastLike(op.MatMul(xf, op.Transpose(w, perm=[1, 0])), x)


# ---- activation quantisation simulation --------------------------------------------------------------------
@onnxscript.script(dsv4, default_opset=op)
def Fp8ActQdq(x, block):
    """FP8 e4m3 quantise/dequantise per `block` channels (int64 [1], an input so that a body can pick it at run
    time) with power-of-two scales: models/quant.fp8_act_qdq."""
    xf = op.Cast(x, to=FLOAT)
    xb = op.Reshape(xf, op.Concat(op.Cast(op.Shape(x, end=-1), to=INT64), op.Constant(value_ints=[-1]), block, axis=0))
    amax = op.Max(op.ReduceMax(op.Abs(xb), op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=QDQ_AMAX_MIN))
    v = amax * op.Constant(value_float=INV_FP8_MAX)
    # 2^ceil(log2 v), made exact with two comparisons against exact powers of two (models/quant.ceil_pow2)
    two = op.Constant(value_float=2.0)
    half = op.Constant(value_float=0.5)
    p = op.Pow(two, op.Ceil(op.Div(op.Log(v), op.Log(two))))
    p = op.Where(op.Less(p, v), p * two, p)
    p = op.Where(op.GreaterOrEqual(p * half, v), p * half, p)
    q = op.Clip(xb / p, op.Constant(value_float=-FP8_MAX), op.Constant(value_float=FP8_MAX))
    q = op.Cast(op.Cast(q, to=FLOAT8E4M3FN), to=FLOAT)  # round to nearest even, as torch's .to(float8_e4m3fn)
    return op.CastLike(op.Reshape(q * p, op.Shape(x)), x)


# ---- sparse attention with sink -----------------------------------------------------------------------------
@onnxscript.script(dsv4, default_opset=op)
def SparseAttn(q, kv, sink, idx, scale):
    """q [B,T,H,D], kv [B,N,D] (K = V), sink [H], idx [B,T,K] int64 (-1 empty), scale: a scalar tensor of the
    sink's type (not an attribute: ONNX float attributes are fp32, fp64 models need the exact double)
    -> [B,T,H,D]; softmax over the selected rows plus a sink logit."""
    zero = op.Constant(value_int=0)
    valid = op.GreaterOrEqual(idx, zero)  # [B,T,K]
    g = op.GatherND(op.Cast(kv, to=FLOAT), op.Unsqueeze(op.Max(idx, zero), [-1]), batch_dims=1)  # [B,T,K,D]
    s = op.MatMul(op.Cast(q, to=FLOAT), op.Transpose(g, perm=[0, 1, 3, 2])) * op.Cast(scale, to=FLOAT)
    s = op.Where(op.Unsqueeze(valid, [2]), s, op.Constant(value_float=float("-inf")))  # [B,T,H,K]
    sk = op.Reshape(op.Cast(sink, to=FLOAT), op.Constant(value_ints=[1, 1, -1, 1]))
    mx = op.Max(op.ReduceMax(s, op.Constant(value_ints=[-1]), keepdims=1), sk)
    e = op.Exp(s - mx)
    den = op.ReduceSum(e, op.Constant(value_ints=[-1]), keepdims=1) + op.Exp(sk - mx)
    return op.CastLike(op.MatMul(e / den, g), q)


# ---- lightning indexer: scores + fixed-width top-k -----------------------------------------------------------
@onnxscript.script(dsv4, default_opset=op)
def IndexerTopK(q, k, w, n_visible, top_k: int):
    """q [B,T,H,d], k [B,N,d], w [B,T,H], n_visible [B,T] -> [B,T,top_k] int64, best first, ties to the lower
    index, -1 where fewer than top_k entries are visible."""
    kt = op.Unsqueeze(op.Transpose(op.Cast(k, to=FLOAT), perm=[0, 2, 1]), [1])  # [B,1,d,N]
    s = op.Relu(op.MatMul(op.Cast(q, to=FLOAT), kt))  # [B,T,H,N]
    s = op.ReduceSum(s * op.Unsqueeze(op.Cast(w, to=FLOAT), [-1]), op.Constant(value_ints=[2]), keepdims=0)
    n = op.Cast(op.Shape(k, start=1, end=2), to=INT64)
    j = op.CumSum(op.ConstantOfShape(n, value=[1]), op.Constant(value_int=0)) - op.Constant(value_int=1)
    ninf = op.Constant(value_float=float("-inf"))
    s = op.Where(op.Less(j, op.Unsqueeze(n_visible, [-1])), s, ninf)  # [B,T,N]
    kk = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    pad = op.ConstantOfShape(op.Concat(op.Cast(op.Shape(s, end=2), to=INT64), kk, axis=0),
                             value=[float("-inf")])
    vals, order = op.TopK(op.Concat(s, pad, axis=-1), kk, axis=-1, largest=1, sorted=1)
    return op.Where(op.IsInf(vals, detect_positive=0), op.Constant(value_int=-1), order)


# ---- KV compressor: gated pooling of m-token blocks ------------------------------------------------------------
@onnxscript.script(dsv4, default_opset=op)
def Compress(kv, score, prev_kv, prev_score, overlap: int):
    """kv, score [B,nb,m,C]; prev_* [B,m,C] (the block before block 0) -> [B,nb,d] fp32.

    overlap=0: d = C, softmax over the m rows of each block. overlap=1: d = C/2, softmax over 2m rows: the lower
    channel half of the previous block and the upper half of this one. Written once for both: the previous
    block's rows are always gathered and get score -inf when overlap=0.
    """
    kvf = op.Cast(kv, to=FLOAT)
    sf = op.Cast(score, to=FLOAT)
    ov = op.Constant(value_int=overlap)
    c = op.Cast(op.Shape(kv, start=3), to=INT64)
    d = op.Div(c, op.Constant(value_int=1) + ov)
    zero = op.Constant(value_ints=[0])
    ax1 = op.Constant(value_ints=[1])
    ax3 = op.Constant(value_ints=[3])
    m1 = op.Constant(value_ints=[-1])
    prev_v = op.Concat(op.Unsqueeze(op.Cast(prev_kv, to=FLOAT), [1]), op.Slice(kvf, zero, m1, ax1), axis=1)
    prev_s = op.Concat(op.Unsqueeze(op.Cast(prev_score, to=FLOAT), [1]), op.Slice(sf, zero, m1, ax1), axis=1)
    low_v = op.Slice(prev_v, zero, d, ax3)
    low_s = op.Slice(prev_s, zero, d, ax3) + op.Where(op.Cast(ov, to=BOOL), op.Constant(value_float=0.0),
                                                      op.Constant(value_float=float("-inf")))
    high_v = op.Slice(kvf, c - d, c, ax3)
    high_s = op.Slice(sf, c - d, c, ax3)
    rows_v = op.Concat(low_v, high_v, axis=2)  # [B,nb,2m,d]
    rows_s = op.Concat(low_s, high_s, axis=2)
    return op.ReduceSum(rows_v * op.Softmax(rows_s, axis=2), op.Constant(value_ints=[2]), keepdims=0)


# ---- mHC split with Sinkhorn-Knopp ------------------------------------------------------------------------------
@onnxscript.script(dsv4, default_opset=op)
def HcSplitSinkhorn(mixes, scale, base, hc_mult: int, iters: int, eps: float):
    """mixes [..., (2+n)*n] -> pre [..., n], post [..., n], comb [..., n, n] (rows = source stream)."""
    mf = op.Cast(mixes, to=FLOAT)
    n = op.Reshape(op.Constant(value_int=hc_mult), op.Constant(value_ints=[1]))
    ax = op.Constant(value_ints=[-1])
    e = op.Constant(value_float=eps)
    zero = op.Constant(value_ints=[0])
    big = op.Constant(value_ints=[2147483647])
    n2 = n + n
    pre = op.Sigmoid(op.Slice(mf, zero, n, ax) * op.Gather(scale, 0) + op.Slice(base, zero, n, zero)) + e
    post = op.Constant(value_float=2.0) * op.Sigmoid(op.Slice(mf, n, n2, ax) * op.Gather(scale, 1)
                                                      + op.Slice(base, n, n2, zero))
    z = op.Slice(mf, n2, big, ax) * op.Gather(scale, 2) + op.Slice(base, n2, big, zero)
    z = op.Reshape(z, op.Concat(op.Cast(op.Shape(mixes, end=-1), to=INT64), n, n, axis=0))  # [..., n, n]
    r = op.Constant(value_ints=[-1])
    c = op.Constant(value_ints=[-2])
    m = op.Softmax(z, axis=-1) + e
    m = m / (op.ReduceSum(m, c, keepdims=1) + e)
    steps = op.Constant(value_int=iters) - op.Constant(value_int=1)
    for _ in range(steps):
        m = m / (op.ReduceSum(m, r, keepdims=1) + e)
        m = m / (op.ReduceSum(m, c, keepdims=1) + e)
    return pre, post, m


# ---- routed experts of one MoE layer (dense over experts) -------------------------------------------------------
@onnxscript.script(dsv4, default_opset=op)
def MoEExperts(x, weights, idx, w1, w2, w3, swiglu_limit: float, act_quant: int):
    """x [N,D], weights/idx [N,K], stacked float expert weights w1/w3 [E,I,D], w2 [E,D,I] -> [N,D] fp32.

    Expert e on token n: h = silu(min(x W1^T, L)) * clamp(x W3^T, -L, L) * r[n,e]; y = sum_e h W2^T, with
    r[n,e] the routing weight of e for n (0 when not selected, so its contribution is exactly 0). Every expert
    runs on every token: simple and exact; the MoE pass (issue [4]) replaces it with a sparse kernel.
    act_quant: FP8 qdq of the inputs of W1/W3 and W2, as the reference's quantised linears.
    """
    aq = op.Cast(op.Constant(value_int=act_quant), to=BOOL)
    # The qdq needs widths that are multiples of the block, which only quant_sim guarantees: an If (not a
    # Where) runs it only when act_quant=1, and its block is Where(act_quant, 128, 1) so that the untaken
    # branch still passes static shape inference when a width is not a multiple of 128.
    blk = op.Where(aq, op.Constant(value_ints=[FP8_BLOCK_I64]), op.Constant(value_ints=[1]))
    if aq:
        xq = dsv4.Fp8ActQdq(x, blk)
    else:
        xq = op.Identity(x)
    e = op.Cast(op.Shape(w1, end=1), to=INT64)
    eid = op.CumSum(op.ConstantOfShape(e, value=[1]), op.Constant(value_int=0)) - op.Constant(value_int=1)  # [E]
    hit = op.Cast(op.Equal(op.Unsqueeze(idx, [-1]), eid), to=FLOAT)  # [N,K,E]
    r = op.ReduceSum(hit * op.Unsqueeze(op.Cast(weights, to=FLOAT), [-1]), op.Constant(value_ints=[1]), keepdims=0)
    r = op.Unsqueeze(op.Transpose(r, perm=[1, 0]), [-1])  # [E,N,1]
    xe = op.Unsqueeze(op.Cast(xq, to=FLOAT), [0])  # [1,N,D]
    # the products are rounded to x's type like the reference (no-ops in fp32 models; fp16/bf16 models round)
    g = op.Cast(op.CastLike(op.MatMul(xe, op.Transpose(op.Cast(w1, to=FLOAT), perm=[0, 2, 1])), x), to=FLOAT)
    u = op.Cast(op.CastLike(op.MatMul(xe, op.Transpose(op.Cast(w3, to=FLOAT), perm=[0, 2, 1])), x), to=FLOAT)
    lim = op.Constant(value_float=swiglu_limit)
    lim = op.Where(op.Greater(lim, op.Constant(value_float=0.0)), lim, op.Constant(value_float=float("inf")))
    g = op.Min(g, lim)  # [E,N,I]
    u = op.Min(op.Max(u, op.Neg(lim)), lim)
    h = op.CastLike(g * op.Sigmoid(g) * u * r, x)
    if aq:
        hq = dsv4.Fp8ActQdq(h, blk)
    else:
        hq = op.Identity(h)
    y = op.MatMul(op.Cast(hq, to=FLOAT), op.Transpose(op.Cast(w2, to=FLOAT), perm=[0, 2, 1]))  # [E,N,D]
    return op.ReduceSum(op.Cast(op.CastLike(y, x), to=FLOAT), op.Constant(value_ints=[0]), keepdims=0)


# ---- one whole MoE layer: routing + routed experts + the shared expert's output (made by passes/fuse_moe.py) -----
SOFTPLUS_THRESHOLD = 20.0  # torch F.softplus: x itself above the threshold


@onnxscript.script(dsv4, default_opset=op)
def MoE(x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, top_k: int, route_scale: float, swiglu_limit: float,
        hash_routing: int, act_quant: int, scoring: str):
    """x [N,D], gate_weight [E,D], stacked float experts w1/w3 [E,I,D], w2 [E,D,I], shared [N,D] (the shared expert's
    output) -> [N,D] fp32, SPEC §6 / models/model.py Gate + MoE:

    s = sqrt(softplus(x Wg^T)); idx = tid2eid[ids] (hash_routing=1) or topk(s + bias, top_k) (learned);
    w = s[idx] / sum s[idx] * route_scale; y = MoEExperts(x, w, idx, ...) + shared.
    Unused inputs hold neutral placeholders: bias is zeros [E] on hash layers; tid2eid [1,K] and ids [1] are zeros
    on learned layers. scoring: "sqrtsoftplus" (the only V4 scoring; the MoE pass refuses others).
    """
    logits = op.MatMul(op.Cast(x, to=FLOAT), op.Transpose(op.Cast(gate_weight, to=FLOAT), perm=[1, 0]))  # [N,E]
    s = op.Sqrt(op.Where(op.Greater(logits, op.Constant(value_float=SOFTPLUS_THRESHOLD)), logits,
                         op.Softplus(logits)))
    hashed = op.Cast(op.Constant(value_int=hash_routing), to=BOOL)
    if hashed:
        idx = op.Gather(tid2eid, ids, axis=0)  # [N,K]
    else:
        k = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
        vals, idx = op.TopK(op.Add(s, op.Cast(bias, to=FLOAT)), k, axis=-1, largest=1, sorted=1)
    w = op.GatherElements(s, idx, axis=1)
    w = op.Div(w, op.ReduceSum(w, op.Constant(value_ints=[-1]), keepdims=1)) * op.Constant(value_float=route_scale)
    y = dsv4.MoEExperts(x, w, idx, w1, w2, w3, swiglu_limit=swiglu_limit, act_quant=act_quant)
    return y + op.Cast(shared, to=FLOAT)


BODIES = {f.name: f for f in (Fp8Dequant, Mxfp4Dequant, Fp8Linear, Mxfp4Linear, Fp8ActQdq, SparseAttn, IndexerTopK,
                              Compress, HcSplitSinkhorn, MoEExperts, MoE)}
