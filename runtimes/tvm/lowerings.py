"""TVM lowerings of the dsv4 ops: TE compute -> one PrimFunc per op, called from Relax (the registry's TVM face).

One function per dsv4 op that has a real kernel, in registry order (export/custom_ops.py); a registry row
points at its function through its ``tvm`` import string. Every function has the converter signature
``fn(bb, inputs, attrs) -> relax.Expr`` (a ``relax.Tuple`` for several outputs): `inputs` are the Relax
values of the node's inputs, `attrs` its ONNX attributes. Rows without a function here run their ONNX body,
inlined before import (frontend.py).

Each kernel is a PrimFunc named ``dsv4_<op>`` (the CUDA kernels are ``dsv4_<op>_kernel*``), computes in fp32
like the eager reference (models/kernels.py) and casts back to the activation dtype where the reference does.
Packed weights are decoded inside the kernels with exact bit arithmetic, no lookup tables (formats.py).

Why these ops and not the others:
* Fp8Linear / Mxfp4Linear: the dequant is fused into the matmul's reduction, so no float copy of the weight is
  ever materialised (the point of keeping weights packed); Fp8Dequant / Mxfp4Dequant serve whole-weight uses.
* SparseAttn: gather + masked softmax with a sink + weighted sum in one function, no [B,T,K,D] gather tensor.
* Compress and HcSplitSinkhorn: their bodies do not import into TVM (HcSplitSinkhorn's Sinkhorn loop is an
  ONNX Loop, which TVM's importer lacks; Compress's block shift makes TVM lose the shape of the pooled rows).
* IndexerTopK, Fp8ActQdq, MoEExperts: bodies (standard ops, TopK with a constant k). The fused MoE of issue [4]
  gets its lowering here when its registry row lands (see the note at the end of this file).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, te, tirx

from .formats import F32, FP4_BLOCK, FP8_BLOCK, FP8_MAX, ceil_pow2, e2m1, e8m0, fp8_e4m3, fp8_round_expr, nibble, up


# ---- helpers ---------------------------------------------------------------------------------------------------
def shape_of(x: relax.Expr) -> list:
    """Static or symbolic dims of a Relax tensor; an unknown shape is an import bug worth a clear message."""
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise ValueError(f"dsv4 lowering: input {x} has no known shape ({ty})")
    return list(ty.shape.values)


def dtype_of(x: relax.Expr) -> str:
    return str(x.ty.dtype)


def _prod(dims) -> tirx.PrimExpr:
    out = tirx.const(1, "int64")
    for d in dims:
        out = out * d
    return out


def acc_dtype(*xs: relax.Expr) -> str:
    """fp64 when any input is fp64 (fp64 reference models), else fp32: models/quant.up."""
    return "float64" if any(dtype_of(x) == "float64" for x in xs) else F32






def _scalar_input(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr | float:
    """A scalar operand as a Python float when it is a constant, else as a [1] tensor."""
    if isinstance(x, tvm.ir.GenericConst):
        return float(x.value.numpy().reshape(-1)[0])
    return bb.normalize(relax.op.reshape(x, [1]))












OPAQUE = 8  # relax op pattern kOpaque: FuseOps leaves the kernel whole (and its schedule hints with it)


def emit_kernel(bb: relax.BlockBuilder, te_fn, *args, name: str, rows: int | None = None,
                per: str = "thread") -> relax.Expr:
    """Emit ``te_fn(*args)`` as the PrimFunc `name`, with schedule hints for backend.schedule_kernels: the first
    `rows` axes of every stage index independent rows; per="thread" gives each row one GPU thread (small
    rows), per="block" one thread block whose threads share the row's stages (long rows), per="cpu" only
    parallelises the rows on CPUs (GPUs: the spatial schedule), per="linear" too (GPUs: schedules.py's
    dsv4-linear, a split-K warp reduction for dequant-matmuls)."""
    call = bb.call_te(te_fn, *args, primfunc_name_hint=name)
    gvar = call.args[0]
    attrs = {"op_pattern": OPAQUE}
    if rows is not None:
        attrs |= {"dsv4.rows": rows, "dsv4.per": per}
    func = bb.get()[gvar].with_attrs(attrs)
    bb.update_func(gvar, func)
    for gv, other in bb.get().functions_items():  # the same kernel for another call site: call that one
        if gv.name_hint != gvar.name_hint and gv.name_hint.startswith(name) and \
                tvm_ffi.structural_equal(other, func, map_free_vars=True):
            call = relax.Call(call.op, [gv, *call.args[1:]], call.attrs, call.ty_args)
            break
    return bb.emit(call)


def _lead_flat(bb: relax.BlockBuilder, x: relax.Expr) -> tuple[relax.Expr, list]:
    """x [..., K] -> ([M, K], lead dims)."""
    dims = shape_of(x)
    return bb.normalize(relax.op.reshape(x, [_prod(dims[:-1]), dims[-1]])), dims[:-1]




# ---- SparseAttn ------------------------------------------------------------------------------------------------
def _sparse_attn_te(q, kv, sink, idx, scale, acc: str):
    b_, t_, h_, d_ = q.shape
    k_ = idx.shape[2]
    neg = tirx.min_value(acc)  # masked logits: exp(neg - max) is exactly 0, without inf arithmetic
    sc = tirx.const(scale, acc) if isinstance(scale, float) else up(scale[0], acc)

    def row(b, t, k):
        return tirx.max(idx[b, t, k], tirx.const(0, idx.dtype))

    d = te.reduce_axis((0, d_), "d")
    dot = te.compute((b_, t_, h_, k_), lambda b, t, h, k: te.sum(
        up(q[b, t, h, d], acc) * up(kv[b, row(b, t, k), d], acc), axis=d), name="dot")

    def masked(b, t, h, k):
        return tirx.Select(idx[b, t, k] >= 0, dot[b, t, h, k] * sc, neg)

    k1 = te.reduce_axis((0, k_), "k1")
    mxk = te.compute((b_, t_, h_), lambda b, t, h: te.max(masked(b, t, h, k1), axis=k1), name="mx")
    mx = te.compute((b_, t_, h_), lambda b, t, h: tirx.max(mxk[b, t, h], up(sink[h], acc)), name="mx_sink")
    k2 = te.reduce_axis((0, k_), "k2")
    den = te.compute((b_, t_, h_), lambda b, t, h: te.sum(tirx.exp(masked(b, t, h, k2) - mx[b, t, h]), axis=k2),
                     name="den")
    k3 = te.reduce_axis((0, k_), "k3")
    num = te.compute((b_, t_, h_, d_), lambda b, t, h, j: te.sum(
        tirx.exp(masked(b, t, h, k3) - mx[b, t, h]) * up(kv[b, row(b, t, k3), j], acc), axis=k3), name="num")
    return te.compute((b_, t_, h_, d_), lambda b, t, h, j: (num[b, t, h, j] / (
        den[b, t, h] + tirx.exp(up(sink[h], acc) - mx[b, t, h]))).astype(q.dtype), name="o")


def sparse_attn(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """o[b,t,h] = softmax([q.kv[idx_k] * scale for valid k] + [sink_h]) . kv[idx] (kernels.sparse_attn).
    `scale` is the fifth input (a scalar tensor) or, in older artifacts, a float attribute."""
    q, kv, sink, idx = inputs[:4]
    scale = _scalar_input(bb, inputs[4]) if len(inputs) > 4 and inputs[4] is not None else float(attrs["scale"])
    args = (q, kv, sink, idx) + (() if isinstance(scale, float) else (scale,))
    acc = acc_dtype(q, kv, sink)
    if isinstance(scale, float):
        return emit_kernel(bb, lambda q_, kv_, s_, i_: _sparse_attn_te(q_, kv_, s_, i_, scale, acc), *args,
                           name="dsv4_sparse_attn", rows=3, per="block")
    return emit_kernel(bb, _sparse_attn_te, *args, acc, name="dsv4_sparse_attn", rows=3, per="block")


# ---- Compress --------------------------------------------------------------------------------------------------
def _compress_te(kv, score, prev_kv, prev_score, overlap: bool, acc: str):
    b_, nb, m, c = kv.shape
    d_ = c // 2 if overlap else c
    rows = 2 * m if overlap else m

    def pick(cur, prev, b, i, r, ch):
        """Row r of the pooled rows of block i: with overlap, rows < m are the lower half of block i-1."""
        if not overlap:
            return up(cur[b, i, r, ch], acc)
        lo = tirx.Select(i == 0, up(prev[b, tirx.min(r, m - 1), ch], acc),
                         up(cur[b, tirx.max(i - 1, 0), tirx.min(r, m - 1), ch], acc))
        return tirx.Select(r < m, lo, up(cur[b, i, tirx.max(r - m, 0), ch + d_], acc))

    r1 = te.reduce_axis((0, rows), "r1")
    mx = te.compute((b_, nb, d_), lambda b, i, ch: te.max(pick(score, prev_score, b, i, r1, ch), axis=r1), name="mx")
    r2 = te.reduce_axis((0, rows), "r2")
    den = te.compute((b_, nb, d_), lambda b, i, ch: te.sum(
        tirx.exp(pick(score, prev_score, b, i, r2, ch) - mx[b, i, ch]), axis=r2), name="den")
    r3 = te.reduce_axis((0, rows), "r3")
    num = te.compute((b_, nb, d_), lambda b, i, ch: te.sum(
        tirx.exp(pick(score, prev_score, b, i, r3, ch) - mx[b, i, ch]) * pick(kv, prev_kv, b, i, r3, ch), axis=r3),
        name="num")
    return te.compute((b_, nb, d_), lambda b, i, ch: num[b, i, ch] / den[b, i, ch], name="entries")


def compress(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """Gated softmax pooling of m-row blocks, overlapping halves when overlap=1 (kernels.compress)."""
    kv, score, prev_kv, prev_score = inputs[:4]
    return emit_kernel(bb, _compress_te, kv, score, prev_kv, prev_score, bool(attrs.get("overlap", 0)),
                       acc_dtype(kv, score), name="dsv4_compress", rows=3, per="thread")


# ---- HcSplitSinkhorn -------------------------------------------------------------------------------------------
def _hc_te(mixes, scale, base, n: int, iters: int, eps: float):
    m_ = mixes.shape[0]
    acc = mixes.dtype
    e = tirx.const(eps, acc)

    def z(i, a, b):
        return mixes[i, 2 * n + a * n + b] * scale[2] + base[2 * n + a * n + b]

    pre = te.compute((m_, n), lambda i, j: tirx.sigmoid(mixes[i, j] * scale[0] + base[j]) + e, name="pre")
    post = te.compute((m_, n), lambda i, j: tirx.const(2.0, acc) * tirx.sigmoid(
        mixes[i, n + j] * scale[1] + base[n + j]), name="post")
    k0 = te.reduce_axis((0, n), "k0")
    zmax = te.compute((m_, n), lambda i, a: te.max(z(i, a, k0), axis=k0), name="zmax")
    k1 = te.reduce_axis((0, n), "k1")
    zsum = te.compute((m_, n), lambda i, a: te.sum(tirx.exp(z(i, a, k1) - zmax[i, a]), axis=k1), name="zsum")
    cur = te.compute((m_, n, n), lambda i, a, b: tirx.exp(z(i, a, b) - zmax[i, a]) / zsum[i, a] + e, name="soft")

    def normalise(x, axis: int, step: int):
        k = te.reduce_axis((0, n), f"k_{step}")
        if axis == -2:  # column sums (over the source-stream rows)
            s = te.compute((m_, n), lambda i, b: te.sum(x[i, k, b], axis=k), name=f"colsum{step}")
            return te.compute((m_, n, n), lambda i, a, b: x[i, a, b] / (s[i, b] + e), name=f"col{step}")
        s = te.compute((m_, n), lambda i, a: te.sum(x[i, a, k], axis=k), name=f"rowsum{step}")
        return te.compute((m_, n, n), lambda i, a, b: x[i, a, b] / (s[i, a] + e), name=f"row{step}")

    cur = normalise(cur, -2, 0)
    for it in range(1, iters):
        cur = normalise(normalise(cur, -1, it), -2, it)
    return [pre, post, cur]


def hc_split_sinkhorn(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """mHC pre/post weights and the Sinkhorn-normalised comb matrix, iterations unrolled (kernels.hc_split_sinkhorn)."""
    mixes, scale, base = inputs[:3]
    n = int(attrs["hc_mult"])
    flat, lead = _lead_flat(bb, mixes)
    out = emit_kernel(bb, _hc_te, flat, scale, base, n, int(attrs["iters"]), float(attrs["eps"]),
                      name="dsv4_hc_split_sinkhorn", rows=1, per="thread")
    parts = [bb.emit(relax.TupleGetItem(out, i)) for i in range(3)]
    shapes = [[*lead, n], [*lead, n], [*lead, n, n]]
    return relax.Tuple([bb.normalize(relax.op.reshape(p, s)) for p, s in zip(parts, shapes)])


# ---- dequant-matmul and dequant --------------------------------------------------------------------------------
def _fp8_linear_te(x, w, s, acc: str):
    m_, i_ = x.shape
    o_ = w.shape[0]
    k = te.reduce_axis((0, i_), "k")
    y = te.compute((m_, o_), lambda m, o: te.sum(up(x[m, k], acc) * up(
        fp8_e4m3(w[o, k]) * e8m0(s[o // FP8_BLOCK, k // FP8_BLOCK]), acc), axis=k), name="y")
    return _cast(y, x.dtype)


def _mxfp4_linear_te(x, w, s, acc: str):
    m_, k_ = x.shape
    o_ = w.shape[0]
    k = te.reduce_axis((0, k_), "k")
    y = te.compute((m_, o_), lambda m, o: te.sum(up(x[m, k], acc) * up(
        e2m1(nibble(w[o, k // 2], k)) * e8m0(s[o, k // FP4_BLOCK]), acc), axis=k), name="y")
    return _cast(y, x.dtype)


def _cast(y, dtype: str):
    return y if y.dtype == dtype else te.compute(y.shape, lambda *i: y[i].astype(dtype), name="y_cast")


def _linear(bb, inputs, te_fn, name: str) -> relax.Expr:
    x, w, s = inputs[:3]
    flat, lead = _lead_flat(bb, x)
    y = emit_kernel(bb, te_fn, flat, w, s, acc_dtype(x), name=name, rows=2, per="linear")
    return bb.normalize(relax.op.reshape(y, [*lead, shape_of(w)[0]]))


def fp8_linear(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """x @ dequant(FP8 weight, 128x128 E8M0 tiles)^T with the dequant inside the reduction (kernels.fp8_linear)."""
    return _linear(bb, inputs, _fp8_linear_te, "dsv4_fp8_linear")


def mxfp4_linear(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """x @ dequant(MXFP4 weight, E8M0 per 32)^T with the dequant inside the reduction (kernels.mxfp4_linear)."""
    return _linear(bb, inputs, _mxfp4_linear_te, "dsv4_mxfp4_linear")


def _fp8_dequant_te(w, s):
    def f(*ix):
        *lead, o, i = ix
        return fp8_e4m3(w[ix]) * e8m0(s[(*lead, o // FP8_BLOCK, i // FP8_BLOCK)])

    return te.compute(w.shape, f, name="w")


def _mxfp4_dequant_te(w, s):
    def f(*ix):
        *lead, o, k = ix
        return e2m1(nibble(w[(*lead, o, k // 2)], k)) * e8m0(s[(*lead, o, k // FP4_BLOCK)])

    return te.compute((*w.shape[:-1], w.shape[-1] * 2), f, name="w")


def fp8_dequant(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """FP8 e4m3 bytes + E8M0 tile scales -> fp32, leading batch dims allowed (kernels.fp8_dequant)."""
    return emit_kernel(bb, _fp8_dequant_te, inputs[0], inputs[1], name="dsv4_fp8_dequant",
                       rows=len(shape_of(inputs[0])) - 1, per="cpu")


def mxfp4_dequant(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """Packed e2m1 + E8M0 scales per 32 -> fp32, leading batch dims allowed (kernels.mxfp4_dequant)."""
    return emit_kernel(bb, _mxfp4_dequant_te, inputs[0], inputs[1], name="dsv4_mxfp4_dequant",
                       rows=len(shape_of(inputs[0])) - 1, per="cpu")


# ---- FP8 rounding (not a registry op: the graph's Cast to FLOAT8E4M3FN, see importer_fixes.Cast) ---------------










def _fp8_round_te(x):
    acc = "float64" if x.dtype == "float64" else F32
    return te.compute(x.shape, lambda *i: fp8_round_expr(up(x[i], acc)), name="fp8")


def fp8_round(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    """x rounded onto the FP8 e4m3fn grid, kept in fp32 (what models/quant.fp8_e4m3_round computes)."""
    return bb.emit_te(_fp8_round_te, x, primfunc_name_hint="dsv4_fp8_round")  # elementwise: may fuse


# ---- MoEExperts: the routed experts of one MoE layer, gathered --------------------------------------------------
def _qdq_te(x, block: int, name: str):
    """FP8 act quantise/dequantise of x [N, J] per `block` columns with power-of-two scales (quant.fp8_act_qdq)."""
    n_, j_ = x.shape
    r = te.reduce_axis((0, block), f"{name}_r")
    amax = te.compute((n_, j_ // block), lambda n, b: te.max(tirx.abs(x[n, b * block + r]), axis=r),
                      name=f"{name}_amax")

    ft = x.dtype

    def f(n, j):
        s = ceil_pow2(tirx.max(amax[n, j // block], tirx.const(1e-4, ft)) * tirx.const(1.0 / FP8_MAX, ft))
        v = tirx.min(tirx.max(x[n, j] / s, tirx.const(-FP8_MAX, ft)), tirx.const(FP8_MAX, ft))
        return fp8_round_expr(v) * s

    return te.compute(x.shape, f, name=f"{name}_qdq")


def _moe_experts_te(x, weights, idx, w1, w2, w3, limit: float, act_quant: bool, acc: str):
    n_, d_ = x.shape
    k_ = idx.shape[1]
    e_, i_ = w1.shape[0], w1.shape[1]
    xin = _qdq_te(te.compute(x.shape, lambda n, d: up(x[n, d], acc), name="xf"), FP8_BLOCK, "x") if act_quant \
        else x

    def expert(n, j):
        return tirx.min(tirx.max(idx[n, j // i_], tirx.const(0, idx.dtype)), (e_ - 1).astype(idx.dtype))

    d1 = te.reduce_axis((0, d_), "d1")
    g = te.compute((n_, k_ * i_), lambda n, j: te.sum(
        up(xin[n, d1], acc) * up(w1[expert(n, j), j % i_, d1], acc), axis=d1), name="g")
    d3 = te.reduce_axis((0, d_), "d3")
    u = te.compute((n_, k_ * i_), lambda n, j: te.sum(
        up(xin[n, d3], acc) * up(w3[expert(n, j), j % i_, d3], acc), axis=d3), name="u")
    lim = tirx.const(limit if limit > 0 else float("inf"), acc)

    def swiglu(n, j):
        a = tirx.min(g[n, j], lim)
        b = tirx.min(tirx.max(u[n, j], -lim), lim)
        return a * tirx.sigmoid(a) * b * up(weights[n, j // i_], acc)

    h = te.compute((n_, k_ * i_), swiglu, name="h")
    if act_quant:
        h = _qdq_te(h, FP8_BLOCK, "h")
    r = te.reduce_axis((0, k_ * i_), "r")
    return te.compute((n_, d_), lambda n, d: te.sum(
        h[n, r] * up(w2[expert(n, r), d, r % i_], acc), axis=r), name="y")


def moe_experts(bb: relax.BlockBuilder, inputs: list, attrs: dict) -> relax.Expr:
    """sum_k w[n,k] * SwiGLU expert idx[n,k] on token n, only the selected experts computed (kernels.moe_experts):
    the expert weights are gathered per (token, slot), never run densely over all E experts as the body does."""
    x, weights, idx, w1, w2, w3 = inputs[:6]
    act_quant = bool(attrs.get("act_quant", 0))
    if act_quant and any(isinstance(v, tirx.IntImm) and int(v) % FP8_BLOCK for v in (shape_of(x)[-1], shape_of(w1)[1])):
        raise ValueError(f"MoEExperts lowering: act_quant needs widths that are multiples of {FP8_BLOCK}")
    return emit_kernel(bb, _moe_experts_te, x, weights, idx, w1, w2, w3, float(attrs.get("swiglu_limit", 0.0)),
                       act_quant, acc_dtype(x, w1), name="dsv4_moe_experts", rows=1, per="block")


# ---- the fused MoE (issue [4]) ---------------------------------------------------------------------------------
# dsv4.MoE (passes/fuse_moe.py) runs its body on TVM: the gate (sqrt-softplus scores, TopK or hash routing,
# normalised weights) as standard ops, then dsv4.MoEExperts, which is the kernel above. A lowering of MoE itself
# belongs here when the routing should join the expert kernel, or when MoE takes the packed expert weights
# (today the pass feeds it float stacks, dequantised by Mxfp4Dequant / Fp8Dequant kernels first).
