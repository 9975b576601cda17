"""The kernel seam: every V4-specific op is a ``torch.library.custom_op`` in the ``dsv4`` namespace.

Each op here is the *eager reference* face of a row of the custom-op registry (export/custom_ops.py): clear
torch, not fast. ``register_fake`` gives the exporter static output shapes that never depend on data
(DESIGN.md: the indexer returns exactly ``top_k`` indices, -1 padded). Back ends replace these with their own
kernels or inline the ONNX function bodies; tests compare every face against these and these against slow
loop implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import quant
from .quant import up

FMT_FLOAT, FMT_FP8, FMT_FP4 = 0, 1, 2  # weight formats of dsv4::moe_experts


def _acc(t: torch.Tensor) -> torch.dtype:
    """The dtype `up(t)` has: what the fakes must report for the fp32-accumulating outputs (fp64 stays fp64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- sparse attention with sink (SPEC §4.4) -----------------------------------------------------------
@torch.library.custom_op("dsv4::sparse_attn", mutates_args=())
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B,T,H,D], kv [B,N,D] (shared K=V), sink [H] fp32, idx [B,T,K] int64 into kv (-1 = empty slot).

    o[b,t,h] = sum_s softmax([l_s..., sink_h])_s * kv[idx_s] with l_s = q.kv[idx_s] * scale over valid slots.
    """
    return torch.cat([_sparse_attn_rows(q[:, a:a + QUERY_CHUNK], kv, sink, idx[:, a:a + QUERY_CHUNK], scale)
                      for a in range(0, q.shape[1], QUERY_CHUNK)], 1)


QUERY_CHUNK = 256  # queries per step of the eager loops: bounds the [B,chunk,K,D] gather on long prefills


def _sparse_attn_rows(q, kv, sink, idx, scale):
    valid = idx >= 0  # [B,T,K]
    g = torch.gather(up(kv).unsqueeze(1).expand(-1, idx.shape[1], -1, -1), 2,
                     idx.clamp_min(0).unsqueeze(-1).expand(-1, -1, -1, kv.shape[-1]))  # [B,T,K,D]
    logits = torch.einsum("bthd,btkd->bthk", up(q), g) * scale
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    sink_col = up(sink).view(1, 1, -1, 1).expand(*logits.shape[:3], 1)
    p = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bthk,btkd->bthd", p, g).to(q.dtype)


@sparse_attn.register_fake
def _(q, kv, sink, idx, scale):
    return torch.empty_like(q)


# ---- lightning indexer scores + top-k (SPEC §4.7) ------------------------------------------------------
@torch.library.custom_op("dsv4::indexer_topk", mutates_args=())
def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, n_visible: torch.Tensor, top_k: int) -> torch.Tensor:
    """q [B,T,H,d], k [B,N,d] compressed index keys, w [B,T,H] head weights, n_visible [B,T] int64.

    score[t,j] = sum_h w[t,h] * relu(q[t,h].k[j]) for j < n_visible[t]; returns the indices of the top_k scores,
    [B,T,top_k] int64, highest first, ties to the lower index (ONNX TopK order), -1 where fewer are visible.
    """
    s = torch.cat([(torch.einsum("bthd,bnd->bthn", up(q[:, a:a + QUERY_CHUNK]), up(k)).relu()
                    * up(w[:, a:a + QUERY_CHUNK]).unsqueeze(-1)).sum(2)
                   for a in range(0, q.shape[1], QUERY_CHUNK)], 1)  # [B,T,N]
    j = torch.arange(k.shape[1], device=k.device)
    s = s.masked_fill(j >= n_visible.unsqueeze(-1), float("-inf"))
    if s.shape[-1] < top_k:
        s = F.pad(s, (0, top_k - s.shape[-1]), value=float("-inf"))
    vals, order = torch.sort(s, dim=-1, descending=True, stable=True)
    vals, order = vals[..., :top_k], order[..., :top_k]
    return torch.where(torch.isneginf(vals), torch.full_like(order, -1), order)


@indexer_topk.register_fake
def _(q, k, w, n_visible, top_k):
    return q.new_empty((q.shape[0], q.shape[1], top_k), dtype=torch.int64)


# ---- KV compressor: gated pooling of m-token blocks (SPEC §4.6) ---------------------------------------------
@torch.library.custom_op("dsv4::compress", mutates_args=())
def compress(kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor, prev_score: torch.Tensor,
             overlap: bool) -> torch.Tensor:
    """kv, score [B,nb,m,C] (score already includes ape), prev_* [B,m,C]: the block before block 0.

    Without overlap (C = d): entry = sum over the m rows of softmax(score) * kv, per channel.
    With overlap (C = 2d): entry i pools 2m rows: the lower channel half of block i-1 (block 0 takes prev_*)
    and the upper half of block i. Returns [B,nb,d] fp32.
    """
    kv, score = up(kv), up(score)
    if overlap:
        d = kv.shape[-1] // 2
        prev_v = torch.cat([up(prev_kv).unsqueeze(1), kv[:, :-1]], 1)[..., :d]
        prev_z = torch.cat([up(prev_score).unsqueeze(1), score[:, :-1]], 1)[..., :d]
        kv = torch.cat([prev_v, kv[..., d:]], dim=2)  # [B,nb,2m,d]
        score = torch.cat([prev_z, score[..., d:]], dim=2)
    return (kv * torch.softmax(score, dim=2)).sum(2)


@compress.register_fake
def _(kv, score, prev_kv, prev_score, overlap):
    d = kv.shape[-1] // 2 if overlap else kv.shape[-1]
    return kv.new_empty((kv.shape[0], kv.shape[1], d), dtype=_acc(kv))


# ---- mHC split with Sinkhorn-Knopp (SPEC §3) --------------------------------------------------------------
@torch.library.custom_op("dsv4::hc_split_sinkhorn", mutates_args=())
def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes [..., (2+hc)*hc] fp32 -> pre [..., hc], post [..., hc], comb [..., hc, hc] (rows = source stream)."""
    n = hc_mult
    mixes = up(mixes)
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    z = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    m = torch.softmax(z, dim=-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return pre, post, m


@hc_split_sinkhorn.register_fake
def _(mixes, scale, base, hc_mult, iters, eps):
    lead = mixes.shape[:-1]
    f = _acc(mixes)
    return mixes.new_empty((*lead, hc_mult), dtype=f), mixes.new_empty((*lead, hc_mult), dtype=f), \
        mixes.new_empty((*lead, hc_mult, hc_mult), dtype=f)


# ---- dequant-matmul for packed weights (SPEC §7.2, §7.3) ---------------------------------------------------
@torch.library.custom_op("dsv4::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., I] @ dequant(weight)^T: weight uint8 e4m3 bytes [O, I], scale uint8 E8M0 [ceil(O/128), ceil(I/128)]."""
    return F.linear(up(x), quant.fp8_block_dequant(weight, scale).to(up(x).dtype)).to(x.dtype)


@fp8_linear.register_fake
def _(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("dsv4::mxfp4_linear", mutates_args=())
def mxfp4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(weight)^T: weight uint8 packed e2m1 [O, K/2], scale uint8 E8M0 [O, K/32]."""
    return F.linear(up(x), quant.mxfp4_dequant(weight, scale).to(up(x).dtype)).to(x.dtype)


@mxfp4_linear.register_fake
def _(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Dequantisation on its own (the grouped wo_a einsum uses a whole weight): custom ops so that the uint8 bytes
# reach the exporter as an opaque node rather than as a dtype view, which ONNX cannot express below opset 26.
@torch.library.custom_op("dsv4::fp8_dequant", mutates_args=())
def fp8_dequant(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bytes [O, I] with E8M0 tile scales [ceil(O/128), ceil(I/128)] -> fp32 [O, I]."""
    return quant.fp8_block_dequant(weight, scale)


@fp8_dequant.register_fake
def _(weight, scale):
    return weight.new_empty(weight.shape, dtype=torch.float32)


@torch.library.custom_op("dsv4::mxfp4_dequant", mutates_args=())
def mxfp4_dequant(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """packed e2m1 uint8 [O, K/2] with E8M0 scales [O, K/32] -> fp32 [O, K]."""
    return quant.mxfp4_dequant(weight, scale)


@mxfp4_dequant.register_fake
def _(weight, scale):
    return weight.new_empty((*weight.shape[:-1], weight.shape[-1] * 2), dtype=torch.float32)


def dequant_weight(weight: torch.Tensor, scale: torch.Tensor | None, fmt: int) -> torch.Tensor:
    if fmt == FMT_FP8:
        return fp8_dequant(weight, scale)
    if fmt == FMT_FP4:
        return mxfp4_dequant(weight, scale)
    return up(weight)


# ---- routed experts of one MoE layer (SPEC §6) ------------------------------------------------------------
@torch.library.custom_op("dsv4::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, w1: list[torch.Tensor],
                w2: list[torch.Tensor], w3: list[torch.Tensor], s1: list[torch.Tensor], s2: list[torch.Tensor],
                s3: list[torch.Tensor], fmt: int, swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """sum_k weights[n,k] applied inside expert idx[n,k]'s SwiGLU (before W2), x [N,D] -> [N,D] fp32.

    Expert e: h = silu(min(x W1^T, L)) * clamp(x W3^T, -L, L) * w; y = h W2^T. fmt: 0 float weights,
    1 FP8 blocks, 2 MXFP4 (s* lists hold the E8M0 scales; empty for float). act_quant: FP8 qdq of the
    inputs of W1/W3 and W2 as the reference's quantised linears do.
    """
    y = torch.zeros(x.shape, dtype=up(x).dtype, device=x.device)
    xq = quant.fp8_act_qdq(x) if act_quant else x
    for e in range(len(w1)):
        rows, slot = torch.nonzero(idx == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        sc1, sc2, sc3 = (s[e] if s else None for s in (s1, s2, s3))
        xe = up(xq[rows])
        g = up(F.linear(xe, dequant_weight(w1[e], sc1, fmt).to(xe.dtype)).to(x.dtype))
        u = up(F.linear(xe, dequant_weight(w3[e], sc3, fmt).to(xe.dtype)).to(x.dtype))
        if swiglu_limit > 0:
            u = u.clamp(-swiglu_limit, swiglu_limit)
            g = g.clamp(max=swiglu_limit)
        h = (F.silu(g) * u * up(weights[rows, slot]).unsqueeze(-1)).to(x.dtype)
        if act_quant:
            h = quant.fp8_act_qdq(h)
        y.index_add_(0, rows, up(F.linear(up(h), dequant_weight(w2[e], sc2, fmt).to(xe.dtype)).to(x.dtype)))
    return y


@moe_experts.register_fake
def _(x, weights, idx, w1, w2, w3, s1, s2, s3, fmt, swiglu_limit, act_quant):
    return x.new_empty(x.shape, dtype=_acc(x))


@torch.library.custom_op("dsv4::moe_experts_stacked", mutates_args=())
def moe_experts_stacked(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                        w3: torch.Tensor, s1: torch.Tensor | None, s2: torch.Tensor | None, s3: torch.Tensor | None,
                        fmt: int, swiglu_limit: float, act_quant: bool) -> torch.Tensor:
    """moe_experts over stacked weights [E, ...] (and stacked scales, None for float weights): the form the
    exporter traces, one tensor per weight kind instead of one per expert (export/weights.py stack_for_trace)."""
    sc = [list(s.unbind(0)) if s is not None else [] for s in (s1, s2, s3)]
    return moe_experts(x, weights, idx, list(w1.unbind(0)), list(w2.unbind(0)), list(w3.unbind(0)), *sc, fmt,
                       swiglu_limit, act_quant)


@moe_experts_stacked.register_fake
def _(x, weights, idx, w1, w2, w3, s1, s2, s3, fmt, swiglu_limit, act_quant):
    return x.new_empty(x.shape, dtype=_acc(x))
