"""export/package.py: an artifact carries config.json, tokenizer, generation defaults, ORT settings, its identity."""

from __future__ import annotations

import json
import shutil

import onnx

from dsv4.export.artifact import load_manifest
from dsv4.export.package import checkpoint_identity, generation
from dsv4.models import preset


def test_artifact_is_a_complete_package(tiny_artifact, tiny_checkpoint):
    man = load_manifest(tiny_artifact)
    for f in ("config.json", "tokenizer.json"):
        assert (tiny_artifact / f).read_bytes() == (tiny_checkpoint / f).read_bytes() and f in man["files"]
    assert man["config_json"] == "config.json" and man["tokenizer"] == "tokenizer.json"
    assert man["generation"] == {"bos_token_id": 0, "eos_token_id": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    assert man["onnxruntime"]["disabled_optimizers"] == ["ConstantFolding"]  # packed weights stay packed
    assert man["onnxruntime"]["environment"] == {"ORT_QMOE_CPU_QNBIT_GEMM": "fp32"}
    assert man["source"]["identity"] == checkpoint_identity(tiny_checkpoint)
    for g, info in man["graphs"].items():
        props = {p.key: p.value for p in onnx.load(str(tiny_artifact / info["file"]), load_external_data=False)
                 .metadata_props}
        assert props["dsv4.graph"] == g and props["dsv4.target"] == "ort-cpu" and props["dsv4.weights"] == "packed"
        assert json.loads(props["dsv4.source"])["identity"]["sha256"] == man["source"]["identity"]["sha256"]


def test_identity_is_the_checkpoint_not_its_path(tiny_checkpoint, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for f in ("model.safetensors.index.json", "config.json"):
        shutil.copy(tiny_checkpoint / f, moved / f)
    assert checkpoint_identity(moved) == checkpoint_identity(tiny_checkpoint)
    cfg = json.loads((moved / "config.json").read_text()) | {"swiglu_limit": 7.0}
    (moved / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_identity(moved)["sha256"] != checkpoint_identity(tiny_checkpoint)["sha256"]


def test_generation_defaults_from_generation_config(tmp_path):
    args = preset("tiny")
    assert generation(args, tmp_path)["temperature"] == 0.0
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "eos_token_id": 7,
                                                                 "do_sample": True}))
    assert generation(args, tmp_path) == {"bos_token_id": 0, "eos_token_id": 7, "temperature": 0.6, "top_p": 0.95,
                                          "top_k": 0}


def test_sessions_follow_the_manifest_settings(tiny_artifact):
    from dsv4.runtimes.ort import session_options

    man = load_manifest(tiny_artifact, verify=False)
    assert session_options(man)[1] == ["ConstantFolding"]
    assert session_options(man | {"onnxruntime": dict(man["onnxruntime"], disabled_optimizers=[])})[1] == []
    old = {k: v for k, v in man.items() if k != "onnxruntime"}  # an artifact written before the section
    assert session_options(old)[1] == ["ConstantFolding"]


def test_parity_refuses_a_checkpoint_that_is_not_the_source(tiny_artifact, tiny_checkpoint, tmp_path):
    """The eager side of parity is found by identity: the source checkpoint (even moved) passes, a checkpoint
    whose config differs by one value is refused with both identities named; a missing source path asks for
    --checkpoint."""
    import pytest

    from dsv4.runtimes.eager import check_identity, eager_model

    man = load_manifest(tiny_artifact, verify=False)
    moved = shutil.copytree(tiny_checkpoint, tmp_path / "moved")
    check_identity(moved, man["source"]["identity"])
    cfg = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(cfg | {"rope_theta": cfg["rope_theta"] * 2}))
    with pytest.raises(ValueError, match=r"moved is not the checkpoint this artifact was exported from"):
        eager_model(man, checkpoint=moved)
    gone = dict(man, source=dict(man["source"], identity={"sha256": "0" * 64, "of": []}))
    with pytest.raises(ValueError, match=r"identity 0000000000000000…\) is not in .* pass --checkpoint DIR"):
        eager_model(gone)


def test_the_source_is_an_identity_not_a_path(tiny_artifact, tiny_checkpoint, tmp_path, monkeypatch):
    """No host path in the manifest or the graphs' metadata; parity finds the checkpoint by its identity among the
    artifact's siblings, the current directory and $DSV4_CHECKPOINTS, wherever it was moved to."""
    from dsv4.runtimes.eager import find_checkpoint

    text = (tiny_artifact / "manifest.json").read_text()
    assert str(tiny_checkpoint) not in text and "path" not in json.loads(text)["source"]
    want = load_manifest(tiny_artifact, verify=False)["source"]["identity"]
    store = tmp_path / "store"
    other = shutil.copytree(tiny_checkpoint, store / "a_other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"rope_theta": cfg["rope_theta"] * 2}))
    moved = shutil.copytree(tiny_checkpoint, store / "b_moved")
    assert find_checkpoint(want, [tmp_path]) is None  # roots and their children only, not deeper
    assert find_checkpoint(want, [store]) == moved
    monkeypatch.setenv("DSV4_CHECKPOINTS", str(store))
    monkeypatch.chdir(tmp_path)
    from dsv4.runtimes.eager import _search_roots

    assert find_checkpoint(want, _search_roots(None)) == moved
