"""DeepSeek V4 (Flash / Pro) in PyTorch: the one place the math lives (SPEC §2-§8).

Read top to bottom: norms and linears, RoPE, the KV compressor, the lightning indexer, attention, the MoE,
the mHC block, the model, MTP. Parameter names and shapes equal the official checkpoint's, so an official
state dict loads without renaming. V4-specific kernels are ``dsv4::*`` custom ops (models/kernels.py).

One code path serves prefill, chunked prefill and decode: a call processes T new tokens of each sequence
starting at ``state["pos"]`` and returns the logits of all T positions and the new state. All index
arithmetic is on tensors, so the same forward exports to ONNX with dynamic batch and length.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, kvstore, quant
from .config import INDEX_FP4_BLOCK, ModelArgs
from .quant import up
from .state import capacity as state_capacity
from .state import init_state, layer_state
from .stored import check_act_blocks

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# Norms and linears
# ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w in fp32, cast back (weights fp32 like the reference; BF16 on disk)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        xf = up(x)
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class Linear(nn.Module):
    """y = x W^T. `fmt` is the weight's format in the official checkpoint: "bf16", "fp8" or "fp4".

    The weight is float after construction; ``set_packed`` swaps in the stored bytes (uint8) and E8M0 scales,
    which the dsv4 dequant-matmul ops consume. ``act_quant`` (ModelArgs.sim_act): the reference quantises the
    input of a linear to FP8 per 128 channels when its weight is *stored* FP8/FP4, whichever way it is held here;
    ``stored`` is that format ("float" for a BF16/F32-stored weight; set by models/stored.py).
    """

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16", act_quant: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.stored = fmt
        self.sim = act_quant and fmt in ("fp8", "fp4")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.scale: nn.Parameter | None = None

    @property
    def act_quant(self) -> bool:
        return self.sim and self.stored in ("fp8", "fp4")

    @property
    def packed(self) -> bool:
        return self.scale is not None

    def set_packed(self, weight: Tensor, scale: Tensor) -> None:
        """Hold the checkpoint's bytes: uint8 [out, in] (fp8) or [out, in/2] (fp4), and uint8 E8M0 scales."""
        self.weight = nn.Parameter(weight.view(torch.uint8), requires_grad=False)
        self.scale = nn.Parameter(scale.view(torch.uint8), requires_grad=False)

    def dense_weight(self) -> Tensor:
        """The weight as fp32 (dequantised when packed)."""
        if not self.packed:
            return up(self.weight)
        return kernels.dequant_weight(self.weight, self.scale, kernels.FMT_FP8 if self.fmt == "fp8" else kernels.FMT_FP4)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant:
            x = quant.fp8_act_qdq(x)
        if not self.packed:
            return F.linear(x, self.weight.to(x.dtype))
        if self.fmt == "fp8":
            return kernels.fp8_linear(x, self.weight, self.scale)
        return kernels.mxfp4_linear(x, self.weight, self.scale)


# ---------------------------------------------------------------------------------------------------------
# RoPE: interleaved pairs on the last rope_head_dim dims, real cos/sin (SPEC §4.2)
# ---------------------------------------------------------------------------------------------------------
def rope_inv_freq(args: ModelArgs, compressed: bool) -> Tensor:
    """Plain θ for ratio-0 layers; θ_c with YaRN interpolation for ratio > 0 layers (fp32, like the reference)."""
    dim = args.rope_head_dim
    base = args.compress_rope_theta if compressed else args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if compressed and args.original_seq_len > 0:
        def corr(n_rot: float) -> float:
            return dim * math.log(args.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(args.beta_fast)), 0)
        high = min(math.ceil(corr(args.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
    return freqs


def rope_cos_sin(pos: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    ang = pos.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., rd/2]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate the last rd dims of x (pairs (2i, 2i+1)); cos/sin broadcast against x[..., :rd/2]."""
    rd = cos.shape[-1] * 2
    keep, r = x[..., :-rd], up(x[..., -rd:]).unflatten(-1, (-1, 2))
    a, b = r[..., 0], r[..., 1]
    if inverse:
        sin = -sin
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([keep, rot.to(x.dtype)], dim=-1)


def positions(pos0: Tensor, t: int) -> Tensor:
    return pos0.unsqueeze(1) + torch.arange(t, device=pos0.device)  # [B,T]


# ---------------------------------------------------------------------------------------------------------
# KV compressor (SPEC §4.6): gated pooling of m-token blocks, overlapping for m = 4
# ---------------------------------------------------------------------------------------------------
class Compressor(nn.Module):
    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, rotate: bool):
        super().__init__()
        self.args, self.ratio, self.head_dim, self.rotate = args, ratio, head_dim, rotate
        self.overlap = ratio == 4
        c = 2 if self.overlap else 1
        self.ape = nn.Parameter(torch.empty(ratio, c * head_dim, dtype=torch.float32))
        self.wkv = Linear(args.dim, c * head_dim, "bf16", dtype=torch.float32)  # run in fp32 like the reference
        self.wgate = Linear(args.dim, c * head_dim, "bf16", dtype=torch.float32)
        self.norm = RMSNorm(head_dim, args.norm_eps)
        self.store = kvstore.index_store(args) if rotate else kvstore.kv_store(args)  # how entries are cached

    def forward(self, x: Tensor, pos0: Tensor, kv_state: Tensor, score_state: Tensor, cache: dict[str, Tensor],
                inv_freq: Tensor, n: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """x [B,T,D] new tokens from pos0 [B]; cache: the entries in self.store's layout (its parts); returns
        (cache', kv_state', score_state').

        The partial block in the state and the new tokens are laid out block-aligned (A); every block of A
        that is complete after this call yields one entry, written to cache slot (block start) // m.
        n [B,1]: the real tokens of each row (the rest is right padding, which never enters A); None: all T.
        """
        B, T, _ = x.shape
        m, d, ov = self.ratio, self.head_dim, self.overlap
        C = kv_state.shape[-1]
        xf = up(x)
        kv = self.wkv(xf)  # [B,T,C]
        score = self.wgate(xf) + self.ape[torch.remainder(positions(pos0, T), m)]
        r = torch.remainder(pos0, m).unsqueeze(1)  # [B,1] offset of the first new token in its block
        cur = m if ov else 0
        nb = (m - 1 + T) // m  # blocks that may complete in this call
        L = nb * m + m  # one spare block of padding for the state gather below
        i = torch.arange(L, device=x.device).unsqueeze(0)
        gi = torch.where(i < r, i, torch.where(i - r < (T if n is None else n), m + i - r, m + T))  # [B,L] into [state rows | new | pad]
        gi = gi.unsqueeze(-1).expand(B, L, C)
        A = torch.gather(torch.cat([kv_state[:, cur:], kv, kv.new_zeros(B, 1, C)], 1), 1, gi)
        As = torch.gather(torch.cat([score_state[:, cur:], score, score.new_full((B, 1, C), float("-inf"))], 1), 1, gi)
        entries = kernels.compress(A[:, :nb * m].unflatten(1, (nb, m)), As[:, :nb * m].unflatten(1, (nb, m)),
                                   kv_state[:, :m], score_state[:, :m], ov)  # [B,nb,d] fp32
        n_new = (r + (T if n is None else n)) // m  # [B,1] entries completed by this call
        # entry post-processing: norm, RoPE at the block's first position, quantisation simulation
        e = self.norm(entries.to(x.dtype))
        block_pos = (pos0.unsqueeze(1) - r.squeeze(1).unsqueeze(1)) + m * torch.arange(nb, device=x.device)
        cos, sin = rope_cos_sin(block_pos, inv_freq)
        e = apply_rope(e, cos, sin)
        if self.rotate and self.args.sim_index:  # the store rounds to FP4 (simulation) or keeps MXFP4 codes
            e = up(e) @ quant.hadamard_matrix(d, e.device, up(e).dtype)
        e, _ = self.store.encode(e, x.dtype)  # the entries' parts (kv: FP8 rounding of the nope dims)
        # cache write: slot s takes entry j = s - pos0 // m when 0 <= j < n_new
        N = next(iter(cache.values())).shape[1]
        j = torch.arange(N, device=x.device).unsqueeze(0) - torch.div(pos0, m, rounding_mode="floor").unsqueeze(1)
        src = torch.where((j >= 0) & (j < n_new), N + j, torch.arange(N, device=x.device).unsqueeze(0))
        cache = kvstore.gather_rows(cache, e, src)
        # new partial state: the rows of the block still open; with overlap also the last complete block
        ar = torch.arange(m, device=x.device).unsqueeze(0)
        ci = (n_new * m + ar).unsqueeze(-1).expand(B, m, C)
        new_kv, new_score = torch.gather(A, 1, ci), torch.gather(As, 1, ci)
        if ov:
            pi = ((n_new - 1).clamp_min(0) * m + ar).unsqueeze(-1).expand(B, m, C)
            closed = (n_new > 0).unsqueeze(-1)
            new_kv = torch.cat([torch.where(closed, torch.gather(A, 1, pi), kv_state[:, :m]), new_kv], 1)
            new_score = torch.cat([torch.where(closed, torch.gather(As, 1, pi), score_state[:, :m]), new_score], 1)
        return cache, new_kv, new_score


# ---------------------------------------------------------------------------------------------------------
# Lightning indexer (SPEC §4.7): picks top-k compressed entries for CSA layers
# ---------------------------------------------------------------------------------------------------------
class Indexer(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.args = args
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, "fp8", args.sim_act, dtype)
        self.weights_proj = Linear(args.dim, self.n_heads, "bf16", dtype=dtype)
        self.compressor = Compressor(args, 4, self.head_dim, rotate=True)

    def forward(self, x: Tensor, cq: Tensor, pos0: Tensor, st: dict[str, Tensor], cos: Tensor, sin: Tensor,
                inv_freq: Tensor, n: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        B, T, _ = x.shape
        q = self.wq_b(cq).unflatten(-1, (self.n_heads, self.head_dim))  # [B,T,Hi,di]
        q = apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2))
        if self.args.sim_index:
            q = quant.fp4_act_qdq(up(q) @ quant.hadamard_matrix(self.head_dim, q.device, up(q).dtype), INDEX_FP4_BLOCK).to(q.dtype)
        store = self.compressor.store
        cache, ikv, iscore = self.compressor(x, pos0, st["index_kv"], st["index_score"], kvstore.read(st, "index", store),
                                             inv_freq, n)
        keys = store.decode(cache, x.dtype)  # [B,N,di]
        w = self.weights_proj(x) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)  # [B,T,Hi]
        n_visible = torch.div(positions(pos0, T) + 1, 4, rounding_mode="floor")
        idx = kernels.indexer_topk(q, keys, w, n_visible, self.args.index_topk)  # [B,T,topk], -1 padded
        return idx, kvstore.named("index", cache) | {"index_kv": ikv, "index_score": iscore}


# ---------------------------------------------------------------------------------------------------------
# Attention (SPEC §4): shared-KV MQA, 128-token window ∪ compressed entries, sink, grouped output
# ---------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.args, self.layer_id = args, layer_id
        self.ratio = args.ratio(layer_id)
        H, hd, qs = args.n_heads, args.head_dim, args.sim_act
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.wq_a = Linear(args.dim, args.q_lora_rank, "fp8", qs, dtype)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = Linear(args.q_lora_rank, H * hd, "fp8", qs, dtype)
        self.wkv = Linear(args.dim, hd, "fp8", qs, dtype)
        self.kv_norm = RMSNorm(hd, args.norm_eps)
        self.wo_a = Linear(args.o_group_dim, args.o_groups * args.o_lora_rank, "fp8", False, dtype)  # grouped, bf16 math
        self.wo_b = Linear(args.o_groups * args.o_lora_rank, args.dim, "fp8", qs, dtype)
        if self.ratio:
            self.compressor = Compressor(args, self.ratio, hd, rotate=False)
            self.indexer = Indexer(args, dtype) if self.ratio == 4 else None
        self.register_buffer("inv_freq", rope_inv_freq(args, self.ratio > 0), persistent=False)
        self.kv_store = kvstore.kv_store(args)  # window rows: floats, or FP8 codes (models/kvstore.py)

    def forward(self, x: Tensor, pos0: Tensor, st: dict[str, Tensor], n: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """x [B,T,D] after attn_norm; st: this layer's state by kind; n [B,1]: real tokens per row (right
        padding after them changes no real position's output and is kept out of the state). Returns ([B,T,D],
        new state)."""
        a = self.args
        B, T, _ = x.shape
        W, H, hd = a.window_size, a.n_heads, a.head_dim
        pos = positions(pos0, T)
        cos, sin = rope_cos_sin(pos, self.inv_freq)  # [B,T,rd/2]
        # projections (SPEC §4.1)
        cq = self.q_norm(self.wq_a(x))  # [B,T,Lq]
        q = self.wq_b(cq).unflatten(-1, (H, hd))  # [B,T,H,hd]
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + a.norm_eps)
        q = apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2))
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B,T,hd], one head, K = V
        rows, kv = self.kv_store.encode(kv, kv.dtype)  # the new rows' parts; kv: with the FP8 rounding (sim)
        # window: candidate positions p-W+1 .. p, either in this call's rows or in the ring (slot = pos % W)
        ring = kvstore.read(st, "window", self.kv_store)
        cand = pos.unsqueeze(-1) - (W - 1) + torch.arange(W, device=x.device)  # [B,T,W]
        p0 = pos0.view(B, 1, 1)
        win_idx = torch.where(cand >= p0, W + cand - p0, torch.remainder(cand, W))
        win_idx = torch.where(cand < 0, torch.full_like(cand, -1), win_idx)
        new = kvstore.named("window", self._ring_write(ring, rows, pos0, n))
        banks, idx = [self.kv_store.decode(ring, kv.dtype), kv], [win_idx]
        if self.ratio:
            store = self.compressor.store
            parts, ckv, cscore = self.compressor(x, pos0, st["comp_kv"], st["comp_score"], kvstore.read(st, "kv", store),
                                                 self.inv_freq, n)
            new.update(kvstore.named("kv", parts), comp_kv=ckv, comp_score=cscore)
            cache = store.decode(parts, kv.dtype)  # [B,N,hd]
            off = W + T
            if self.indexer is not None:
                sel, ist = self.indexer(x, cq, pos0, st, cos, sin, self.inv_freq, n)
                new.update(ist)
                idx.append(torch.where(sel >= 0, sel + off, sel))
            else:  # HCA: every visible entry, j < (p+1) // m
                j = torch.arange(cache.shape[1], device=x.device)
                vis = j < torch.div(pos + 1, self.ratio, rounding_mode="floor").unsqueeze(-1)
                idx.append(torch.where(vis, j + off, torch.full_like(vis, -1, dtype=torch.int64)))
            banks.append(cache)
        o = kernels.sparse_attn(q, torch.cat(banks, 1), self.attn_sink, torch.cat(idx, -1), hd ** -0.5)
        o = apply_rope(o, cos.unsqueeze(2), sin.unsqueeze(2), inverse=True)  # [B,T,H,hd]
        # grouped low-rank output projection (SPEC §4.5)
        G = a.o_groups
        o = o.reshape(B, T, G, a.o_group_dim)
        z = torch.einsum("btgi,gri->btgr", o, self.wo_a.dense_weight().view(G, a.o_lora_rank, -1).to(o.dtype))
        return self.wo_b(z.flatten(2)), new

    def _ring_write(self, ring: dict[str, Tensor], rows: dict[str, Tensor], pos0: Tensor, n: Tensor | None = None
                    ) -> dict[str, Tensor]:
        """Slot s takes the last new (real) row whose position is ≡ s (mod W), else keeps its old row (per part)."""
        W = next(iter(ring.values())).shape[1]
        T = next(iter(rows.values())).shape[1] if n is None else n
        s = torch.arange(W, device=pos0.device).unsqueeze(0)
        first = torch.remainder(s - pos0.unsqueeze(1), W)  # first new row that lands in slot s
        last = first + W * torch.div((T - 1 - first).clamp_min(0), W, rounding_mode="floor")
        return kvstore.gather_rows(ring, rows, torch.where(first < T, W + last, s))


# ---------------------------------------------------------------------------------------------------------
# MoE (SPEC §6): sqrt-softplus scores, bias for selection only, hash routing in the first layers
# ---------------------------------------------------------------------------------------------------------
class Gate(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.topk, self.route_scale = args.n_activated_experts, args.route_scale
        self.hash = args.is_hash_layer(layer_id)
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=dtype))
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, args.n_activated_experts, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """x [N,D], ids [N] -> routing weights [N,K] fp32 and expert indices [N,K] int64."""
        s = torch.sqrt(F.softplus(F.linear(up(x), up(self.weight))))  # [N,E] affinities > 0
        if self.hash:
            idx = self.tid2eid[ids]
        else:
            idx = torch.topk(s + self.bias, self.topk, dim=-1).indices
        w = s.gather(1, idx)  # unbiased scores
        return w / w.sum(-1, keepdim=True) * self.route_scale, idx


class Expert(nn.Module):
    """SwiGLU expert; the routed ones clamp (gate above, up both sides), the shared one does not."""

    def __init__(self, args: ModelArgs, fmt: str, dtype: torch.dtype, limit: float):
        super().__init__()
        self.w1 = Linear(args.dim, args.moe_inter_dim, fmt, args.sim_act, dtype)
        self.w2 = Linear(args.moe_inter_dim, args.dim, fmt, args.sim_act, dtype)
        self.w3 = Linear(args.dim, args.moe_inter_dim, fmt, args.sim_act, dtype)
        self.limit = limit

    def forward(self, x: Tensor) -> Tensor:
        g, u = up(self.w1(x)), up(self.w3(x))
        if self.limit > 0:
            u, g = u.clamp(-self.limit, self.limit), g.clamp(max=self.limit)
        return self.w2((F.silu(g) * u).to(x.dtype))


class MoE(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.args = args
        self.gate = Gate(layer_id, args, dtype)
        self.experts = nn.ModuleList(Expert(args, args.expert_dtype, dtype, args.swiglu_limit)
                                     for _ in range(args.n_routed_experts))
        self.shared_experts = Expert(args, "fp8", dtype, 0.0)  # no swiglu_limit on the shared expert

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N,D]
        w, idx = self.gate(x, ids.reshape(-1))
        st = getattr(self, "stacked", None)
        if st is not None:  # export: one [E, ...] parameter per weight kind (export/weights.py stack_for_trace)
            y = kernels.moe_experts_stacked(x, w, idx, st.w1.weight, st.w2.weight, st.w3.weight, st.w1.scale,
                                            st.w2.scale, st.w3.scale, st.fmt, self.args.swiglu_limit, st.act_quant)
            return (y + up(self.shared_experts(x))).to(x.dtype).view(shape)
        ex = list(self.experts)
        packed = ex[0].w1.packed
        fmt = (kernels.FMT_FP4 if self.args.expert_dtype == "fp4" else kernels.FMT_FP8) if packed else kernels.FMT_FLOAT
        lists = [[getattr(e, n).weight for e in ex] for n in ("w1", "w2", "w3")]
        scales = [[getattr(e, n).scale for e in ex] if packed else [] for n in ("w1", "w2", "w3")]
        act_quant = ex[0].w1.act_quant  # the routed experts share one stored format (checkpoint.validate)
        y = kernels.moe_experts(x, w, idx, *lists, *scales, fmt, self.args.swiglu_limit, act_quant)
        y = y + up(self.shared_experts(x))
        return y.to(x.dtype).view(shape)


# ---------------------------------------------------------------------------------------------------------
# Manifold-constrained hyper-connections (SPEC §3) and the block
# ---------------------------------------------------------------------------------------------------------
def hc_weights(X: Tensor, fn: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Flattened fp32 streams [B,T,hc*D] and the mixing logits fn @ x / rms(x)."""
    xf = up(X.flatten(2))
    return xf, F.linear(xf, fn) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.args, self.layer_id = args, layer_id
        self.attn = Attention(layer_id, args, dtype)
        self.ffn = MoE(layer_id, args, dtype)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        for sub in ("attn", "ffn"):
            self.register_parameter(f"hc_{sub}_fn", nn.Parameter(torch.empty(args.hc_mix, args.hc_dim)))
            self.register_parameter(f"hc_{sub}_base", nn.Parameter(torch.empty(args.hc_mix)))
            self.register_parameter(f"hc_{sub}_scale", nn.Parameter(torch.empty(3)))

    def hc_pre(self, X: Tensor, fn: Tensor, scale: Tensor, base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.args
        xf, mixes = hc_weights(X, fn, a.norm_eps)
        pre, post, comb = kernels.hc_split_sinkhorn(mixes, scale, base, a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps)
        u = (pre.unsqueeze(-1) * xf.view(X.shape)).sum(2)  # [B,T,D]
        return u.to(X.dtype), post, comb

    @staticmethod
    def hc_post(y: Tensor, X: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        # X'_k = post_k * y + sum_j comb[j,k] X_j   (comb rows = source stream: the transpose matters)
        out = post.unsqueeze(-1) * up(y.unsqueeze(-2)) + torch.einsum("btjk,btjd->btkd", comb, up(X))
        return out.to(y.dtype)

    def forward(self, X: Tensor, ids: Tensor, pos0: Tensor, st: dict[str, Tensor], n: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        u, post, comb = self.hc_pre(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        y, st = self.attn(self.attn_norm(u), pos0, st, n)
        X = self.hc_post(y, X, post, comb)
        u, post, comb = self.hc_pre(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        X = self.hc_post(self.ffn(self.ffn_norm(u), ids), X, post, comb)
        return X, st


def add_hc_head(module: nn.Module, args: ModelArgs) -> None:
    """The final stream collapse's tensors (hc_head_{fn,base,scale}) and norm, on the model and on each MTP block."""
    module.hc_head_fn = nn.Parameter(torch.empty(args.hc_mult, args.hc_dim))
    module.hc_head_base = nn.Parameter(torch.empty(args.hc_mult))
    module.hc_head_scale = nn.Parameter(torch.empty(1))
    module.norm = RMSNorm(args.dim, args.norm_eps)


def head_logits(module: nn.Module, X: Tensor, head_weight: Tensor, args: ModelArgs) -> Tensor:
    """Collapse the streams (sigmoid pre-weights, no Sinkhorn), final norm, fp32 head: [B,T,V]."""
    xf, mixes = hc_weights(X, module.hc_head_fn, args.norm_eps)
    pre = torch.sigmoid(mixes * module.hc_head_scale + module.hc_head_base) + args.hc_eps
    u = (pre.unsqueeze(-1) * xf.view(X.shape)).sum(2).to(X.dtype)
    return F.linear(up(module.norm(u)), up(head_weight))


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class MTPBlock(Block):
    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype):
        super().__init__(layer_id, args, dtype)
        self.e_proj = Linear(args.dim, args.dim, "fp8", args.sim_act, dtype)
        self.h_proj = Linear(args.dim, args.dim, "fp8", args.sim_act, dtype)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        add_hc_head(self, args)  # its own hc_head_{fn,base,scale} and norm; embed and head are shared


class DeepseekV4(nn.Module):
    """``logits, state = model(input_ids, state=None)``: state=None starts fresh sequences at position 0."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.args, self.dtype = args, dtype
        self.embed = nn.Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, args, dtype) for i in range(args.n_layers))
        add_hc_head(self, args)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False, dtype=torch.float32)
        self.mtp = nn.ModuleList(MTPBlock(args.n_layers + j, args, dtype) for j in range(args.n_mtp_layers))
        if dtype == torch.float64:  # exactness tests: every fp32 computation of the reference runs in fp64
            self.double()

    def named_official_tensors(self):
        """(official checkpoint name, tensor) for every parameter and the tid2eid tables."""
        yield from self.named_parameters()
        yield from ((k, v) for k, v in self.named_buffers() if k.endswith("tid2eid"))

    # ---- entry points ------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if state is None:
            state = init_state(self.args, input_ids.shape[0], self.dtype, input_ids.device)
        if not getattr(self, "_act_blocks_checked", False):  # once: widths vs the FP8 activation block (stored.py)
            check_act_blocks(self)
            self._act_blocks_checked = True
        self.check_inputs(input_ids, state)
        logits, state, _ = self.step(input_ids, state)
        return logits, state

    def check_inputs(self, input_ids: Tensor, state: dict[str, Tensor]) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, length], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.args.vocab_size:
            raise ValueError(f"input_ids: values must be in [0, {self.args.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if state["pos"].shape[0] != B:
            raise ValueError(f"state: batch {state['pos'].shape[0]} does not match input_ids batch {B}")
        end = int(state["pos"].max()) + T
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence length: position {end} exceeds max_seq_len={self.args.max_seq_len} "
                             f"(state at {int(state['pos'].max())}, {T} new tokens)")
        cap = state_capacity(state, self.args)  # a state allocated smaller (models/state.resize grows it)
        if end > cap:
            raise ValueError(f"sequence length: position {end} exceeds the state's capacity {cap} (state at "
                             f"{int(state['pos'].max())}, {T} new tokens; grow it with models/state.resize)")

    def step(self, input_ids: Tensor, state: dict[str, Tensor], lengths: Tensor | None = None,
             last_only: bool = False) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """The traceable forward: (logits [B,T,V], new state, final streams [B,T,hc,D] before the head).

        lengths [B] (int64, 1..T): each row's real tokens; the rest of the row is right padding, which changes no
        real position's logits and never enters the state (static-shape graphs pad prompts up to a bucket).
        last_only: logits [B,1,V] of each row's last real token (position T-1, or lengths-1) only: the head's
        cost and the logits' bytes no longer grow with T (the default of exported prefill graphs)."""
        pos0 = state["pos"]
        X = self.embed(input_ids).unsqueeze(2).repeat(1, 1, self.args.hc_mult, 1)  # [B,T,hc,D]
        n = None if lengths is None else lengths.unsqueeze(1)  # [B,1]
        new: dict[str, Tensor] = {"pos": pos0 + (input_ids.shape[1] if lengths is None else lengths)}
        for i, layer in enumerate(self.layers):
            X, st = layer(X, input_ids, pos0, layer_state(state, str(i)), n)
            new.update({f"{i}.{k}": v for k, v in st.items()})
        H = X
        if last_only:
            H = X[:, -1:] if lengths is None else \
                X.gather(1, (lengths - 1).view(-1, 1, 1, 1).expand(-1, 1, X.shape[2], X.shape[3]))
        return head_logits(self, H, self.head.weight, self.args), new, X

    def forward_mtp(self, hidden: Tensor, next_ids: Tensor, state: dict[str, Tensor] | None = None,
                    depth: int = 0, last_only: bool = False) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """MTP (SPEC §8): streams at positions t (from `step`) + embeddings of tokens t+1 -> logits for t+2.

        Returns (logits, MTP state, the MTP block's output streams for chained drafts).
        """
        blk = self.mtp[depth]
        if state is None:
            state = init_state(self.args, next_ids.shape[0], self.dtype, next_ids.device, mtp=True)
        pos0 = state["pos"]
        e = blk.enorm(self.embed(next_ids))  # [B,T,D]
        X = blk.h_proj(blk.hnorm(hidden)) + blk.e_proj(e).unsqueeze(2)  # [B,T,hc,D]
        X, st = blk(X, next_ids, pos0, layer_state(state, f"mtp{depth}"))
        new = dict(state) | {"pos": pos0 + next_ids.shape[1]} | {f"mtp{depth}.{k}": v for k, v in st.items()}
        return head_logits(blk, X[:, -1:] if last_only else X, self.head.weight, self.args), new, X

    @torch.no_grad()
    def greedy(self, input_ids: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
        """Prefill then greedy decoding: (new tokens [B,N], logits of every step [B,N,V])."""
        logits, state = self(input_ids)
        toks, steps = [], []
        for _ in range(max_new_tokens):
            steps.append(logits[:, -1])
            toks.append(logits[:, -1].argmax(-1, keepdim=True))
            if len(toks) == max_new_tokens:
                break
            logits, state = self(toks[-1], state)
        return torch.cat(toks, 1), torch.stack(steps, 1)

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False,
                        **overrides) -> DeepseekV4:
        """Load a checkpoint directory (config.json + model.safetensors.index.json + shards)."""
        from .checkpoint import load_model

        return load_model(path, dtype=dtype, keep_quantized=keep_quantized, **overrides)



def parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Logical parameter counts from a meta-device model (FP4/FP8 weights count one per element).

    ``total``: embedding + head + the main blocks (MTP excluded, as the released "284B"/"1.6T" figures are
    quoted); ``active``: per token, i.e. total minus the embedding and the routed experts not selected;
    ``mtp``: the MTP blocks.
    """
    with torch.device("meta"):
        m = DeepseekV4(args)
    total = mtp = routed = 0
    for name, p in m.named_parameters():
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if ".ffn.experts." in name:
            routed += p.numel()
    embed = m.embed.weight.numel()
    inactive = routed * (args.n_routed_experts - args.n_activated_experts) // args.n_routed_experts
    return {"total": total, "active": total - embed - inactive, "mtp": mtp, "embed": embed}
