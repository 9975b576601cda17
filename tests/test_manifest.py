"""export/manifest_check.py: a manifest is checked against its graphs before any run; one line per bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from dsv4.export.artifact import MANIFEST, ArtifactError, load_manifest, sha256


@pytest.fixture
def art(tiny_artifact, tmp_path):
    return shutil.copytree(tiny_artifact, tmp_path / "art")


def edit(art, fn, text: str | None = None) -> None:
    path = art / MANIFEST
    if text is not None:
        path.write_text(text)
        return
    man = json.loads(path.read_text())
    fn(man)
    path.write_text(json.dumps(man))


def _state_shape(man):
    man["state"][1]["shape"][1] += 1


def _swap_files(man):
    man["graphs"]["prefill"]["file"], man["graphs"]["decode"]["file"] = "decode.onnx", "prefill.onnx"


def _dtype(man):
    man["graphs"]["decode"]["inputs"][1]["dtype"] = "int32"


def _other_preset(man):
    from dataclasses import asdict

    from dsv4.models import preset

    man["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(preset("small")).items()}


@pytest.mark.parametrize("change,msg", [
    (lambda m: m.pop("files"), "manifest.json: field 'files' is missing"),
    (lambda m: m.update(graphs=[]), "manifest.json: field 'graphs' must be an object, got a list"),
    (lambda m: m["files"].update({"decode.onnx": "abc"}), r"files\['decode.onnx'\] must be an object with 'bytes'"),
    (lambda m: m["graphs"]["decode"].pop("inputs"), r"graphs\['decode'\].inputs must be a list"),
    (_dtype, r"graphs\['decode'\].inputs: 'past.pos' is int32, decode.onnx has int64"),
    (_swap_files, r"graphs\['prefill'\].inputs: 'input_ids' has dims \['batch', 'length'\], decode.onnx has \['batch', 1\]"),
    (_state_shape, r"state\[1\].shape is .*, the config gives"),
    (lambda m: m["state"].pop(), "state has .* entries, the config gives"),
    (_other_preset, "config does not describe the graphs .*a manifest of another model"),
    (lambda m: m["config"].update(dim="abc"), r'manifest.json: config: hidden_size: expected an integer, got "abc"'),
    (lambda m: m["config"].update(colour=1), "manifest.json: config: .*unexpected keyword argument 'colour'"),
    (lambda m: m["graphs"]["decode"].update(file="nope.onnx"), r"graphs\['decode'\].file 'nope.onnx' is not listed"),
])
def test_bad_manifest_is_one_error_naming_file_and_field(art, change, msg):
    edit(art, change)
    with pytest.raises(ArtifactError, match=msg):
        load_manifest(art, verify=False)


def test_manifest_that_is_not_an_object(art):
    edit(art, None, "[1, 2, 3]")
    with pytest.raises(ArtifactError, match=r"manifest.json: expected a JSON object, got a list"):
        load_manifest(art)
    edit(art, None, "{")
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
        load_manifest(art)


def test_graph_file_that_is_not_onnx(art):
    (art / "decode.onnx").write_bytes(b"not a protobuf at all")
    man = json.loads((art / MANIFEST).read_text())
    man["files"]["decode.onnx"] = {"bytes": (art / "decode.onnx").stat().st_size, "sha256": sha256(art / "decode.onnx")}
    (art / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="decode.onnx: not a readable ONNX model"):
        load_manifest(art)


def test_commands_print_one_line_not_a_traceback(art, capsys):
    """``dsv4 generate`` / ``inspect`` on a broken manifest: exit 2 and one ``error:`` line naming the file."""
    from dsv4.tools.cli import main

    edit(art, lambda m: m.pop("files"))
    for cmd in (["inspect", str(art)], ["generate", str(art), "--prompt-ids", "1,2"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "field 'files' is missing" in err and "Traceback" not in err
        assert str(art / MANIFEST) in err.replace("\n", "")
