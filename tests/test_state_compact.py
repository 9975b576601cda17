"""The decode state in the paper's compact layout (models/kvstore.py, docs/state_layout.md): FP8 e4m3 KV codes +
E8M0 scales + rope dims, MXFP4 indexer keys; lossless against the simulation, bit for bit."""

from __future__ import annotations

import pytest
import torch

from dsv4.export.signature import state_layout
from dsv4.export.state_bytes import state_bytes
from dsv4.models import DeepseekV4, preset, quant
from dsv4.models.kvstore import (
    Fp8Rows,
    Mxfp4Keys,
    e2m1_codes,
    e8m0_codes,
    e8m0_table,
    fp8_codes,
    fp8_table,
)
from dsv4.models.state import as_layout, capacity, float_view, init_state, resize, state_entries

BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16}


def bit_mismatches(a: dict, b: dict) -> list[str]:
    """Names of the entries of two states that differ in any bit (floats compared as their IEEE bits: -0 != +0)."""
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    out = []
    for k in sorted(a):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(k)
        elif x.dtype in BITS:
            if not torch.equal(x.view(BITS[x.dtype]), y.view(BITS[y.dtype])):
                out.append(k)
        elif not torch.equal(x, y):
            out.append(k)
    return out


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return bit_mismatches({"t": x}, {"t": y}) == []


# ---- the number formats: every code ----------------------------------------------------------------------------
def test_every_code_round_trips():
    """value(code) -> code for every finite e4m3fn code (incl. subnormals and -0), every e2m1 and E8M0 code."""
    codes = torch.tensor([c for c in range(256) if c not in (127, 255)], dtype=torch.int32).to(torch.uint8)
    for dt in (torch.float32, torch.float64):
        assert torch.equal(fp8_codes(fp8_table()[codes.long()].to(dt)), codes)
        e = torch.arange(255, dtype=torch.int32).to(torch.uint8)
        assert torch.equal(e8m0_codes(e8m0_table()[e.long()].to(dt)), e)
    e2m1 = torch.tensor(quant.E2M1_VALUES)
    assert torch.equal(e2m1_codes(e2m1), torch.arange(16, dtype=torch.int32).to(torch.uint8))
    assert fp8_codes(torch.tensor([-0.0])).item() == 128 and e2m1_codes(torch.tensor([-0.0])).item() == 8


def _hard_rows(shape, dtype, seed=0) -> torch.Tensor:
    """Random rows with the cases that break encoders: zero blocks, tiny and huge blocks, negative zeros, values
    just above a power of two, blocks whose max rounds down onto half the scale (224 s)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    span = 8 if dtype == torch.float16 else 30  # finite inputs (the simulation of inf is NaN, not a code)
    x = x * torch.exp2(torch.randint(-span, span, (*shape[:-1], 1), generator=g).double())
    x[0, :64] = 0.0
    x[1, :64] = -0.0
    x[2, :64] *= 1e-12
    x[3, :64] = torch.nextafter(torch.tensor(2.0**-6, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    x[4, :64] = 0.01
    x[4, 0] = 0.01 * 230 / 224  # amax/s in (224, 240): rounds down to 224 s
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fp8_rows_are_the_kv_simulation(dtype):
    """encode's values = fp8_act_qdq on the nope dims (+ the rope dims as they are) and decode(encode) = those values,
    in every bit; fp16: the values the fp16 model holds (decoded in fp32, then cast, like the simulation)."""
    nope, rope = 192, 64
    x = _hard_rows((64, nope + rope), dtype)
    store = Fp8Rows(nope, rope)
    parts, vals = store.encode(x, dtype)
    sim = torch.cat([quant.fp8_act_qdq(x[..., :nope], 64), x[..., nope:]], -1)
    assert same_bits(vals, sim)
    assert same_bits(store.decode(parts, dtype), sim)
    assert parts["fp8"].dtype == torch.uint8 and parts["scale"].shape == (64, nope // 64)
    assert parts["rope"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mxfp4_keys_are_the_index_simulation(dtype):
    x = _hard_rows((64, 128), dtype, seed=1)
    store = Mxfp4Keys(128)
    parts, vals = store.encode(x, dtype)
    sim = quant.fp4_act_qdq(x, 32)
    assert same_bits(vals, sim) and same_bits(store.decode(parts, dtype), sim)
    # the nibble order of the checkpoint's MXFP4 experts (element 2j low): quant.mxfp4_dequant reads it the same
    assert torch.equal(quant.mxfp4_dequant(parts["fp4"], parts["scale"]).to(dtype), sim)
    assert parts["fp4"].shape == (64, 64) and parts["scale"].shape == (64, 4)


# ---- the model: compact state vs float state, same weights ---------------------------------------------------
@pytest.fixture(scope="module")
def twins(tiny_model):
    """tiny_model (compact state, the default) and the same weights with the float state (compact_state=False)."""
    wide = DeepseekV4(tiny_model.args.with_(compact_state=False)).eval()
    wide.load_state_dict(tiny_model.state_dict())
    return tiny_model, wide


def test_tiny_state_round_trip_is_bit_exact(twins):
    """Prefill 300 tokens (crosses the window, ratio-4 and ratio-128 blocks) + 24 decode steps: the compact state
    decodes to the float state in every bit, and logits are identical: storing the codes loses nothing."""
    compact, wide = twins
    ids = torch.randint(0, compact.args.vocab_size, (2, 300), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        lc, sc = compact(ids)
        lw, sw = wide(ids)
        assert any(v.dtype == torch.uint8 for v in sc.values()) and not any(v.dtype == torch.uint8 for v in sw.values())
        assert same_bits(lc, lw) and bit_mismatches(float_view(sc, compact.args, torch.float32), sw) == []
        for _ in range(24):
            tok = lc[:, -1:].argmax(-1)
            lc, sc = compact(tok, sc)
            lw, sw = wide(tok, sw)
    assert same_bits(lc, lw)
    assert bit_mismatches(float_view(sc, compact.args, torch.float32), sw) == []
    # either layout converts to the other (parity feeds an eager state to an artifact this way): codes -> floats
    # without a bit lost; floats -> codes without a value lost (an indexer key's -0 comes back +0: the FP4
    # simulation itself rounds a -0 input to +0)
    assert bit_mismatches(as_layout(sc, wide.args, torch.float32), sw) == []
    back = float_view(as_layout(sw, compact.args, torch.float32), compact.args, torch.float32)
    assert set(as_layout(sw, compact.args, torch.float32)) == set(sc) and set(back) == set(sw)
    assert all(torch.equal(back[k], sw[k]) for k in sw) and bit_mismatches(back, sw) in ([], ["1.index", "3.index"])
    # the check can fail: one flipped stored code (a written KV row of layer 2, a key of layer 1) is named
    for entry, row in (("2.kv_fp8", 1), ("1.index_fp4", 3), ("0.window_scale", 7)):
        bad = dict(sc)
        bad[entry] = sc[entry].clone()
        bad[entry][0, row, 0] ^= 0x01
        assert bit_mismatches(float_view(bad, compact.args, torch.float32), sw) == [entry.split("_")[0]]


def test_state_entries_and_a_foreign_state(tiny_args):
    """Names, dtypes and widths of the compact entries; a float-layout state given to a compact model is refused
    with the missing entry named."""
    e = {x.name: x for x in state_entries(tiny_args)}
    nope, rope = tiny_args.nope_head_dim, tiny_args.rope_head_dim
    assert (e["0.window_fp8"].shape, e["0.window_fp8"].dtype) == ((128, nope), torch.uint8)
    assert e["0.window_scale"].shape == (128, nope // 64) and e["0.window_rope"].shape == (128, rope)
    assert e["1.kv_fp8"].per_token and e["1.index_fp4"].shape == (1024 // 4, 64) and e["1.index_scale"].shape[1] == 4
    assert "0.window" not in e and "1.kv" not in e
    assert "0.window" in {x.name for x in state_entries(tiny_args.with_(compact_state=False))}
    assert "0.window" in {x.name for x in state_entries(tiny_args.with_(kv_quant_sim=False))}  # nothing to code
    model = DeepseekV4(tiny_args)
    with pytest.raises(KeyError, match="window_fp8"):
        model(torch.zeros(1, 1, dtype=torch.long), init_state(tiny_args.with_(compact_state=False), 1))


# ---- capacity: start small, grow ------------------------------------------------------------------------------
def test_state_grows_without_changing_results(tiny_model):
    """A state allocated for 256 positions, prefilled with 200 tokens and doubled whenever the next step would not
    fit: 120 decode steps (crossing CSA and HCA blocks and the growth) give the logits and, grown to the full
    capacity, the state of the full-capacity run, bit for bit. A step past a state's capacity is refused."""
    args = tiny_model.args
    ids = torch.randint(0, args.vocab_size, (1, 200), generator=torch.Generator().manual_seed(9))
    small = resize(init_state(args, 1), args, 256)
    assert capacity(small, args) == 259 and small["1.kv_fp8"].shape[1] == 64 and small["2.kv_rope"].shape[1] == 2
    with torch.no_grad():
        lf, sf = tiny_model(ids)
        ls, ss = tiny_model(ids, small)
        assert same_bits(lf, ls)
        grown = []
        for _ in range(120):
            tok = lf[:, -1:].argmax(-1)
            if int(ss["pos"].max()) + 1 > capacity(ss, args):
                ss = resize(ss, args, 2 * capacity(ss, args) // 128 * 128)
                grown.append(int(ss["pos"].max()))
            lf, sf = tiny_model(tok, sf)
            ls, ss = tiny_model(tok, ss)
            assert same_bits(lf, ls)
        assert grown == [259] and bit_mismatches(resize(ss, args, args.max_seq_len), sf) == []
        with pytest.raises(ValueError, match="exceeds the state's capacity 259"):
            tiny_model(torch.zeros(1, 60, dtype=torch.long), tiny_model(ids, resize(init_state(args, 1), args, 256))[1])
    with pytest.raises(ValueError, match="capacity 128 < position 320"):
        resize(ss, args, 128)


# ---- bytes per token -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, dtype, want", [("flash", torch.float16, 3508.8), ("pro", torch.float16, 5023.7),
                                               ("flash", torch.float32, 4200.8), ("pro", torch.float32, 6014.7)])
def test_release_bytes_per_token_from_two_layers(name, dtype, want):
    """A 2-layer slice of the release's dims (one CSA, one HCA layer) scaled by the release's layer mix gives the
    whole model's figure; 16-bit: 583 B per KV entry (448 FP8 + 7 scales + 64 x 2 rope) + 68 per key (paper: 3,514
    and 5,031 with the scales padded to 8); fp32 artifacts keep fp32 rope dims."""
    full = preset(name)
    two = preset("flash", n_layers=4).with_(n_layers=2, compress_ratios=(4, 128, 0), n_hash_layers=2)
    cfg = {"compress_ratios": list(two.compress_ratios), "max_seq_len": two.max_seq_len, "head_dim": 512,
           "rope_head_dim": 64, "index_head_dim": 128, "window_size": 128}
    r = state_bytes(cfg, state_layout(two, dtype))["release"][name]
    assert r["missing"] == [] and r["per_token"] == pytest.approx(want, abs=0.05)
    whole = state_bytes(cfg | {"compress_ratios": list(full.compress_ratios)}, state_layout(full, dtype))
    assert whole["per_token"] == pytest.approx(r["per_token"])
    assert r["per_token"] <= {"flash": 3600, "pro": 5100}[name] or dtype == torch.float32


# ---- the artifact --------------------------------------------------------------------------------------------
def test_artifact_state_is_compact_and_reported(tiny_artifact, capsys):
    """tiny as shipped (simulations on): uint8 code entries in the manifest and the graphs, bytes per token / per
    sequence in the manifest and in ``dsv4 inspect``; the manifest's figure is the one state_entries give."""
    from dsv4.export.artifact import inspect_artifact, load_manifest
    from dsv4.tools.cli import main

    man = load_manifest(tiny_artifact, verify=False)
    st = {e["name"]: e for e in man["state"]}
    assert st["2.kv_fp8"]["dtype"] == "uint8" and st["2.kv_rope"]["dtype"] == "float32" and "2.kv" not in st
    dec = {i["name"]: i["dtype"] for i in man["graphs"]["decode"]["inputs"]}
    assert dec["past.1.index_fp4"] == "uint8" and dec["past.0.window_scale"] == "uint8"
    sb = man["state_bytes"]
    # tiny per CSA layer: (64 + 1 + 64 x 4) / 4 + (64 + 4) / 4 = 97.25; HCA: 321 / 128
    assert sb["per_layer_kind"]["csa"]["per_token"] == 97.25 and sb["per_token"] == pytest.approx(2 * 97.25 + 321 / 128)
    assert inspect_artifact(tiny_artifact)["state"]["layout"] == "compact"
    assert main(["inspect", str(tiny_artifact)]) == 0
    out = capsys.readouterr().out
    assert "state (compact layout): 197.0 bytes/token" in out and "one csa layer: 97.25 bytes/token" in out
