"""export/: the dsv4 custom-op registry, the exported graphs, the artifact directory and its verification."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from dsv4.export import artifact, custom_ops
from dsv4.export.artifact import ArtifactError, load_manifest
from dsv4.export.signature import signature
from dsv4.models.state import state_entries

# Body vs eager reference on the registry's sample inputs. fp32: a body is the same math in another
# accumulation order (matmuls of up to 384 terms): relative 1e-5 of the output's scale. fp64: 1e-12.
OP_RTOL = {"float32": 1e-5, "float64": 1e-12}


def _run_row(row, inputs, attrs, compute):
    ref = row.eager_fn()(*[torch.from_numpy(a) for a in inputs], *attrs.values())
    ref = ref if isinstance(ref, tuple) else (ref,)
    model = custom_ops.op_model(row.name, inputs, attrs, [r.dim() for r in ref], compute=compute)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {v.name: a for v, a in zip(model.graph.inputs, inputs)})
    return [r.numpy() for r in ref], got


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("row", custom_ops.REGISTRY, ids=lambda r: r.name)
def test_registry_body_equals_eager(row, compute):
    """Every row's ONNX function body, run by ONNX Runtime, equals its eager reference on the row's samples."""
    cases = custom_ops.load(row.sample)(np.random.default_rng(0), np.dtype(compute))
    assert cases, f"{row.name}: no sample cases"
    for inputs, attrs in cases:
        ref, got = _run_row(row, inputs, attrs, compute)
        for r, g in zip(ref, got):
            assert g.shape == r.shape and g.dtype == r.dtype, (row.name, g.shape, r.shape, g.dtype, r.dtype)
            if r.dtype.kind in "iu":
                np.testing.assert_array_equal(g, r, err_msg=row.name)
            else:
                fin = np.isfinite(r)
                np.testing.assert_array_equal(np.isfinite(g), fin, err_msg=row.name)
                scale = max(float(np.abs(r[fin]).max()) if fin.any() else 1.0, 1e-30)
                np.testing.assert_allclose(g[fin], r[fin], rtol=0, atol=OP_RTOL[compute] * scale, err_msg=row.name)


@pytest.mark.parametrize("name", ["Fp8Dequant", "Mxfp4Dequant"])
def test_dequant_bodies_take_stacked_experts(name):
    """The MoE translation dequantises stacked expert weights [E, out, in]: each slice equals the 2-D reference
    exactly (also for dims that are not whole 128-tiles)."""
    rng = np.random.default_rng(1)
    eager = custom_ops.ROWS[name].eager_fn()
    for (w0, s0), _ in custom_ops.load(custom_ops.ROWS[name].sample)(rng, np.dtype("float32")):
        w = np.stack([w0, rng.integers(0, 256, w0.shape, dtype=np.uint8)])  # any byte, NaN codes included
        s = np.stack([s0, s0[::-1].copy()])
        model = custom_ops.op_model(name, [w, s], {}, [3])
        sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {"weight": w, "scale": s})[0]
        for e in range(2):
            np.testing.assert_array_equal(got[e], eager(torch.from_numpy(w[e]), torch.from_numpy(s[e])).numpy())


@pytest.mark.parametrize("row", custom_ops.REGISTRY, ids=lambda r: r.name)
def test_registry_row_is_complete(row):
    """Each row names an existing body, eager reference, sample, and runtime faces of the form 'inline' or 'mod:attr'."""
    assert row.body.name == row.name
    assert callable(row.eager_fn()) and callable(custom_ops.load(row.sample))
    for face in (row.ort, row.tvm):
        mod, sep, attr = face.partition(":")
        assert face == "inline" or (sep and mod.startswith("dsv4.") and attr), face
    if row.ort != "inline":
        assert callable(custom_ops.load(row.ort))
    custom_ops.register_schemas()
    schema = onnx.defs.get_schema(row.name, custom_ops.DOMAIN_VERSION, custom_ops.DOMAIN)
    assert [i.name for i in schema.inputs] == [n for n, _ in row.inputs]
    assert [o.name for o in schema.outputs] == [n for n, _ in row.outputs]
    assert sorted(schema.attributes) == sorted(n for n, _ in row.attributes)


def test_every_dsv4_torch_op_has_a_row():
    """A new torch.library op in the dsv4 namespace without a registry row fails here."""
    importlib.import_module("dsv4.models.kernels")
    ops = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dsv4::")}
    assert ops, "no dsv4 torch ops registered"
    missing = sorted(ops - set(custom_ops.BY_TORCH_OP))
    assert not missing, f"torch ops without a registry row: {missing}"
    assert set(custom_ops.translation_table()) == {
        getattr(torch.ops.dsv4, op.split("::")[1]).default for op in custom_ops.BY_TORCH_OP}


def test_attach_functions_rejects_unregistered_op():
    """A dsv4 node that has no registry row (e.g. emitted by a pass) fails loudly, naming the op."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.node("NotARow", [x], domain=custom_ops.DOMAIN)
    g = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 23, "dsv4": 1})
    with pytest.raises(KeyError, match="dsv4.NotARow"):
        custom_ops.attach_functions(ir.Model(g, ir_version=10))


# ---- the exported artifact -------------------------------------------------------------------------------------
def expected_dsv4_nodes(args) -> dict[str, int]:
    """dsv4 nodes per graph for a packed checkpoint export: one attention, two Sinkhorn splits, one MoE per layer."""
    L = args.n_layers
    csa = sum(1 for i in range(L) if args.ratio(i) == 4)
    compressed = sum(1 for i in range(L) if args.ratio(i) > 0)
    # FP8 linears called whole: wq_a, wq_b, wkv, wo_b, shared w1/w2/w3 per layer, + indexer wq_b per CSA layer;
    # wo_a's weight feeds a grouped einsum through Fp8Dequant; routed experts are stacked -> 3 Mxfp4Dequant
    return {"SparseAttn": L, "HcSplitSinkhorn": 2 * L, "MoEExperts": L, "Compress": compressed + csa,
            "IndexerTopK": csa, "Fp8Linear": 7 * L + csa, "Fp8Dequant": L, "Mxfp4Dequant": 3 * L}


def _load(art, graph):
    return onnx.load(str(art / f"{graph}.onnx"), load_external_data=False)


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_graph_holds_the_expected_dsv4_nodes(tiny_artifact, tiny_args, graph):
    """By op type, not total count: e.g. exactly one SparseAttn per layer; bodies attached as functions."""
    m = _load(tiny_artifact, graph)
    got = {}
    for n in m.graph.node:
        if n.domain == "dsv4":
            got[n.op_type] = got.get(n.op_type, 0) + 1
    assert got == expected_dsv4_nodes(tiny_args)
    funcs = {f.name for f in m.functions if f.domain == "dsv4"}
    assert set(got) <= funcs and "Fp8ActQdq" in funcs  # called inside MoEExperts
    imports = {o.domain: o.version for o in m.opset_import}
    assert imports[""] == 23 <= 26 and imports["dsv4"] == 1
    onnx.checker.check_model(str(tiny_artifact / f"{graph}.onnx"), full_check=True)


def test_graph_io_matches_signature_and_state_layout(tiny_artifact, tiny_args):
    """input_ids[/capacity]/past.* -> logits/present.* in state_entries order, batch and length symbolic (the
    growable state of ort targets: rows of the ratio-m caches ``rows{m}``, docs/capacity.md)."""
    for graph in ("prefill", "decode"):
        m = _load(tiny_artifact, graph)
        ins, outs = signature(tiny_args, torch.float32, graph, growable=True)
        assert [i.name for i in m.graph.input] == [s.name for s in ins]
        assert [o.name for o in m.graph.output] == [s.name for s in outs]
        ids = m.graph.input[0].type.tensor_type.shape.dim
        assert ids[0].dim_param == "batch"
        assert (ids[1].dim_param == "length") if graph == "prefill" else (ids[1].dim_value == 1)
        assert [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.output[1:]] == \
            [list(s.dims) for s in outs[1:]]
    man = load_manifest(tiny_artifact, verify=False)
    assert [e["name"] for e in man["state"]] == [e.name for e in state_entries(tiny_args)]
    assert man["graphs"]["decode"]["inputs"][1]["name"] == "past.pos"
    assert [i["name"] for i in man["graphs"]["prefill"]["inputs"]] == ["input_ids", "capacity"]


def test_packed_weights_stay_packed_in_one_shared_file(tiny_artifact, tiny_args):
    """FP8/MXFP4 weights reach the artifact as uint8 bytes, experts stacked [E, out, in/2]; both graphs point
    into ONE weights file at the same offsets, and the file holds each tensor once."""
    locs, sizes = {}, {}
    for graph in ("prefill", "decode"):
        m = _load(tiny_artifact, graph)
        inits = {t.name: t for t in m.graph.initializer}
        w = inits["layers.0.attn.wq_a.weight"]
        assert w.data_type == onnx.TensorProto.UINT8 and list(w.dims) == [tiny_args.q_lora_rank, tiny_args.dim]
        e = inits["layers.0.ffn.experts.w1.weight"]
        assert e.data_type == onnx.TensorProto.UINT8
        assert list(e.dims) == [tiny_args.n_routed_experts, tiny_args.moe_inter_dim, tiny_args.dim // 2]
        assert inits["layers.0.ffn.experts.w1.scale"].data_type == onnx.TensorProto.UINT8
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                kv = {x.key: x.value for x in t.external_data}
                assert kv["location"] == "weights.data"
                assert locs.setdefault(t.name, (kv["offset"], kv["length"])) == (kv["offset"], kv["length"])
                sizes[t.name] = int(kv["length"])
    total = (tiny_artifact / "weights.data").stat().st_size
    assert sum(sizes.values()) <= total <= sum(sizes.values()) + 64 * len(sizes)


def test_manifest_records_files_versions_and_ops(tiny_artifact):
    man = json.loads((tiny_artifact / "manifest.json").read_text())
    assert set(man["files"]) == {"prefill.onnx", "decode.onnx", "weights.data", "tokenizer.json",  # shipped by ckpt
                                 "config.json"}
    assert man["tokenizer"] == "tokenizer.json"
    for rel, info in man["files"].items():
        assert artifact.sha256(tiny_artifact / rel) == info["sha256"]
    assert man["target"] == "ort-cpu" and man["weights"] == "packed" and man["dtype"] == "float32"
    assert man["versions"]["onnxruntime"] and man["versions"]["torch"].startswith("2.13")
    assert set(man["dsv4_ops"]) == set(expected_dsv4_nodes(__import__("dsv4").models.preset("tiny")))
    assert man["source"]["kind"] == "checkpoint"


def test_one_edited_byte_fails_loading_naming_the_file(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    p = art / "weights.data"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.data.*sha256"):
        load_manifest(art)
    load_manifest(art, verify=False)  # skippable for speed
    from dsv4.runtimes.ort import Generator

    with pytest.raises(ArtifactError, match=r"weights\.data"):
        Generator(art)


def test_external_data_outside_the_directory_is_refused(tiny_artifact, tmp_path):
    """An initializer whose location contains '..' is refused even when every hash matches."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = onnx.load(str(art / "decode.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for kv in t.external_data:
        if kv.key == "location":
            kv.value = "../weights.data"
    onnx.save(m, str(art / "decode.onnx"))
    man = json.loads((art / "manifest.json").read_text())
    man["files"]["decode.onnx"] = {"bytes": (art / "decode.onnx").stat().st_size,
                                   "sha256": artifact.sha256(art / "decode.onnx")}
    (art / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match=r"'\.\./weights\.data' escapes the artifact directory"):
        load_manifest(art)


def test_failed_write_leaves_nothing_and_existing_output_is_kept(tmp_path):
    """The artifact appears under its name only when complete; an existing one needs overwrite."""
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with artifact.writing(out) as tmp:
            (tmp / "prefill.onnx").write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("x")
    from dsv4.export.export import export_artifact

    with pytest.raises(ValueError, match="exists and is not empty"):
        export_artifact(out, preset="tiny")
    assert (out / "keep").read_text() == "x"
    with pytest.raises(ValueError, match="exactly one of"):
        export_artifact(tmp_path / "x", preset="tiny", checkpoint=tmp_path)
    with pytest.raises(ValueError, match="--weights"):
        export_artifact(tmp_path / "x", preset="tiny", weights="int3")


def test_inspect_reports_ops_state_and_weights(tiny_artifact, tiny_args):
    info = artifact.inspect_artifact(tiny_artifact)
    dec = info["graphs"]["decode"]
    assert dec["dsv4"]["SparseAttn"] == tiny_args.n_layers
    assert dec["inlined_nodes"] > dec["nodes"] and not any(k.startswith("dsv4.") for k in dec["inlined_ops"])
    assert info["weights_by_dtype"]["uint8"]["bytes"] > 0
    assert info["state"]["bytes_per_token"] > 0


@pytest.mark.slow  # one more export (~1-2 min on 2 cores)
def test_export_command_from_a_preset(tmp_path, capsys):
    """``dsv4 export --preset tiny --seed 0`` builds the synthetic checkpoint on the fly; the artifact remembers its
    source, so ``dsv4 parity`` needs no checkpoint argument."""
    from dsv4.tools.cli import main

    out = tmp_path / "art"
    assert main(["export", "--preset", "tiny", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    assert "decode" in capsys.readouterr().out
    man = load_manifest(out)
    assert man["source"] == {"kind": "synthetic", "preset": "tiny", "seed": 0}
    assert man["config"]["max_seq_len"] == 1024
    assert main(["parity", str(out), "--steps", "4", "--prompt-len", "32"]) == 0
