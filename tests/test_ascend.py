"""The ascend target (docs/ascend.md): the float8-free FP8 rounding, the Einsum / GatherND rewrites, right padding
that changes nothing, and static artifacts that lint clean and match the eager model on CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from dsv4.models import DeepseekV4, init_random_, preset
from dsv4.models.state import init_state
from dsv4.passes import ascend


def _run(model: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _rewritten(model: onnx.ModelProto, fn) -> onnx.ModelProto:
    m = ir.serde.deserialize_model(model)
    for node in list(m.graph):
        fn(m.graph, node)
    return ir.serde.serialize_model(m)


def _e4m3_sweep() -> np.ndarray:
    """Every e4m3fn value, every midpoint between neighbours (the ties) and one fp32 ulp either side, values
    beyond +-448, the subnormal range, zeros, infinities and NaN."""
    import ml_dtypes

    grid = np.unique(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    mid = (grid[1:] + grid[:-1]) / 2
    around = np.concatenate([mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf)])
    rng = np.random.default_rng(0)
    rand = np.concatenate([rng.uniform(-448, 448, 20000), rng.uniform(-1, 1, 20000) * 2.0 ** -6,
                           rng.standard_normal(20000)]).astype(np.float32)
    special = np.array([0.0, -0.0, 448.0, 449.0, 464.0, 1e6, -1e30, np.inf, -np.inf, np.nan, 2.0 ** -10],
                       dtype=np.float32)
    return np.concatenate([grid, around, rand, special]).astype(np.float32)


def test_e4m3_arithmetic_equals_the_float8_cast():
    """The ascend rewrite of Cast(to=e4m3fn) -> Cast(to=float) is bit-identical to the Cast pair (saturating)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["q"], to=TensorProto.FLOAT8E4M3FN, name="c8"),
                           helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT, name="c32")], "g", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    arith = _rewritten(model, lambda gr, n: ascend.e4m3_roundtrip(gr, n) if n.name == "c8" else None)
    assert not any(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT8E4M3FN for n in arith.graph.node)
    v = _e4m3_sweep()
    (want,), (got,) = _run(model, x=v), _run(arith, x=v)
    assert np.array_equal(want.view(np.uint32), got.view(np.uint32)) or np.array_equal(want, got, equal_nan=True)
    bad = ~((want == got) | (np.isnan(want) & np.isnan(got)))
    assert not bad.any(), f"{bad.sum()} of {v.size} differ, e.g. x={v[bad][:5]} cast={want[bad][:5]} arith={got[bad][:5]}"


@pytest.mark.parametrize("eq,sa,sb", [("btgi,gri->btgr", (2, 3, 4, 5), (4, 6, 5)),
                                      ("btjk,btjd->btkd", (2, 3, 4, 4), (2, 3, 4, 7))])
def test_einsum_rewrite_is_the_same_contraction(eq, sa, sb):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, sa)
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, sb)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Einsum", ["a", "b"], ["y"], equation=eq, name="e")], "g", [a, b], [out])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    mm = _rewritten(model, lambda gr, n: ascend.einsum_to_matmul(gr, n) if n.op_type == "Einsum" else None)
    assert "Einsum" not in {n.op_type for n in mm.graph.node} and "MatMul" in {n.op_type for n in mm.graph.node}
    rng = np.random.default_rng(1)
    va, vb = rng.standard_normal(sa).astype(np.float32), rng.standard_normal(sb).astype(np.float32)
    (want,), (got,) = _run(model, a=va, b=vb), _run(mm, a=va, b=vb)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, np.einsum(eq, va, vb), rtol=0, atol=1e-5)


def test_gathernd_batch_dims_rewrite_is_the_same_gather():
    d = helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 9, 3])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 4, 5, 1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("GatherND", ["d", "i"], ["y"], batch_dims=1, name="gnd")], "g", [d, i], [out])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    flat = _rewritten(model, lambda gr, n: ascend.gather_nd_batch(gr, n) if n.op_type == "GatherND" else None)
    assert "GatherND" not in {n.op_type for n in flat.graph.node}
    rng = np.random.default_rng(2)
    vd, vi = rng.standard_normal((2, 9, 3)).astype(np.float32), rng.integers(0, 9, (2, 4, 5, 1))
    (want,), (got,) = _run(model, d=vd, i=vi), _run(flat, d=vd, i=vi)
    assert np.array_equal(want, got)


@pytest.mark.parametrize("length,bucket", [(77, 128), (3, 128), (200, 256)])
def test_right_padding_changes_no_real_logit_and_no_state(length, bucket):
    """model.step(padded, lengths) == model.step(prompt) on the real positions and on every state tensor (fp64:
    only summation order may differ between the two shapes)."""
    m = init_random_(DeepseekV4(preset("tiny"), dtype=torch.float64), seed=0).eval()
    ids = torch.randint(0, m.args.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    pad = torch.cat([ids, torch.randint(0, m.args.vocab_size, (2, bucket - length))], 1)  # any pad ids
    with torch.no_grad():
        l0, s0, _ = m.step(ids, init_state(m.args, 2, m.dtype))
        l1, s1, _ = m.step(pad, init_state(m.args, 2, m.dtype), torch.tensor([length, length]))
    assert (l0 - l1[:, :length]).abs().max() < 1e-12
    for k in s0:
        a, b = s0[k], s1[k]
        same = (a == b) | (a - b).abs().le(1e-12)
        assert bool(same.all()), f"state {k}: max |diff| {(a - b).abs().nan_to_num(0).max()}"


def test_loop_unroll_and_isinf_rewrites_compute_the_same():
    """A Sinkhorn-like Loop (constant trip count, carried value, outer-scope captures) unrolled, and IsInf(-inf only)
    as Equal: same outputs."""
    body = helper.make_graph(
        [helper.make_node("ReduceSum", ["m_in", "ax"], ["s"], keepdims=1),
         helper.make_node("Add", ["s", "eps"], ["se"]), helper.make_node("Div", ["m_in", "se"], ["m_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("m_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("m_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Constant", [], ["M"], value=helper.make_tensor("M", TensorProto.INT64, [], [5])),
             helper.make_node("Constant", [], ["T"], value=helper.make_tensor("T", TensorProto.BOOL, [], [True])),
             helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("ax", TensorProto.INT64, [1], [-1])),
             helper.make_node("Constant", [], ["eps"], value=helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6])),
             helper.make_node("Loop", ["M", "T", "x"], ["y"], body=body, name="loop"),
             helper.make_node("IsInf", ["x"], ["neg"], detect_positive=0, name="isinf")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4]),
                           helper.make_tensor_value_info("neg", TensorProto.BOOL, [3, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    def fn(gr, n):
        if n.op_type == "Loop":
            assert ascend.unroll_loop(gr, n) == 5
        elif n.op_type == "IsInf":
            ascend.isinf_to_equal(gr, n)

    flat = _rewritten(model, fn)
    assert not {"Loop", "IsInf"} & {n.op_type for n in flat.graph.node}
    v = np.random.default_rng(3).uniform(0.1, 2, (3, 4)).astype(np.float32)
    v[0, 0], v[1, 1], v[2, 2] = -np.inf, np.inf, np.nan
    want, got = _run(model, x=v), _run(flat, x=v)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


# ---- the artifact ----------------------------------------------------------------------------------------------------
def test_ascend_artifact_is_static_plain_opset17(tiny_artifact_ascend):
    """One opset import (ai.onnx 17), no functions, every graph input/output dim a positive number, no float8 / bf16
    tensor; the manifest records the buckets, and per graph an ATC command line with its --input_shape."""
    from dsv4.export.artifact import load_manifest

    man = load_manifest(tiny_artifact_ascend)
    assert man["static"] == {"batch": 1, "prefill_lengths": [256], "max_seq_len": 1024}
    assert set(man["graphs"]) == {"prefill.256", "decode"}
    for key, info in man["graphs"].items():
        m = onnx.load(tiny_artifact_ascend / info["file"], load_external_data=False)
        assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)] and not m.functions
        for v in (*m.graph.input, *m.graph.output):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            assert all(isinstance(d, int) and d > 0 for d in dims), (key, v.name, dims)
        types = {t.data_type for t in m.graph.initializer} | {v.type.tensor_type.elem_type for v in m.graph.input}
        assert not types & {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.BFLOAT16,
                            TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E8M0}
        cmd = man["ascend"]["atc"][key]
        assert cmd.startswith(f"atc --model={info['file']} --framework=5 ") and "--soc_version=" in cmd
        shape = ";".join(f"{i['name']}:{','.join(map(str, i['dims']))}" for i in info["inputs"])
        assert f'--input_shape="{shape}"' in cmd and "--precision_mode=must_keep_origin_dtype" in cmd
    assert man["ascend"]["cann_ep"]["provider_options"]["precision_mode"] == "must_keep_origin_dtype"


def test_ascend_artifact_lints_clean(tiny_artifact_ascend):
    from dsv4.passes.lint import lint_artifact

    rep = lint_artifact(tiny_artifact_ascend, "ascend")
    assert rep.violations == [], "\n".join(v.line() for v in rep.violations[:20])
    assert set(rep.nodes) == {"prefill.256", "decode"} and min(rep.nodes.values()) > 1000


def test_ascend_fp32_twin_strict_parity_with_a_prompt_that_does_not_fill_its_bucket(tiny_artifact_ascend,
                                                                                  tiny_eager_f32):
    """200 real tokens in the 256-token bucket (56 padding) + 32 decode steps: logits and every state tensor
    within the strict fp32 bound, greedy tokens all equal."""
    from dsv4.runtimes.parity import run_parity

    rep = run_parity(tiny_artifact_ascend, model=tiny_eager_f32, steps=32, prompt_len=200, threads=1)
    from dsv4.runtimes.parity import plain_lines

    assert rep.ok, "\n".join(plain_lines(rep))
    assert rep.tolerance_key == ["float32", False] and rep.greedy_agree == rep.greedy_steps == 32
    assert max(r.max_abs for r in rep.rows if r.name.startswith("prefill.")) < 1e-4


def test_ascend_generator_refuses_what_its_static_shapes_cannot_hold(tiny_artifact_ascend):
    from dsv4.runtimes.base import CapacityError
    from dsv4.runtimes.ort import Generator

    gen = Generator(tiny_artifact_ascend, threads=1)
    assert gen.providers == ["CPUExecutionProvider"]  # no onnxruntime-cann here: the CPU run is the check
    with pytest.raises(CapacityError, match="largest prefill bucket 256"):
        gen.prefill(np.zeros((1, 257), dtype=np.int64))
    with pytest.raises(ValueError, match="static batch of 1, got 2"):
        gen.prefill(np.zeros((2, 10), dtype=np.int64))


@pytest.mark.slow  # two tiny exports (float16: 2 buckets + decode) and the calibrated fp16 parity: ~8 min of CPU
def test_ascend_float16_default_parity_and_lint(tiny_checkpoint, tmp_path):
    """The default ascend artifact (float16, quant_sim on, buckets 128 and 256): lint clean, and `dsv4 parity` on a
    200-token prompt (56 tokens of padding) passes the fp16 verdict (calibrated against 1-fp16-ulp noise twins)."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.lint import lint_artifact
    from dsv4.passes.pipeline import run
    from dsv4.runtimes.parity import plain_lines, run_parity

    art = export_artifact(tmp_path / "a16", checkpoint=tiny_checkpoint, target="ascend", max_seq_len=1024,
                          prefill_lengths=(128, 256), transform=lambda m, g, t: run(m, t.name), progress=False).path
    assert lint_artifact(art).violations == []
    rep = run_parity(art, steps=32, prompt_len=200, threads=1)
    assert rep.tolerance_key == ["float16", True] and rep.ok, "\n".join(plain_lines(rep))


@pytest.mark.slow  # the small preset's ascend export: ~10 min of CPU
def test_small_ascend_artifact_lints_clean(tmp_path):
    from dsv4.export.export import export_artifact
    from dsv4.passes.lint import lint_artifact
    from dsv4.passes.pipeline import run

    art = export_artifact(tmp_path / "small", preset="small", target="ascend", prefill_lengths=(128, 512),
                          transform=lambda m, g, t: run(m, t.name), progress=False).path
    rep = lint_artifact(art)
    assert rep.violations == [], "\n".join(v.line() for v in rep.violations[:20])


# ---- on Ascend hardware only -----------------------------------------------------------------------------------------
def test_cann_ep_runs_the_artifact_like_the_cpu(tiny_artifact_ascend, tiny_eager_f32):
    if "CANNExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-cann with a CANN toolkit and an Ascend NPU (absent here)")
    from dsv4.runtimes.parity import plain_lines, run_parity

    rep = run_parity(tiny_artifact_ascend, model=tiny_eager_f32, steps=8, prompt_len=200,
                     providers=["CANNExecutionProvider", "CPUExecutionProvider"])
    assert rep.ok, "\n".join(plain_lines(rep))


def test_atc_compiles_every_graph(tiny_artifact_ascend, tmp_path):
    import shutil
    import subprocess

    if shutil.which("atc") is None:
        pytest.skip("needs CANN's atc on PATH (the CANN toolkit is absent here)")
    from dsv4.export.artifact import load_manifest

    man = load_manifest(tiny_artifact_ascend)
    for f in man["files"]:  # atc writes its .om files beside the model: run in a directory of links, not the artifact
        (tmp_path / f).symlink_to(tiny_artifact_ascend / f)
    for key, cmd in man["ascend"]["atc"].items():
        r = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, f"{key}: {r.stdout[-2000:]}{r.stderr[-2000:]}"


def test_parity_refuses_a_prompt_the_static_graphs_cannot_take_before_any_work(tiny_artifact_ascend):
    from dsv4.runtimes.parity import run_parity

    with pytest.raises(ValueError, match=r"static \(batch 1, prefill buckets \[256\]\); got --batch 1 --prompt-len 300"):
        run_parity(tiny_artifact_ascend, steps=2, prompt_len=300)
