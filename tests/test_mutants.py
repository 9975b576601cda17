"""The mutation suite of ``dsv4 parity`` (issue [6]): subtle edits of the default tiny artifact (packed FP8/MXFP4,
quant_sim on, passes on), manifest hashes refreshed so that only the numerical verdict can catch them. Every
mutant must FAIL with the tensor or layer that diverged named; the unmutated artifact must PASS.

The fast tier (make test) judges every mutant against ONE eager reference (eager fp32, its fp64 twin and noise
twins run once: conftest.tiny_packed_reference, 300 prompt tokens + 64 steps, the default mode's); the slow tier
runs ``dsv4 parity`` itself on each (the eager side rebuilt every time, as a user runs it).
"""

from __future__ import annotations

import pytest
from mutants import MUTANTS, make, make_linked

from dsv4.export.artifact import load_manifest
from dsv4.runtimes.parity import run_parity


@pytest.fixture(scope="module")
def reference(tiny_packed_reference):
    return tiny_packed_reference


@pytest.fixture(scope="module")
def mutant(tiny_artifact_default, tmp_path_factory):
    made: dict = {}

    def get(name):
        if name not in made:
            made[name] = make(tiny_artifact_default, tmp_path_factory.mktemp("mutant") / name, name)
        return made[name]
    return get


def test_the_unmutated_default_artifact_passes(tiny_artifact_default, reference):
    rep = run_parity(tiny_artifact_default, reference=reference, per_layer=True, threads=1)
    assert rep.ok, rep.summary()
    assert rep.summary() == "PASS" and rep.first_divergent_layer is None
    judged = [r for r in rep.rows if r.quantiles]
    assert len(judged) > 40 and all(r.criterion for r in rep.rows)
    logits = next(r for r in rep.rows if r.name == "decode.logits")
    assert logits.quantiles["p90"] <= 1e-4 and logits.share_out <= 0.05  # teacher-forced steps: fp32 noise


# what each mutant must be reported for: a row that must fail, and the first divergent layer where the acceptance
# names one (kv_norm) or the edit's layer is the first the eager model's data flow reaches (rope)
EXPECT = {
    "norm": ("decode.logits", None),
    "kv_norm": ("decode.layer1", 1),
    "route_scale": ("decode.logits", None),
    "sinkhorn": ("decode.logits", None),
    "rope": ("decode.layer1", 1),
    "indexer_topk": ("decode.logits", None),
    "e8m0": ("decode.logits", None),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_fails_and_names_what_diverged(name, mutant, reference):
    art = mutant(name)
    load_manifest(art, verify=True)  # the hashes were refreshed: only the numbers can tell
    rep = run_parity(art, reference=reference, per_layer=True, threads=1)
    row, layer = EXPECT[name]
    assert not rep.ok, f"{name} ({MUTANTS[name][0]}) passed parity"
    assert row in rep.diverged, (name, rep.summary())
    if layer is not None:
        assert rep.first_divergent_layer == layer, (name, rep.summary())
    assert rep.summary().startswith("FAIL: diverged: ") and row in rep.summary()
    assert all(r.failed for r in rep.rows if not r.ok)


def test_a_linked_mutant_shares_the_weights_file_and_fails(tiny_artifact_default, tmp_path, reference):
    """make_linked (benchmarks/flash_parity.py --mutant, real-size slices): graph files copied and edited, the
    weights file hard-linked and untouched; the kv_norm edit fails as the copied mutant does, on layer 1."""
    import os

    src = tiny_artifact_default
    before = (src / "weights.data").read_bytes()
    art = make_linked(src, tmp_path / "kv_norm", "kv_norm")
    assert os.stat(art / "weights.data").st_ino == os.stat(src / "weights.data").st_ino
    assert (src / "weights.data").read_bytes() == before
    load_manifest(art, verify=True)
    rep = run_parity(art, reference=reference, threads=1)
    assert not rep.ok and "decode.1.window" in rep.diverged and rep.first_divergent_layer == 1, rep.summary()


def test_sinkhorn_edit_of_the_raw_graph_fails(tiny_artifact, tmp_path, reference):
    """The edit as measured in the issue: the raw graph's dsv4.HcSplitSinkhorn node with iters=5 in decode.onnx."""
    art = make(tiny_artifact, tmp_path / "raw_sinkhorn", "sinkhorn")
    rep = run_parity(art, reference=reference, threads=1)
    assert not rep.ok and "decode.logits" in rep.diverged, rep.summary()


def test_per_layer_cli_names_layer_1_for_the_kv_norm_edit(mutant, capsys):
    """``dsv4 parity ART --per-layer`` on the layers.1 kv_norm mutant: exit 1, layer 1 named first, one problem a line."""
    from dsv4.tools.cli import main

    art = mutant("kv_norm")
    assert main(["parity", str(art), "--per-layer", "--steps", "4", "--prompt-len", "200", "--threads", "1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "first divergent layer: 1" in out
    assert any(line.startswith("problem: decode.layer1: p50 ") for line in out)
    assert not any(line.startswith(("problem: prefill.layer0", "problem: decode.layer0")) for line in out)
    assert out[-1].startswith("FAIL: diverged: ")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_fails_dsv4_parity_in_default_mode(name, mutant):
    """``dsv4 parity ART`` as a user runs it (300-token prompt, 64 steps, the eager model rebuilt from the source)."""
    from dsv4.tools.cli import main

    assert main(["parity", str(mutant(name))]) == 1
