"""The three quantisation simulations (SPEC §7.4) as three switches, and the FP8 activation rounding decided per
linear by how its weight is stored (models/stored.py, docs/quant_sim.md)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.models import DeepseekV4, init_random_, preset, quant
from dsv4.models.checkpoint import load_model, round_like_checkpoint_, validate
from dsv4.models.checkpoint_io import INDEX
from dsv4.models.checkpoint_write import write_synthetic
from dsv4.models.config import ConfigError, ModelArgs, simulations
from dsv4.models.state import float_view
from dsv4.runtimes.verdict import tolerance_for

IDS = torch.randint(0, 512, (1, 130), generator=torch.Generator().manual_seed(11))
OFF = dict(act_quant_sim=False, kv_quant_sim=False, index_quant_sim=False)
ON = dict(act_quant_sim=True, kv_quant_sim=True, index_quant_sim=True)


def run(args: ModelArgs, dtype=torch.float32, ids=IDS):
    """(logits, state) with compact caches as their float values (models/state.float_view)."""
    m = init_random_(DeepseekV4(args, dtype), seed=0).eval()
    with torch.no_grad():
        lg, st = m(ids)
    return lg, float_view(st, args, dtype)


# ---- the switches ------------------------------------------------------------------------------------------------
def test_switches_default_to_quant_sim():
    assert (preset("tiny").sim_act, preset("tiny").sim_kv, preset("tiny").sim_index) == (True, True, True)
    a = preset("tiny", quant_sim=False)
    assert (a.sim_act, a.sim_kv, a.sim_index) == (False, False, False)
    b = preset("tiny", quant_sim=False, kv_quant_sim=True)
    assert (b.sim_act, b.sim_kv, b.sim_index) == (False, True, False)
    assert b.with_(quant_sim=True).sim_act and not b.with_(kv_quant_sim=False).sim_kv
    with pytest.raises(ConfigError, match="act_quant_sim: expected true or false"):
        preset("tiny", act_quant_sim=1)
    # a manifest's config: written before the switches existed, or with them
    assert simulations({"quant_sim": False}) == {"act": False, "kv": False, "index": False}
    assert simulations({"quant_sim": False, "index_quant_sim": True})["index"]
    assert simulations({"quant_sim": True, **OFF}) == {"act": False, "kv": False, "index": False}


def test_verdict_key_is_any_simulation():
    man = {"dtype": "float32", "config": {"quant_sim": True}}
    assert tolerance_for(man)[0] == ("float32", True)
    assert tolerance_for(man | {"config": {"quant_sim": True, **OFF}})[0] == ("float32", False)
    assert tolerance_for(man | {"config": {"quant_sim": False, "kv_quant_sim": True}})[0] == ("float32", True)


# values of the model before the switches existed (commit 80e7557, quant_sim True / False), fp64 so that no
# rounding decision depends on the machine: |logits| sum, |1.index|, |2.kv|, |0.window| after a 130-token prefill
OLD = {True: (53765.08464640588, 3295.125, 100.988782439913, 12999.048179185966),
       False: (53715.91651960901, 3254.0947768375067, 100.84677444404036, 12997.399693028965)}


@pytest.mark.slow
@pytest.mark.parametrize("qs", [True, False])
def test_all_on_all_off_equal_the_old_quant_sim(qs):
    """quant_sim=True/False alone equals the old single switch (fp64 golden values) and the three switches set
    explicitly to the same value."""
    lg, st = run(preset("tiny", quant_sim=qs), torch.float64)
    got = (lg.abs().sum(), st["1.index"].abs().sum(), st["2.kv"].abs().sum(), st["0.window"].abs().sum())
    for g, want in zip(got, OLD[qs]):
        assert float(g) == pytest.approx(want, rel=1e-10)
    lg2, st2 = run(preset("tiny", quant_sim=not qs, **(ON if qs else OFF)), torch.float64)
    assert torch.equal(lg, lg2) and all(torch.equal(st[k], st2[k]) for k in st)


def on_grid(x: torch.Tensor, qdq) -> bool:
    return torch.equal(qdq(x), x)


def test_each_switch_changes_only_its_part(monkeypatch):
    """One switch on, the others off: only that simulation's rounding runs (counted per quantiser and block) and
    only its tensors land on their grid (KV nope dims on FP8 per 64, indexer keys on FP4 per 32)."""
    calls: list[str] = []
    fp8, fp4 = quant.fp8_act_qdq, quant.fp4_act_qdq
    blocks8, blocks4 = quant.fp8_blocks, quant.fp4_blocks  # every rounding (qdq or compact state codes) runs these

    def count8(x, block):
        calls.append(f"fp8/{block}")
        return blocks8(x, block)

    def count4(x, block):
        calls.append(f"fp4/{block}")
        return blocks4(x, block)

    monkeypatch.setattr(quant, "fp8_blocks", count8)
    monkeypatch.setattr(quant, "fp4_blocks", count4)
    ids = IDS  # 32 CSA entries > index_topk 16: the indexer rounding changes the selection
    base = preset("tiny", quant_sim=False)
    nope = base.nope_head_dim
    kv_grid = lambda t: on_grid(t[..., :nope], lambda v: fp8(v, 64))  # noqa: E731
    index_grid = lambda t: on_grid(t, lambda v: fp4(v, 32))  # noqa: E731
    want = {"act_quant_sim": {"fp8/128"}, "kv_quant_sim": {"fp8/64"}, "index_quant_sim": {"fp4/32"}}
    lg0, st0 = run(base, ids=ids)
    assert not calls and not kv_grid(st0["0.window"]) and not index_grid(st0["1.index"][:, :10])
    for switch, kinds in want.items():
        calls.clear()
        lg, st = run(base.with_(**{switch: True}), ids=ids)
        assert set(calls) == kinds, switch
        assert (lg - lg0).abs().max() > 1e-4, switch  # it matters
        assert kv_grid(st["0.window"]) == (switch == "kv_quant_sim"), switch
        assert kv_grid(st["1.kv"][:, :10]) == (switch == "kv_quant_sim"), switch
        assert index_grid(st["1.index"][:, :10]) == (switch == "index_quant_sim"), switch


# ---- activation rounding by stored format -------------------------------------------------------------------------
def to_bf16_linears(d):
    """Dequantise every FP8-stored projection of checkpoint `d` to BF16 (exact: 3 mantissa bits) and drop its scale;
    the MXFP4 routed experts stay as they are (a common conversion of the release)."""
    wm = json.loads((d / INDEX).read_text())["weight_map"]
    for f in sorted(set(wm.values())):
        sd = load_file(d / f)
        for n in [n for n in sd if n.endswith(".scale") and sd[n[:-5] + "weight"].dtype == torch.float8_e4m3fn]:
            w = n[:-5] + "weight"
            sd[w] = quant.fp8_block_dequant(sd[w], sd.pop(n)).to(torch.bfloat16)
            del wm[n]
        save_file(sd, d / f, metadata={"format": "pt"})
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


@pytest.fixture(scope="module")
def q64(tmp_path_factory):
    """tiny with q_lora_rank 64 (not a multiple of the FP8 activation block): (FP8 checkpoint, BF16-linears copy)."""
    args = preset("tiny", n_layers=2, q_lora_rank=64)
    root = tmp_path_factory.mktemp("q64")
    fp8 = write_synthetic(args, root / "fp8", seed=2, progress=False)
    return args, fp8, to_bf16_linears(shutil.copytree(fp8, root / "bf16"))


def test_bf16_linears_with_odd_q_lora_rank_load_and_run(q64):
    args, fp8, bf16 = q64
    assert validate(bf16).ok
    m = load_model(bf16, progress=False)  # the defaults: every simulation on
    assert (m.args.sim_act, m.args.sim_kv, m.args.sim_index) == (True, True, True)
    attn, ffn = m.layers[1].attn, m.layers[1].ffn
    assert attn.wq_b.stored == "float" and not attn.wq_b.act_quant and not ffn.shared_experts.w1.act_quant
    assert attn.indexer.wq_b.stored == "float" and not m.mtp[0].e_proj.act_quant
    assert ffn.experts[0].w1.stored == "fp4" and ffn.experts[0].w1.act_quant  # MXFP4 experts keep the rounding
    with torch.no_grad():
        lg, st = m(IDS)
        lg2, _ = m(IDS[:, :1], st)
    assert torch.isfinite(lg).all() and torch.isfinite(lg2).all() and lg.abs().max() > 0.1
    # every simulation off: the float model (weights rounded as the checkpoint stores them) within 1e-4
    off = load_model(bf16, progress=False, quant_sim=False)
    ref = round_like_checkpoint_(init_random_(DeepseekV4(args.with_(quant_sim=False)), seed=2)).eval()
    with torch.no_grad():
        assert (off(IDS)[0] - ref(IDS)[0]).abs().max() <= 1e-4
        assert (off(IDS)[0] - lg).abs().max() > 1e-4  # the KV / indexer / expert simulations did run by default


def test_fp8_linears_with_odd_q_lora_rank_are_refused_by_name(q64):
    args, fp8, _ = q64
    with pytest.raises(ConfigError, match=r"q_lora_rank: 64 is not a multiple of 128, the FP8 activation block in "
                                          r"front of layers\.0\.attn\.wq_b \(stored fp8\) and \d+ more"):
        load_model(fp8, progress=False)
    assert load_model(fp8, progress=False, act_quant_sim=False).args.sim_kv  # the other two stay on
    with pytest.raises(ConfigError, match="q_lora_rank: 64 is not a multiple of 128"):
        run(args)  # a random model is stored as the release: refused at its first call


def test_mixed_float_and_packed_experts_are_refused(q64, tmp_path):
    _, fp8, _ = q64
    d = shutil.copytree(fp8, tmp_path / "mixed")
    wm = json.loads((d / INDEX).read_text())["weight_map"]
    name = "layers.1.ffn.experts.3.w2.weight"
    sd = load_file(d / wm[name])
    sd[name] = quant.mxfp4_dequant(sd[name].view(torch.uint8), sd.pop(name[:-6] + "scale")).to(torch.bfloat16)
    save_file(sd, d / wm[name], metadata={"format": "pt"})
    del wm[name[:-6] + "scale"]
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    probs = validate(d).problems
    assert [p.kind for p in probs] == ["experts"] and "stored as floats" in probs[0].detail


@pytest.mark.slow
def test_export_follows_stored_formats_and_switches(q64, tmp_path):
    """The BF16-linears q_lora_rank-64 checkpoint exports (the traced skeleton knows each linear's stored format)
    with only the activation simulation on, which then runs only in front of the MXFP4 experts; the manifest
    carries the switches, parity rebuilds the eager model with them and passes."""
    from dsv4.export.export import export_artifact
    from dsv4.runtimes.parity import run_parity
    from dsv4.runtimes.tvm.library import export_command

    _, _, bf16 = q64
    res = export_artifact(tmp_path / "art", checkpoint=bf16, quant_sim=False, quant_sims={"act_quant_sim": True},
                          max_seq_len=512, progress=False)
    cfg = res.manifest["config"]
    assert (cfg["quant_sim"], cfg["act_quant_sim"], cfg["kv_quant_sim"]) == (False, True, None)
    assert simulations(cfg) == {"act": True, "kv": False, "index": False}
    assert "--no-quant-sim" in export_command(res.manifest, "tvm-llvm")
    rep = run_parity(res.path, steps=8, prompt_len=130)
    assert rep.ok, rep
    with pytest.raises(ValueError, match="quant_sims: unknown switch 'kv'"):
        export_artifact(tmp_path / "bad", checkpoint=bf16, quant_sims={"kv": False})
