"""The eager DeepseekV4: decode == prefill, chunked prefill, batching, the attention of SPEC §4.8 written as
loops, RoPE/YaRN, routing, MTP, parameter counts, input errors."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.models import DeepseekV4, init_random_, init_state, preset
from dsv4.models.model import apply_rope, parameter_counts, rope_inv_freq
from dsv4.models.state import layer_state

GEN = torch.Generator().manual_seed(1234)
IDS_400 = torch.randint(0, 512, (1, 400), generator=GEN)


def decode_token_by_token(model, ids):
    with torch.no_grad():
        logits, st = model(ids[:, :1])
        out = [logits]
        for i in range(1, ids.shape[1]):
            logits, st = model(ids[:, i:i + 1], st)
            out.append(logits)
    return torch.cat(out, 1), st


def assert_states_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            fin = torch.isfinite(a[k])
            assert torch.equal(fin, torch.isfinite(b[k])), k  # -inf marks empty score rows in both
            assert (a[k][fin] - b[k][fin]).abs().max() <= atol, k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny_noq():
    return init_random_(DeepseekV4(preset("tiny", quant_sim=False)), seed=0).eval()


def test_prefill_400_equals_decode_fp32(tiny_noq):
    """T=400 crosses the 128-token window, 100 ratio-4 blocks and 3 ratio-128 blocks: max |Δlogits| <= 1e-4."""
    with torch.no_grad():
        full, st_full = tiny_noq(IDS_400)
    dec, st_dec = decode_token_by_token(tiny_noq, IDS_400)
    assert (full - dec).abs().amax(-1).max() <= 1e-4
    assert_states_close(st_full, st_dec, 1e-4)
    assert int(st_full["pos"]) == 400 and int((st_full["2.kv"].abs().sum(-1) > 0).sum()) == 3


def test_prefill_400_equals_decode_with_quant_sim_fp64(tiny_model_f64):
    """With the FP8/FP4 simulations on, decode == prefill exactly up to fp64 noise: <= 1e-4 (observed ~1e-14).

    In fp32 the two paths differ by 1 ulp in some matmuls, which flips a few FP8/FP4 rounding decisions; that is
    a property of rounding simulations, so the exact state machinery is checked in fp64.
    """
    with torch.no_grad():
        full, st_full = tiny_model_f64(IDS_400)
    dec, st_dec = decode_token_by_token(tiny_model_f64, IDS_400)
    assert (full - dec).abs().max() <= 1e-4
    assert_states_close(st_full, st_dec, 1e-4)


def test_chunked_prefill_equals_full(tiny_noq):
    """Prefill in chunks of 150, 97 and 153 tokens (block boundaries fall mid-chunk) equals one 400-token prefill."""
    with torch.no_grad():
        full, st_full = tiny_noq(IDS_400)
        parts, st = [], None
        for a, b in ((0, 150), (150, 247), (247, 400)):
            logits, st = tiny_noq(IDS_400[:, a:b], st)
            parts.append(logits)
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4
    assert_states_close(st, st_full, 1e-4)


def test_batch_rows_are_independent(tiny_model):
    ids = torch.randint(0, 512, (2, 140), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        both, st = tiny_model(ids)
        one, _ = tiny_model(ids[1:])
        nxt, _ = tiny_model(torch.tensor([[5], [9]]), st)
        nxt1, _ = tiny_model(torch.tensor([[9]]), {k: v[1:] for k, v in st.items()})
    assert (both[1:] - one).abs().max() <= 1e-4
    assert (nxt[1:] - nxt1).abs().max() <= 1e-4
    assert (both[0] - both[1]).abs().max() > 1e-2


# ---- SPEC §4.8 as loops ----------------------------------------------------------------------------------
def spec_compress(comp, x, m, d, inv_freq, args):
    """SPEC §4.6 full-sequence pseudo-code (quant_sim off): entries of the complete blocks, [nb, d]."""
    T = x.shape[0]
    Cv, Zs = x @ comp.wkv.weight.T, x @ comp.wgate.weight.T
    nb = T // m
    Cv, Zs = Cv[:nb * m].view(nb, m, -1), Zs[:nb * m].view(nb, m, -1) + comp.ape
    if m == 4:
        pv = torch.cat([torch.zeros(1, m, d, dtype=x.dtype), Cv[:-1, :, :d]])
        pz = torch.cat([torch.full((1, m, d), -math.inf, dtype=x.dtype), Zs[:-1, :, :d]])
        V, Z = torch.cat([pv, Cv[..., d:]], 1), torch.cat([pz, Zs[..., d:]], 1)
    else:
        V, Z = Cv, Zs
    e = comp.norm((torch.softmax(Z, 1) * V).sum(1))
    ang = (torch.arange(nb, dtype=torch.float32) * m)[:, None] * inv_freq
    return apply_rope(e, torch.cos(ang), torch.sin(ang))


def spec_attention(attn, x, args):
    """SPEC §4.8 with explicit per-query key sets (window ∪ compressed), sink softmax, inverse RoPE, grouped out."""
    T = x.shape[0]
    H, hd, W = args.n_heads, args.head_dim, args.window_size
    ang = torch.arange(T, dtype=torch.float32)[:, None] * attn.inv_freq
    cos, sin = torch.cos(ang), torch.sin(ang)
    cq = attn.q_norm(attn.wq_a(x))
    q = attn.wq_b(cq).view(T, H, hd)
    q = apply_rope(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + args.norm_eps), cos[:, None], sin[:, None])
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin)
    comp, sel = None, None
    if attn.ratio:
        comp = spec_compress(attn.compressor, x, attn.ratio, hd, attn.inv_freq, args)
    if attn.ratio == 4:
        ix = attn.indexer
        qi = apply_rope(ix.wq_b(cq).view(T, ix.n_heads, ix.head_dim), cos[:, None], sin[:, None])
        ki = spec_compress(ix.compressor, x, 4, ix.head_dim, attn.inv_freq, args)
        w = ix.weights_proj(x) * (ix.head_dim ** -0.5 * ix.n_heads ** -0.5)
        sel = []
        for t in range(T):
            vis = (t + 1) // 4
            sc = [(-(w[t] * (qi[t] @ ki[j]).relu()).sum().item(), j) for j in range(vis)]
            sel.append([j for _, j in sorted(sc)[:args.index_topk]])
    o = torch.zeros(T, H, hd, dtype=x.dtype)
    for t in range(T):
        keys = [kv[s] for s in range(max(0, t - W + 1), t + 1)]
        if attn.ratio == 128:
            keys += [comp[j] for j in range((t + 1) // 128)]
        elif attn.ratio == 4:
            keys += [comp[j] for j in sel[t]]
        K = torch.stack(keys)
        for h in range(H):
            logit = K @ q[t, h] * hd ** -0.5
            p = torch.softmax(torch.cat([logit, attn.attn_sink[h:h + 1]]), 0)[:-1]
            o[t, h] = p @ K
    o = apply_rope(o, cos[:, None], sin[:, None], inverse=True)
    G = args.o_groups
    z = torch.einsum("tgi,gri->tgr", o.reshape(T, G, -1), attn.wo_a.weight.view(G, args.o_lora_rank, -1))
    return attn.wo_b(z.reshape(T, -1))


@pytest.mark.parametrize("layer", [0, 1, 2])  # window-only, CSA (ratio 4, indexer), HCA (ratio 128)
def test_attention_equals_spec_loops(layer):
    args = preset("tiny", quant_sim=False)
    model = init_random_(DeepseekV4(args, dtype=torch.float64), seed=3).eval()
    attn = model.layers[layer].attn
    T = 300
    x = torch.randn(1, T, args.dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        st = layer_state(init_state(args, 1, torch.float64), str(layer))
        got, _ = attn(x, torch.zeros(1, dtype=torch.int64), st)
        ref = spec_attention(attn, x[0], args)
    assert (got[0] - ref).abs().max() <= 1e-10


def test_rope_is_interleaved_complex_rotation_and_yarn_range():
    args = preset("flash")
    x = torch.randn(3, 64, dtype=torch.float64)
    f = rope_inv_freq(args, compressed=True).double()
    ang = torch.tensor([0.0, 5.0, 1000.0], dtype=torch.float64)[:, None] * f
    ref = torch.view_as_real(torch.view_as_complex(x.view(3, 32, 2)) * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
    torch.testing.assert_close(apply_rope(x, torch.cos(ang), torch.sin(ang)), ref)
    torch.testing.assert_close(apply_rope(ref, torch.cos(ang), torch.sin(ang), inverse=True), x)
    plain = 1.0 / (160000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    scaled = rope_inv_freq(args, compressed=True)
    # SPEC §4.2: YaRN ramp from dim-pair 15 (unchanged below) to 25 (divided by 16 above) for θ=160000
    torch.testing.assert_close(scaled[:16], plain[:16])
    torch.testing.assert_close(scaled[25:], plain[25:] / 16)
    assert ((scaled[16:25] < plain[16:25]) & (scaled[16:25] > plain[16:25] / 16)).all()
    torch.testing.assert_close(rope_inv_freq(args, compressed=False),
                               1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)))


# ---- routing -------------------------------------------------------------------------------------------
def test_hash_routing_uses_tid2eid_row_of_each_token(tiny_model):
    gate = tiny_model.layers[0].ffn.gate
    assert gate.hash and gate.bias is None
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([5, 9, 5, 300, 9, 7])
    w, idx = gate(x, ids)
    assert torch.equal(idx, gate.tid2eid[ids])
    old = gate.tid2eid[9].clone()
    try:
        gate.tid2eid[9] = torch.tensor([7, 3])
        w2, idx2 = gate(x, ids)
        changed = (idx2 != idx).any(-1)
        assert changed.tolist() == [False, True, False, False, True, False]
        assert torch.equal(w2[~changed], w[~changed])
    finally:
        gate.tid2eid[9] = old
    s = torch.sqrt(torch.nn.functional.softplus(x @ gate.weight.T))
    torch.testing.assert_close(w, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 1.5)


def test_learned_routing_selects_with_bias_but_weights_unbiased(tiny_model):
    gate = tiny_model.layers[2].ffn.gate
    assert not gate.hash
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    s = torch.sqrt(torch.nn.functional.softplus(x @ gate.weight.T))
    old = gate.bias.detach().clone()
    try:
        with torch.no_grad():
            gate.bias.copy_(torch.linspace(0, 5, 8))  # large bias: selection follows it
        w, idx = gate(x, torch.zeros(32, dtype=torch.int64))
    finally:
        with torch.no_grad():
            gate.bias.copy_(old)
    assert torch.equal(idx.sort(-1).values, torch.tensor([6, 7]).expand(32, 2))
    torch.testing.assert_close(w, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 1.5)


# ---- MTP, sizes, input errors -------------------------------------------------------------------------------
def test_mtp_decode_equals_prefill(tiny_model_f64):
    ids = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, _, hidden = tiny_model_f64.step(ids[:, :-1], init_state(tiny_model_f64.args, 1, torch.float64))
        full, st, _ = tiny_model_f64.forward_mtp(hidden, ids[:, 1:])
        parts, st2 = [], None
        for t in range(149):
            lg, st2, _ = tiny_model_f64.forward_mtp(hidden[:, t:t + 1], ids[:, t + 1:t + 2], st2)
            parts.append(lg)
    assert full.shape == (1, 149, 512)
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-9
    assert_states_close(st, st2, 1e-9)


def test_parameter_counts_of_released_models():
    """SPEC §1.2: Flash 284.33B total (no MTP) / 13.27B active; Pro 1.573T / 48.85B, counted on the meta device."""
    f, p = parameter_counts(preset("flash")), parameter_counts(preset("pro"))
    assert abs(f["total"] - 284.3e9) <= 0.1e9 and abs(f["active"] - 13.3e9) <= 0.1e9
    assert abs(p["total"] - 1.573e12) <= 0.005e12 and abs(p["active"] - 48.9e9) <= 0.1e9


def test_official_parameter_names_and_shapes():
    with torch.device("meta"):
        m = DeepseekV4(preset("flash", n_layers=4))
    shapes = {k: tuple(v.shape) for k, v in m.named_official_tensors()}
    expect = {
        "embed.weight": (129280, 4096), "head.weight": (129280, 4096), "norm.weight": (4096,),
        "hc_head_fn": (4, 16384), "hc_head_base": (4,), "hc_head_scale": (1,),
        "layers.0.attn.wq_a.weight": (1024, 4096), "layers.0.attn.wq_b.weight": (32768, 1024),
        "layers.0.attn.wkv.weight": (512, 4096), "layers.0.attn.wo_a.weight": (8192, 4096),
        "layers.0.attn.wo_b.weight": (4096, 8192), "layers.0.attn.attn_sink": (64,),
        "layers.0.hc_attn_fn": (24, 16384), "layers.0.hc_ffn_scale": (3,),
        "layers.0.ffn.gate.tid2eid": (129280, 6), "layers.3.ffn.gate.bias": (256,),
        "layers.0.ffn.experts.3.w1.weight": (2048, 4096), "layers.0.ffn.experts.3.w2.weight": (4096, 2048),
        "layers.0.ffn.shared_experts.w2.weight": (4096, 2048),
        "layers.2.attn.compressor.wkv.weight": (1024, 4096), "layers.2.attn.compressor.ape": (4, 1024),
        "layers.2.attn.indexer.wq_b.weight": (8192, 1024), "layers.2.attn.indexer.weights_proj.weight": (64, 4096),
        "layers.2.attn.indexer.compressor.ape": (4, 256), "layers.3.attn.compressor.ape": (128, 512),
        "mtp.0.e_proj.weight": (4096, 4096), "mtp.0.hc_head_fn": (4, 16384), "mtp.0.norm.weight": (4096,),
        "mtp.0.enorm.weight": (4096,), "mtp.0.ffn.gate.bias": (256,),
    }
    for k, v in expect.items():
        assert shapes.get(k) == v, k
    assert "layers.0.attn.compressor.wkv.weight" not in shapes and "layers.3.attn.indexer.wq_b.weight" not in shapes
    assert "mtp.0.attn.compressor.ape" not in shapes and "mtp.0.ffn.gate.tid2eid" not in shapes


def test_input_errors_name_the_problem(tiny_model):
    with pytest.raises(ValueError, match="input_ids: values must be in"):
        tiny_model(torch.tensor([[1, 512]]))
    _, st = tiny_model(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="batch 1 does not match input_ids batch 2"):
        tiny_model(torch.tensor([[1], [2]]), st)
    st["pos"] = torch.tensor([1020])
    with pytest.raises(ValueError, match="exceeds max_seq_len=1024"):
        tiny_model(torch.ones(1, 5, dtype=torch.int64), st)


def test_last_only_logits_are_the_last_real_positions(tiny_noq):
    """step(last_only=True) gives the last position's logits of the full step (within 1e-5: the head's matmul
    over 1 row rounds differently than over 150), with right padding (lengths) each row's last real token's; the
    state is bit-identical either way."""
    from dsv4.models.state import init_state

    ids = torch.tensor([IDS_400[0, :150].tolist(), IDS_400[0, 150:300].tolist()])
    lengths = torch.tensor([150, 77])
    with torch.no_grad():
        full, st, _ = tiny_noq.step(ids, init_state(tiny_noq.args, 2))
        last, st_last, _ = tiny_noq.step(ids, init_state(tiny_noq.args, 2), last_only=True)
        pad, _, _ = tiny_noq.step(ids, init_state(tiny_noq.args, 2), lengths)
        pad_last, _, _ = tiny_noq.step(ids, init_state(tiny_noq.args, 2), lengths, last_only=True)
    assert last.shape == (2, 1, tiny_noq.args.vocab_size) and (last - full[:, -1:]).abs().max() <= 1e-5
    assert all(torch.equal(st[k], st_last[k]) for k in st)
    assert (pad_last[0, 0] - pad[0, 149]).abs().max() <= 1e-5 and (pad_last[1, 0] - pad[1, 76]).abs().max() <= 1e-5
    assert (pad_last[1, 0] - pad[1, -1]).abs().max() > 0.1  # the padding's position is not what comes back
