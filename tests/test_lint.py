"""passes/lint.py and ``dsv4 lint``: every node of an artifact against its target's kernel table (passes/rules/)."""

from __future__ import annotations

import shutil
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from dsv4.export import artifact
from dsv4.export.signature import GRAPHS
from dsv4.passes import lint
from dsv4.tools.cli import main

sys.path.insert(0, str(lint.RULES))
import extract_kernels  # noqa: E402  (passes/rules is data + a maintenance script, not a package)


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def _lint(model, target="ort-cuda"):
    rep = lint.Report(target, [], {}, {})
    lint.lint_model(onnx.shape_inference.infer_shapes(model), "g", lint.PROFILES[target](), rep)
    return rep


def test_tables_load_with_their_sources():
    """Both tables parse; their headers name the source; the rows the ort-cuda pipeline relies on are there."""
    for target, source in (("ort-cuda", "OperatorKernels.md@001d12d2"), ("ort-cpu", "onnxruntime 1.32.0")):
        prof = lint.PROFILES[target]()
        assert source in prof.table.read_text().splitlines()[0]
        assert len(prof.kernels) > 150
    cuda = lint.PROFILES["ort-cuda"]().kernels
    (moe,) = cuda[("com.microsoft", "MoE")]
    assert "float" in moe.constraints["T"] and moe.params[0][0] == "T"
    (qmoe,) = cuda[("com.microsoft", "QMoE")]
    assert "float" not in qmoe.constraints["T"]  # hence no QMoE on ort-cuda for float32 graphs (docs/ort_cuda.md)
    dq = next(r for r in cuda[("ai.onnx", "DequantizeLinear")] if r.covers(23))
    assert {"float8e4m3fn", "uint8"} <= dq.constraints["T1"] and "float" in dq.constraints["T2"]


def test_extract_md_keeps_lines_types_and_params(tmp_path):
    """The OperatorKernels.md parser: one row per table line, continuation lines inherit the op, line numbers kept."""
    md = tmp_path / "k.md"
    md.write_text("## Operators implemented by CPUExecutionProvider\n|**Operator Domain:** *ai.onnx*||||\n"
                  "|Abs|*in* X:**T**<br> *out* Y:**T**|13+|**T** = tensor(int8)|\n"
                  "## Operators implemented by CUDAExecutionProvider\n\n| Op Name | Parameters | OpSet Version | Types "
                  "Supported |\n|---------|------------|---------------|-----------------|\n"
                  "|**Operator Domain:** *ai.onnx*||||\n"
                  "|Cast|*in* input:**T1**<br> *out* output:**T2**|23+|**T1** = tensor(float), tensor(int64)<br/> "
                  "**T2** = tensor(float8e4m3fn)|\n|||[6, 22]|**T1** = tensor(float)<br/> **T2** = tensor(float)|\n"
                  "|**Operator Domain:** *com.microsoft*||||\n"
                  "|Loop2|*in* v:**V**<br> *out* w:**V**|1+|**V** = seq(tensor(float)), tensor(bool)|\n")
    rows = extract_kernels.from_md(str(md), "CUDAExecutionProvider")
    assert rows == [("ai.onnx", "Cast", 23, "", "T1=float,int64;T2=float8e4m3fn", "in=T1;out=T2", 9),
                    ("ai.onnx", "Cast", 6, 22, "T1=float;T2=float", "in=T1;out=T2", 10),
                    ("com.microsoft", "Loop2", 1, "", "V=seq(tensor(float)),bool", "in=V;out=V", 12)]


def test_rules_name_op_opset_and_type_with_their_source():
    """No row (Hardmax on CUDA), a type outside the row (Where over a computed bool), and a kernel-less node whose inputs
    are all CPU-side (Hardmax of a small constant) excused by the documented exception."""
    f, b = TensorProto.FLOAT, TensorProto.BOOL
    small = helper.make_tensor("c", f, [3], [1.0, 2.0, 3.0])
    model = _model(
        [helper.make_node("Hardmax", ["x"], ["y"], name="hardmax_x"), helper.make_node("Hardmax", ["c"], ["z"], name="hardmax_c"),
         helper.make_node("Where", ["m", "m", "m"], ["w"], name="where_bool"),
         helper.make_node("Sign", ["x"], ["s"], name="sign_ok")],
        [helper.make_tensor_value_info("x", f, [4, 3])],
        [helper.make_tensor_value_info(n, t, None) for n, t in (("y", f), ("z", f), ("w", b), ("s", f))], [small])
    rep = _lint(model)
    got = {v.node: v for v in rep.violations}
    assert set(got) == {"hardmax_x", "where_bool"}
    assert got["hardmax_x"].source == "no row for op Hardmax in ort_cuda_kernels.tsv"
    assert got["where_bool"].rule.startswith("type: ") and " is bool, T of Where-16+ allows" in got["where_bool"].rule
    assert got["where_bool"].source.startswith(
        "ort_cuda_kernels.tsv:")
    assert list(rep.excepted.values()) == [1] and "cpu_shape_subgraph" in next(iter(rep.excepted))
    # the CPU EP has Hardmax; its Where has no bool kernel either (1.32.0's registry)
    assert [v.node for v in _lint(model, "ort-cpu").violations] == ["where_bool"]


def _plant(art, dst, graph="decode"):
    """A copy of `art` with one node that ORT's CUDA EP has no kernel (and ONNX no function body) for, Hardmax, on a
    float activation, made a graph output so that nothing prunes it; the manifest's hashes follow."""
    shutil.copytree(art, dst)
    man = artifact.load_manifest(dst, verify=False)
    path = dst / f"{graph}.onnx"
    model = onnx.load(path, load_external_data=False)
    x = next(o for n in model.graph.node if n.op_type == "MatMul" for o in n.output)
    model.graph.node.append(helper.make_node("Hardmax", [x], ["lint.planted"], name="planted_hardmax"))
    model.graph.output.append(helper.make_tensor_value_info("lint.planted", TensorProto.FLOAT, None))
    onnx.save(model, path)
    man["files"][path.name] = {"bytes": path.stat().st_size, "sha256": artifact.sha256(path)}
    artifact.write_manifest(dst, man)
    return dst


def test_ort_cuda_lint_passes_on_tiny_and_names_a_planted_node(tiny_artifact_cuda, tmp_path, capsys):
    """tiny as exported by default (packed FP8/MXFP4, quant_sim on) through the ort-cuda pipeline: zero violations;
    with a CPU-only node planted, `dsv4 lint` names that node, its op, rule and source, and exits 1."""
    rep = lint.lint_artifact(tiny_artifact_cuda)
    assert rep.target == "ort-cuda" and not rep.violations, "\n".join(v.line() for v in rep.violations[:20])
    assert set(rep.nodes) == set(GRAPHS)
    assert main(["lint", str(tiny_artifact_cuda)]) == 0
    bad = _plant(tiny_artifact_cuda, tmp_path / "planted")
    capsys.readouterr()
    assert main(["lint", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "decode\tplanted_hardmax\tai.onnx::Hardmax\tno kernel for ai.onnx::Hardmax\tno row for op Hardmax in " \
                     "ort_cuda_kernels.tsv"
    assert out[-1].startswith("# lint ort-cuda: 1 violation(s)")


def test_ort_cuda_lint_passes_on_tiny_float32(tiny_artifact_f32_cuda):
    """tiny with float32 weights and quant_sim off through the ort-cuda pipeline (com.microsoft.MoE): zero violations."""
    rep = lint.lint_artifact(tiny_artifact_f32_cuda)
    assert not rep.violations, "\n".join(v.line() for v in rep.violations[:20])


def test_ort_cpu_lint_passes_on_the_default_artifact(tiny_artifact_default):
    """The ort-cpu pipeline's output (QMoE-free default: quant_sim on) against the CPU EP table of 1.32.0."""
    rep = lint.lint_artifact(tiny_artifact_default, "ort-cpu")
    assert not rep.violations, "\n".join(v.line() for v in rep.violations[:20])


def test_unknown_target_is_a_user_error(tiny_artifact):
    with pytest.raises(ValueError, match="no profile for target"):
        lint.lint_artifact(tiny_artifact, "tvm-llvm", verify=False)


@pytest.mark.slow  # an export of small (several minutes on 2 cores) and the ort-cuda pipeline
def test_ort_cuda_lint_passes_on_small(tmp_path):
    """small as exported by default (packed FP8/MXFP4, quant_sim on) through the ort-cuda pipeline: every weighted
    RMSNorm fused, every MoE narrowed, zero violations against the CUDA table."""
    from conftest import cuda_artifact

    from dsv4.export.export import export_artifact
    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset

    args = preset("small")
    ckpt = write_synthetic(args, tmp_path / "ckpt", seed=0, progress=False)
    raw = export_artifact(tmp_path / "raw", checkpoint=ckpt, max_seq_len=1024, progress=False).path
    counts = cuda_artifact(raw, tmp_path / "cuda")
    for g in GRAPHS:
        print(g, {k: counts[g][k] for k in ("lower_cuda", "fuse_norm", "nodes")})
        assert counts[g]["lower_cuda"]["narrowed MoE"] == args.n_layers
        assert counts[g]["fuse_norm"]["SimplifiedLayerNormalization"] == counts[g]["fuse_norm"]["expected"] > 0
    rep = lint.lint_artifact(tmp_path / "cuda")
    print(rep.nodes, rep.excepted)
    assert not rep.violations, "\n".join(v.line() for v in rep.violations[:20])
