"""Pipelines state what must happen (issue [6]): a rewrite that stops matching fails export with the rule's reason."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from dsv4.passes import fuse_moe, lower_ort, pipeline
from dsv4.passes.expect import ExpectationError


@pytest.fixture(scope="module")
def raw_decode(tiny_artifact):
    return tiny_artifact / "decode.onnx"


def test_default_pipeline_meets_its_expectations(tiny_artifact_default):
    from dsv4.export.artifact import load_manifest

    counts = load_manifest(tiny_artifact_default, verify=False)["graphs"]["decode"]["pass_counts"]
    assert counts["fuse_moe"]["MoE"] == counts["fuse_moe"]["expected MoE"] == 4
    assert counts["lower_ort"]["narrowed MoE"] == 4 and counts["lower_ort"]["DequantizeLinear (FP8)"] > 0


def test_a_moe_rule_that_does_not_match_fails_the_pipeline_with_its_reason(raw_decode, monkeypatch):
    monkeypatch.setattr(fuse_moe, "analyse", lambda *a, **k: "scoring: test-only monkeypatch, the rule refuses")
    with pytest.raises(ExpectationError) as e:
        pipeline.run(ir.load(raw_decode), "ort-cpu")
    msg = str(e.value)
    assert "fuse_moe" in msg and "4 of 4 not rewritten" in msg
    assert msg.count("test-only monkeypatch, the rule refuses") == 4  # one line per MoE layer, with the reason


def test_a_lowering_that_does_not_match_fails_the_pipeline_with_its_reason(raw_decode, monkeypatch):
    def refuse(self, context, **_):
        from onnxscript.rewriter._basics import MatchResult

        return MatchResult().fail("test-only: NarrowMoE refuses")

    monkeypatch.setattr(lower_ort.NarrowMoE, "check", refuse)
    with pytest.raises(ExpectationError) as e:
        pipeline.run(ir.load(raw_decode), "ort-cpu")
    assert "narrowed" in str(e.value) and "test-only: NarrowMoE refuses" in str(e.value)


@pytest.mark.slow  # one more tiny export (~2.5 min on 2 cores)
def test_export_fails_with_the_reason(tiny_checkpoint, tmp_path, monkeypatch):
    """Through ``dsv4 export`` itself: exit 1, the rule's reason printed, no artifact left behind."""
    from dsv4.tools.cli import main

    monkeypatch.setattr(fuse_moe, "analyse", lambda *a, **k: "scoring: test-only monkeypatch, the rule refuses")
    assert main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "art")]) != 0
    assert not (tmp_path / "art").exists()
