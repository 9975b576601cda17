"""The ort-cuda pipeline (passes/pipeline.py, LowerOrtPass(qmoe=False)): what it lowers, proven on the CPU EP where
the kernels exist there too (com.microsoft.MoE, DequantizeLinear); the CUDA kernels themselves need the GPU check."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from test_fuse_moe import assert_close, eager, feeds, ops, routing_model, run_ort

from dsv4.export.signature import GRAPHS
from dsv4.passes.pipeline import PIPELINES, run
from dsv4.runtimes.parity import run_parity


def test_the_pipeline_lowers_with_the_cuda_table_in_mind():
    names = [n for n, _ in PIPELINES["ort-cuda"]]
    assert names == ["cleanup", "fuse_moe", "lower_cuda", "select_ops", "cleanup.2", "hoist_experts", "fuse_norm"]
    assert PIPELINES["ort-cuda"][2][1].qmoe is False  # the table's QMoE has no float32 activations


@pytest.mark.parametrize("selection", ["learned", "hash"])
@pytest.mark.parametrize("form", ["float", "mxfp4", "fp8"])
def test_cuda_lowering_is_exact(form, selection):
    """dsv4.MoE -> com.microsoft.MoE for every expert form (MXFP4 stacks through DequantizeLinear over the lossless
    int8 re-encoding instead of QMoE, FP8 stacks through DequantizeLinear too), equal to the eager reference and to the function body on the CPU EP."""
    model, w = routing_model(form=form, selection=selection)
    inputs = feeds()
    raw = run_ort(model, inputs)
    counts = run(model, "ort-cuda")
    assert counts["fuse_moe"]["MoE"] == 1 and counts["lower_cuda"]["lowered"] == 1
    o = ops(model)
    assert o.get("com.microsoft.MoE") == 1 and "com.microsoft.QMoE" not in o and not any(k.startswith("dsv4.") for k in o)
    assert (form != "float") == ("DequantizeLinear" in o)  # packed stacks: ORT's DequantizeLinear, per call
    got = run_ort(model, inputs)
    assert_close(got, eager(w, form, selection, inputs), "MoE (ort-cuda) vs eager")
    assert_close(got, raw, "MoE (ort-cuda) vs the raw graph")


def test_tiny_float32_cuda_graph_matches_eager_on_the_cpu_ep(tiny_artifact_f32_cuda, tiny_eager_f32):
    """The ort-cuda tiny graph (float32, quant_sim off: com.microsoft.MoE per layer) run by the CPU EP: 300-token
    prefill + 64 greedy steps within 1e-4 of eager, identical tokens (the strict fp32 acceptance of docs/parity.md)."""
    for g in GRAPHS:
        o = ops(ir.load(tiny_artifact_f32_cuda / f"{g}.onnx"))
        assert o.get("com.microsoft.MoE") == 4 and "com.microsoft.QMoE" not in o
        assert o.get("SimplifiedLayerNormalization") == 22  # every weighted RMSNorm of tiny (4 layers)
    rep = run_parity(tiny_artifact_f32_cuda, model=tiny_eager_f32, steps=64, prompt_len=300,
                     providers=["CPUExecutionProvider"])
    assert tuple(rep.tolerance_key) == ("float32", False)
    for r in rep.rows:
        assert r.max_abs <= 1e-4, f"{r.name}: {r.max_abs:.3g}"
    assert rep.greedy_agree == rep.greedy_steps == 64 and rep.ok


def test_fused_rmsnorm_passes_the_full_checker_and_matches_the_formula(tmp_path):
    """The model's RMSNorm form (w * (x * 1/sqrt(mean(x^2) + eps))) becomes one SimplifiedLayerNormalization, which
    onnx's full checker accepts (the export runs it) and ORT's CPU kernel computes within fp32 rounding."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from dsv4.passes.fuse_norm import FuseNormPass

    d, eps = 64, 1e-6
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5, d)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    c = [helper.make_tensor(n, TensorProto.FLOAT if n != "axes" else TensorProto.INT64, [1] if n == "axes" else [], v)
         for n, v in (("two", [2.0]), ("axes", [-1]), ("eps", [eps]))]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["ms"],
                                                                                keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["r0"]),
             helper.make_node("Reciprocal", ["r0"], ["r"]), helper.make_node("Mul", ["x", "r"], ["xn"]),
             helper.make_node("Mul", ["w", "xn"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, d])],
                          initializer=[*c, helper.make_tensor("w", TensorProto.FLOAT, [d], w)])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]))
    assert FuseNormPass()(model).counts == {"SimplifiedLayerNormalization": 1, "expected": 1}
    assert ops(model) == {"SimplifiedLayerNormalization": 1}
    path = tmp_path / "norm.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    onnx.checker.check_model(str(path), full_check=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    x64 = x.astype(np.float64)
    ref = w * (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_tiny_packed_cuda_graph_keeps_the_experts_packed_and_matches_eager_on_the_cpu_ep(
        tiny_artifact, tiny_artifact_cuda, tiny_packed_reference, tmp_path):
    """An ort-cuda export's default (--experts packed, packed FP8/MXFP4, quant_sim on): the MXFP4 expert stacks stay
    the checkpoint's bytes and the selected experts are dequantised by the Mxfp4Dequant body (no int8 re-encoding),
    in prefill one expert per Loop trip and the attention / indexer over query chunks;
    on the CPU EP it passes the calibrated parity against the same eager reference as the ort-cpu default. The int8
    variant of the same graphs stores >= 2x the stacks' bytes again (docs/export.md "Real size")."""
    from conftest import cuda_artifact

    from dsv4.export.artifact import load_manifest

    man = load_manifest(tiny_artifact_cuda, verify=False)
    assert man["experts"] == "packed" and man["target"] == "ort-cuda"
    for g in GRAPHS:
        counts = man["graphs"][g]["pass_counts"]
        assert counts["select_ops"].get("inlined Mxfp4Dequant", 0) > 0, counts["select_ops"]
        # prefill: one routed expert per Loop trip (bounded memory at real size: docs/ort_cuda.md); decode: dense
        assert counts["select_ops"].get("expert-chunked MoE", 0) == (4 if g == "prefill" else 0), counts["select_ops"]
        chunked = {k: v for k, v in counts["select_ops"].items() if k.startswith("query-chunked")}  # prefill only
        assert chunked == ({"query-chunked IndexerTopK": 2, "query-chunked SparseAttn": 4} if g == "prefill" else {})
        model = ir.load(tiny_artifact_cuda / f"{g}.onnx")
        assert not [k for k in model.graph.initializers if k.endswith(".q8_zero")]  # no int8 re-encoding stored
    int8 = tmp_path / "int8"
    cuda_artifact(tiny_artifact, int8, experts="int8")
    assert len([k for k in ir.load(int8 / "decode.onnx").graph.initializers if k.endswith(".q8_zero")]) == 12
    raw = ir.load(tiny_artifact / "decode.onnx")
    stacks = sum(v.const_value.nbytes for v in raw.graph.initializers.values()
                 if ".ffn.experts.w" in v.name and v.name.endswith(".weight") and v.dtype == ir.DataType.UINT8
                 and v.shape.rank() == 3)  # the routed experts' MXFP4 stacks [E, O, I/2]
    assert stacks > 0
    grew = (int8 / "decode.onnx").stat().st_size - (tiny_artifact_cuda / "decode.onnx").stat().st_size
    assert grew >= 2 * stacks, (grew, stacks)
    rep = run_parity(tiny_artifact_cuda, reference=tiny_packed_reference, providers=["CPUExecutionProvider"])
    assert tuple(rep.tolerance_key) == ("float32", True)
    assert rep.ok, [r for r in rep.rows if not r.ok]
