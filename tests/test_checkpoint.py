"""models/checkpoint*.py: the official checkpoint format written, validated and loaded (SPEC §7)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.models import DeepseekV4, init_random_, preset, quant, synthetic
from dsv4.models.checkpoint import (
    CheckpointError,
    checkpoint_totals,
    expected_tensors,
    load_model,
    official_totals,
    round_like_checkpoint_,
    validate,
)
from dsv4.models.checkpoint_io import INDEX, read_header
from dsv4.models.checkpoint_write import parse_size, write_synthetic
from dsv4.models.model import Linear
from dsv4.models.stored import set_stored
from dsv4.tools.cli import main as cli

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]


def weight_map(d: Path) -> dict[str, str]:
    return json.loads((d / INDEX).read_text())["weight_map"]


# ---- the table ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,layers", [("tiny", None), ("flash", 3), ("pro", 3)])
def test_table_matches_model(name, layers):
    """expected_tensors(args) names every official tensor of DeepseekV4 with its shape and each Linear's format."""
    args = preset(name, **({"n_layers": layers} if layers else {}))
    with torch.device("meta"):
        m = DeepseekV4(args)
    table = expected_tensors(args)
    got = {n: tuple(t.shape) for n, t in m.named_official_tensors()}
    assert got == {n: s.shape for n, s in table.items()}
    for mod_name, mod in m.named_modules():
        if isinstance(mod, Linear):
            assert table[mod_name + ".weight"].fmt == mod.fmt, mod_name


def test_table_spec_shapes_flash():
    """SPEC §7.1/§7.3 shapes of Flash: FP8 tile scales and MXFP4 experts."""
    t = expected_tensors(preset("flash", n_layers=4))
    assert t["layers.2.attn.wq_b.weight"].layout("F8_E4M3") == ((32768, 1024), (256, 8))
    assert t["layers.0.ffn.experts.5.w1.weight"].layout("I8") == ((2048, 2048), (2048, 128))
    assert t["layers.0.ffn.experts.5.w2.weight"].layout("I8") == ((4096, 1024), (4096, 64))
    assert t["layers.0.ffn.gate.tid2eid"].shape == (129280, 6) and "layers.3.ffn.gate.tid2eid" not in t
    assert t["layers.3.ffn.gate.bias"].fmt == "f32" and t["layers.2.attn.compressor.ape"].shape == (4, 1024)
    assert t["layers.0.attn.wo_a.weight"].shape == (8192, 4096) and t["mtp.0.e_proj.weight"].fmt == "fp8"
    assert t["layers.0.attn.wq_a.weight"].layout("BF16") == ((1024, 4096), None)  # dequantised "Base" form
    assert t["layers.0.attn.wq_a.weight"].layout("I8") is None and t["layers.0.hc_attn_fn"].layout("BF16") is None


@pytest.mark.parametrize("name,tensors,gib", [("flash", 69_187, 148.65), ("pro", 145_116, 805.32)])
def test_official_totals_match_release_listings(name, tensors, gib):
    """The table reproduces the released checkpoints' tensor counts and payload (SPEC §0 [CKPT])."""
    tot = official_totals(preset(name))
    assert sum(v["tensors"] for v in tot.values()) == tensors
    assert abs(sum(v["bytes"] for v in tot.values()) / 2**30 - gib) < 0.01
    assert set(tot) == {"BF16", "F32", "F8_E4M3", "F8_E8M0", "I64", "I8"} and tot["I64"]["tensors"] == 3


# ---- the written files ------------------------------------------------------------------------------------------
def test_synthetic_checkpoint_layout(tiny_checkpoint):
    """Official dtypes, index consistent with the shards, config.json reads back to the same ModelArgs."""
    args = preset("tiny")
    assert json.loads((tiny_checkpoint / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    from dsv4.models.config import ModelArgs

    assert ModelArgs.from_hf_config(tiny_checkpoint) == args  # capacity included: max_position_embeddings
    index = json.loads((tiny_checkpoint / INDEX).read_text())
    wm = index["weight_map"]
    files = sorted(set(wm.values()))
    assert len(files) > 2 and files == sorted(p.name for p in tiny_checkpoint.glob("*.safetensors"))
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    mtp, main = {wm[n] for n in wm if n.startswith("mtp.")}, {wm[n] for n in wm if not n.startswith("mtp.")}
    assert max(main) < min(mtp) and files[-1] in mtp  # the MTP block in the last shard(s), as released
    dtypes, total = {}, 0
    for f in files:
        header, _ = read_header(tiny_checkpoint / f)
        for n, info in header.items():
            if n != "__metadata__":
                dtypes[n] = (info["dtype"], tuple(info["shape"]))
                total += info["data_offsets"][1] - info["data_offsets"][0]
    assert set(dtypes) == set(wm) and index["metadata"]["total_size"] == total
    assert dtypes["embed.weight"] == ("BF16", (512, 128)) and dtypes["layers.0.hc_attn_fn"] == ("F32", (24, 512))
    assert dtypes["layers.0.attn.wq_b.weight"] == ("F8_E4M3", (512, 128))
    assert dtypes["layers.0.attn.wq_b.scale"] == ("F8_E8M0", (4, 1))
    assert dtypes["layers.1.ffn.experts.7.w2.weight"] == ("I8", (128, 64))
    assert dtypes["layers.1.ffn.experts.7.w2.scale"] == ("F8_E8M0", (128, 4))
    assert dtypes["layers.0.ffn.gate.tid2eid"] == ("I64", (512, 2)) and dtypes["layers.3.ffn.gate.bias"][0] == "F32"
    # the safetensors library itself reads our streamed shards
    sd = load_file(tiny_checkpoint / wm["layers.0.attn.wq_b.weight"])
    assert sd["layers.0.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert sd["layers.0.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu


def test_stored_bytes_are_the_quantised_synthetic_values(tiny_checkpoint):
    """FP8 / MXFP4 / BF16 bytes equal quant.py applied to synthetic_tensor (bit for bit)."""
    args, wm = preset("tiny"), weight_map(tiny_checkpoint)
    for name in ("layers.2.attn.wo_a.weight", "layers.3.ffn.experts.1.w1.weight", "norm.weight"):
        sd = load_file(tiny_checkpoint / wm[name])
        spec = expected_tensors(args)[name]
        v = synthetic.synthetic_tensor(name, spec.shape, 0, args)
        if spec.fmt == "fp8":
            q, s = quant.fp8_block_quantize(v)
            assert torch.equal(sd[name].view(torch.uint8), q.view(torch.uint8))
        elif spec.fmt == "fp4":
            q, s = quant.mxfp4_quantize(v)
            assert torch.equal(sd[name].view(torch.uint8), q)
        else:
            assert torch.equal(sd[name], v.to(torch.bfloat16))
            continue
        assert torch.equal(sd[spec.scale_name].view(torch.uint8), s)


# ---- loading ----------------------------------------------------------------------------------------------------
def test_packed_and_dequantised_loads_agree(tiny_checkpoint):
    """Packed vs dequantised loading: max |Δlogits| <= 1e-5 (fp32); both equal init_random_ + the same rounding."""
    packed = DeepseekV4.from_pretrained(tiny_checkpoint, keep_quantized=True)
    dense = DeepseekV4.from_pretrained(tiny_checkpoint, keep_quantized=False)
    ref = round_like_checkpoint_(init_random_(DeepseekV4(preset("tiny")), seed=0)).eval()
    assert packed.layers[0].attn.wq_a.packed and packed.layers[1].ffn.experts[3].w2.packed
    assert packed.layers[1].ffn.experts[3].w2.weight.shape == (128, 64)
    assert packed.layers[1].ffn.experts[3].w2.weight.dtype == torch.uint8
    assert not dense.layers[0].attn.wq_a.packed and dense.layers[0].attn.wq_a.weight.dtype == torch.float32
    lp, ld, lr = logits(packed), logits(dense), logits(ref)
    assert lp.abs().max() > 0.1  # a real signal, not zeros
    assert (lp - ld).abs().max().item() <= 1e-5
    assert (ld - lr).abs().max().item() <= 1e-5
    for (n, a), (_, b) in zip(dense.named_official_tensors(), ref.named_official_tensors()):
        assert torch.equal(a, b), n


def test_chunked_generation_equals_whole(tmp_path, monkeypatch):
    """With 128-row chunks (as the Flash embedding gets), writer and init_random_ still agree exactly."""
    monkeypatch.setattr(synthetic, "CHUNK_ELEMS", 128 * 128)
    args = preset("tiny", n_layers=2)
    d = write_synthetic(args, tmp_path / "c", seed=3, progress=False)
    assert synthetic.chunk_rows((512, 128)) == 128
    ref = round_like_checkpoint_(init_random_(DeepseekV4(args), seed=3)).eval()
    got = load_model(d, keep_quantized=True)
    torch.testing.assert_close(logits(got), logits(ref), rtol=0, atol=1e-5)


def test_fp8_experts_detected_from_tensors(tmp_path):
    """Routed experts stored as FP8 blocks load as such even when config.json has no expert_dtype (SPEC §1.1)."""
    args = preset("tiny", n_layers=2, expert_dtype="fp8")
    d = write_synthetic(args, tmp_path / "c", seed=1, progress=False)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["expert_dtype"]
    (d / "config.json").write_text(json.dumps(cfg))
    rep = validate(d)
    assert rep.ok and rep.args.expert_dtype == "fp8"
    packed = load_model(d, keep_quantized=True)
    assert packed.args.expert_dtype == "fp8" and packed.layers[0].ffn.experts[0].w1.weight.shape == (128, 128)
    ref = round_like_checkpoint_(init_random_(DeepseekV4(args), seed=1)).eval()
    assert (logits(packed) - logits(ref)).abs().max().item() <= 1e-5


def test_dequantised_base_checkpoint_loads(tiny_checkpoint, tmp_path):
    """Plain BF16 weights where the release has FP8 (and no .scale) are accepted and give the same model."""
    d = shutil.copytree(tiny_checkpoint, tmp_path / "base")
    for f in sorted(set(weight_map(d).values())):
        sd = load_file(d / f)
        for n in [n for n in sd if n.endswith(".scale") and sd[n[:-5] + "weight"].dtype == torch.float8_e4m3fn]:
            w = n[:-5] + "weight"
            sd[w] = quant.fp8_block_dequant(sd[w], sd.pop(n)).to(torch.bfloat16)  # exact: 3 mantissa bits
        save_file(sd, d / f, metadata={"format": "pt"})
    wm = {n: f for n, f in weight_map(d).items() if not (n.endswith(".scale") and ".experts." not in n)}
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert validate(d).ok, validate(d).problems
    got = load_model(d, keep_quantized=True)
    assert not got.layers[0].attn.wq_a.packed and got.layers[0].ffn.experts[0].w1.packed
    ref = load_model(tiny_checkpoint, keep_quantized=True)
    assert (logits(got) - logits(ref)).abs().max().item() > 1e-3  # no FP8 activation rounding before BF16 weights
    set_stored(ref, lambda n: "float" if ".experts." not in n else None)  # ... as the reference (models/stored.py)
    assert (logits(got) - logits(ref)).abs().max().item() <= 1e-5


def test_capacity_comes_from_the_config_unless_given(tmp_path, capsys):
    """A checkpoint whose config.json says max_position_embeddings 1,048,576 (as the release) loads with that
    capacity; max_seq_len given wins, and the state is allocated at the capacity asked (docs/capacity.md)."""
    d = write_synthetic(preset("tiny", n_layers=2, n_mtp_layers=0), tmp_path / "c", seed=0, progress=False)
    assert load_model(d).args.max_seq_len == 1024  # a synthetic tiny carries its preset's capacity
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 1048576}))
    assert load_model(d).args.max_seq_len == 1048576
    small = load_model(d, max_seq_len=256)
    with torch.no_grad():
        _, st = small(IDS)
    # compact state (docs/state_layout.md): tiny's 64 nope dims as FP8 codes, 128 indexer dims as 64 MXFP4 bytes
    assert small.args.max_seq_len == 256 and st["1.kv_fp8"].shape == (2, 64, 64) and st["1.index_fp4"].shape == (2, 64, 64)
    assert cli(["info", str(d)]) == 0 and "1048576" in capsys.readouterr().out


def test_index_less_single_file_checkpoint(tmp_path):
    d = write_synthetic(preset("tiny", n_layers=2, n_mtp_layers=0), tmp_path / "one", shard_size="1GB", progress=False)
    (d / INDEX).unlink()
    assert len(list(d.glob("*.safetensors"))) == 1 and validate(d).ok
    assert load_model(d).args.n_layers == 2


# ---- corrupted checkpoints: one clear problem each, naming tensor and file ---------------------------------------
def edit(d: Path, name: str, fn) -> str:
    """Apply fn(state_dict) to the shard holding `name`; the index follows added/removed tensors."""
    wm = weight_map(d)
    f = wm[name]
    sd = load_file(d / f)
    before = set(sd)
    fn(sd)
    save_file(sd, d / f, metadata={"format": "pt"})
    for n in before - set(sd):
        del wm[n]
    for n in set(sd) - before:
        wm[n] = f
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return f


def last_tensor(path: Path) -> str:
    header, _ = read_header(path)
    return max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])


def corrupt(case: str, d: Path) -> tuple[str, str, str]:
    """Damage the copy `d`; returns (problem kind, tensor that must be named, file that must be named)."""
    wm = weight_map(d)
    if case == "missing tensor":
        n = "layers.1.ffn.gate.weight"
        edit(d, n, lambda sd: sd.pop(n))
        return "missing", n, INDEX
    if case == "extra tensor":
        return "unexpected", "layers.0.attn.bogus", edit(d, "norm.weight", lambda sd: sd.update(
            {"layers.0.attn.bogus": torch.zeros(3)}))
    if case == "wrong shape":
        n = "layers.2.attn.attn_sink"
        return "shape", n, edit(d, n, lambda sd: sd.update({n: torch.zeros(5)}))
    if case == "wrong dtype":
        n = "layers.1.attn.wq_a.weight"
        return "dtype", n, edit(d, n, lambda sd: sd.update({n: sd[n].view(torch.int8)}))
    if case == "wrong dtype f32":
        n = "layers.0.hc_ffn_fn"
        return "dtype", n, edit(d, n, lambda sd: sd.update({n: sd[n].to(torch.bfloat16)}))
    if case == "scale shape":
        n = "layers.0.attn.wq_b.scale"
        return "scale", n, edit(d, n, lambda sd: sd.update({n: torch.cat([sd[n], sd[n]], 1)}))
    if case == "missing scale":
        n = "layers.3.ffn.experts.2.w3.scale"
        return "scale", n, edit(d, n, lambda sd: sd.pop(n))
    if case == "truncated shard":
        f = wm["layers.2.attn.wq_a.weight"]
        with open(d / f, "r+b") as fh:
            fh.truncate((d / f).stat().st_size - 1)
        return "shard", last_tensor(d / f), f
    if case == "index points to a missing file":
        f = wm["layers.3.attn.wkv.weight"]
        (d / f).rename(d / (f + ".moved"))
        return "shard", sorted(n for n in wm if wm[n] == f)[0], f
    if case == "bytes after the last tensor":
        f = wm["norm.weight"]
        with open(d / f, "ab") as fh:
            fh.write(b"\0" * 16)
        return "shard", "", f
    if case == "garbage header":
        f = wm["layers.0.attn.wkv.weight"]
        with open(d / f, "r+b") as fh:
            fh.seek(8)
            fh.write(b"not json")
        return "shard", "layers.0.attn.wkv.weight", f
    if case == "index escapes the directory":
        n = "layers.3.ffn_norm.weight"
        wm[n] = "../" + wm[n]
        (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        return "shard", n, wm[n]
    if case == "tensor not in the index":
        n = "layers.2.attn.compressor.ape"
        f = wm.pop(n)
        (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        return "index", n, f
    if case == "nan in bf16":
        n = "layers.1.ffn_norm.weight"
        return "values", n, edit(d, n, lambda sd: sd[n].__setitem__(5, float("nan")))
    if case == "inf in f32":
        n = "mtp.0.hc_head_base"
        return "values", n, edit(d, n, lambda sd: sd[n].__setitem__(0, float("-inf")))
    raise AssertionError(case)


CASES = ["missing tensor", "extra tensor", "wrong shape", "wrong dtype", "wrong dtype f32", "scale shape",
         "missing scale", "truncated shard", "index points to a missing file", "nan in bf16", "inf in f32",
         "bytes after the last tensor", "garbage header", "index escapes the directory", "tensor not in the index"]


@pytest.mark.parametrize("case", CASES)
def test_corrupted_checkpoint_one_clear_error(case, tiny_checkpoint, tmp_path, capsys):
    d = shutil.copytree(tiny_checkpoint, tmp_path / "bad")
    kind, tensor, file = corrupt(case, d)
    values = kind == "values"
    if values:
        assert validate(d).ok  # values are only read when asked
    rep = validate(d, check_values=values)
    assert len(rep.problems) == 1, [str(p) for p in rep.problems]
    p = rep.problems[0]
    assert p.kind == kind and tensor in p.tensor and p.file == file and tensor in str(p) and file in str(p)
    with pytest.raises(CheckpointError) as e:
        load_model(d, check_values=values)
    assert e.value.problems == rep.problems and tensor in str(e.value) and isinstance(e.value, ValueError)
    assert cli(["checkpoint", "verify", str(d), "--no-progress"] + (["--check-values"] if values else [])) == 1
    out = capsys.readouterr().out
    assert "1 problem" in out and kind in out


def test_config_problem_reported(tiny_checkpoint, tmp_path):
    d = shutil.copytree(tiny_checkpoint, tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    rep = validate(d)
    assert [(p.kind, p.file) for p in rep.problems] == [("config", "config.json")] and "hidden_size" in rep.problems[0].detail


def test_many_problems_reported_at_once(tiny_checkpoint, tmp_path):
    d = shutil.copytree(tiny_checkpoint, tmp_path / "many")
    for case in ("missing tensor", "wrong shape", "extra tensor"):
        corrupt(case, d)
    assert sorted(p.kind for p in validate(d).problems) == ["missing", "shape", "unexpected"]


# ---- CLI, atomic writes, sizes ------------------------------------------------------------------------------------
def test_cli_make_verify_and_totals(tmp_path, capsys):
    out = tmp_path / "ck"
    assert cli(["checkpoint", "make", "--preset", "tiny", "--layers", "2", "--seed", "5", "--shard-size", "1MB",
                "--out", str(out), "--no-progress"]) == 0
    assert cli(["checkpoint", "verify", str(out), "--check-values", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "OK" in text and "F8_E8M0" in text and "I8" in text
    tot = checkpoint_totals(out)
    assert sum(v["bytes"] for v in tot.values()) == json.loads((out / INDEX).read_text())["metadata"]["total_size"]
    assert cli(["checkpoint", "make", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 2  # exists
    assert cli(["checkpoint", "verify", str(tmp_path / "nope"), "--no-progress"]) == 2


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """An error in the middle of writing removes the temporary directory; the target never appears."""
    import dsv4.models.checkpoint_write as cw

    real, calls = cw.encode_synthetic, []

    def flaky(spec, seed, args):
        calls.append(spec.name)
        if len(calls) > 40:
            raise RuntimeError("disk on fire")
        return real(spec, seed, args)

    monkeypatch.setattr(cw, "encode_synthetic", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic(preset("tiny"), tmp_path / "x", shard_size="64KB", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path):
    d = write_synthetic(preset("tiny", n_layers=2), tmp_path / "x", seed=0, progress=False)
    with pytest.raises(ValueError, match="exists"):
        write_synthetic(preset("tiny", n_layers=2), d, progress=False)
    write_synthetic(preset("tiny", n_layers=1), d, seed=1, overwrite=True, progress=False)
    assert validate(d).args.n_layers == 1 and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(1000) == 1000
    assert parse_size("1.5kB") == 1500
    for bad in ("two", "5XB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert math.isclose(parse_size("0.5 GB"), 5e8)
