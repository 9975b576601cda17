"""passes/lint_ascend.py: the ``ascend`` lint profile on hand-built graphs (one planted violation per rule class), its
data files (unmodified copies, hashes recorded) and ``dsv4 lint --target ascend`` on a multi-bucket artifact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsv4.export import artifact
from dsv4.passes import ascend_limits, lint, lint_ascend
from dsv4.tools.cli import main

F16, F32, I64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT64
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "ascend"


def _row(op: str, domain: str = "ai.onnx") -> str:
    """`file:line` of op's row in the shipped parser table, found independently of the linter's loader."""
    lines, key = lint_ascend.PARSER_TABLE.read_text().splitlines(), f"{op}\t{domain}\t"
    return f"atc_onnx_ops.tsv:{next(i for i, s in enumerate(lines, 1) if s.startswith(key))}"


def _notes(text: str) -> str:
    lines = lint_ascend.NOTES.read_text().splitlines()
    return f"NOTES.md:{next(i for i, s in enumerate(lines, 1) if text in s)}"


def _clean(opset: int = 17, x_dims=(2, 4), extra_nodes=(), extra_inits=(), extra_outputs=(), imports=()):
    """A small static opset-17 graph in plain ai.onnx: embedding Gather, MatMul, Softmax, TopK, a Constant, a Cast."""
    inits = [numpy_helper.from_array(np.ones((16, 8), np.float16), "emb"),
             numpy_helper.from_array(np.ones((8, 8), np.float16), "w"),
             numpy_helper.from_array(np.array([2], np.int64), "k"), *extra_inits]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "w"], ["hw"], name="proj"),
             helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(np.float16(0.5))),
             helper.make_node("Mul", ["hw", "c"], ["hs"], name="scale"),
             helper.make_node("Softmax", ["hs"], ["p"], name="softmax", axis=-1),
             helper.make_node("TopK", ["p", "k"], ["tv", "ti"], name="topk"),
             helper.make_node("Cast", ["tv"], ["out"], name="cast", to=F32), *extra_nodes]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", I64, list(x_dims))],
                          [helper.make_tensor_value_info("out", F32, [*x_dims, 2]),
                           helper.make_tensor_value_info("ti", I64, [*x_dims, 2]), *extra_outputs], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *imports])


def _lint(model: onnx.ModelProto) -> lint.Report:
    prof = lint.PROFILES["ascend"]()
    rep = lint.Report("ascend", [], {}, {})
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    lint.lint_model(model, "g", prof, rep)
    return rep


def _hits(rep: lint.Report, rule: str) -> list[lint.Violation]:
    return [v for v in rep.violations if v.rule.startswith(f"{rule}: ")]


def test_clean_static_opset17_graph_has_no_violation():
    rep = _lint(_clean())
    assert rep.violations == [] and rep.nodes == {"g": 7} and rep.info == []


def test_model_opset_above_17_and_an_op_registered_only_at_other_opsets():
    """Model opset 18 (a ceiling of the target, CANN's parser stops at 18); Mish at opset 17 (registered for 18 only);
    LayerNormalization at opset 16 (17-18 only)."""
    (v,) = _hits(_lint(_clean(opset=18)), "opset")
    assert (v.node, v.op, v.source) == ("(model)", "-", _notes("model ai.onnx opset must be ≤"))
    assert "opset 18 outside 8..17" in v.rule
    mish = helper.make_node("Mish", ["hs"], ["m"], name="mish")
    (v,) = _hits(_lint(_clean(extra_nodes=[mish])), "parser")  # (and cann_graph: not in the graph-mode list)
    assert (v.node, v.op, v.source) == ("mish", "ai.onnx::Mish", _row("Mish"))
    assert v.rule == "parser: ai.onnx::Mish is registered for opsets 18, the model's is 17"
    ln = helper.make_node("LayerNormalization", ["hs", "g1"], ["ln"], name="ln")
    g1 = numpy_helper.from_array(np.ones(8, np.float16), "g1")
    rep = _lint(_clean(opset=16, extra_nodes=[ln], extra_inits=[g1]))
    assert [v.source for v in _hits(rep, "parser")] == [_row("LayerNormalization")]


def test_second_opset_import():
    rep = _lint(_clean(imports=[helper.make_opsetid("com.microsoft", 1)]))
    (v,) = rep.violations
    assert (v.node, v.source) == ("(model)", _notes("**Single opset_import**"))
    assert v.rule.startswith("opset_import: 2 entries (ai.onnx 17, com.microsoft 1)")


def test_custom_domain_node_and_model_local_function():
    """A dsv4 node whose body is a model-local function: the function (model level) and the node's domain, each
    once; the node is not also reported as a parser or graph-list miss."""
    body = onnx.helper.make_function("dsv4", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
                                     [helper.make_opsetid("", 17)])
    node = helper.make_node("Twice", ["hs"], ["t"], name="twice", domain="dsv4")
    model = _clean(extra_nodes=[node], imports=[helper.make_opsetid("dsv4", 1)])
    model.functions.append(body)
    rep = _lint(model)
    got = {v.rule.split(":")[0]: v for v in rep.violations}
    assert set(got) == {"opset_import", "function", "domain"}
    assert (got["function"].node, got["function"].source) == ("(model)", _notes("for each node it forms"))
    assert "dsv4::Twice" in got["function"].rule
    assert (got["domain"].node, got["domain"].op) == ("twice", "dsv4::Twice")
    assert got["domain"].source == _notes("node domain must be the default ONNX domain")


def test_dynamic_dim_on_an_input_and_a_symbolic_intermediate():
    rep = _lint(_clean(x_dims=(2, "T")))
    src = _notes("Input dims with `dim_param` or no value")
    assert [(v.node, v.source) for v in _hits(rep, "dynamic_dim") if v.node.startswith("(")] == [
        ("(input ids)", src), ("(output out)", src), ("(output ti)", src)]
    inner = [v.node for v in _hits(rep, "dynamic_dim") if not v.node.startswith("(")]
    assert inner == ["embed", "proj", "scale", "softmax", "topk"]  # not cast: its output is a graph output


def test_zero_dim_except_constants():
    """A zero-size graph input; a zero-size Constant (allowed) whose consumer is not (every operator but Const)."""
    rep = _lint(_clean(x_dims=(2, 0)))
    assert [v.node for v in _hits(rep, "zero_dim")][0] == "(input ids)"
    empty = helper.make_node("Constant", [], ["e"], name="empty", value=numpy_helper.from_array(np.zeros((0, 8), np.float16)))
    cat = helper.make_node("Concat", ["hw", "e"], ["cat"], name="cat", axis=0)
    rep = _lint(_clean(x_dims=(4,), extra_nodes=[empty, cat],
                       extra_outputs=[helper.make_tensor_value_info("cat", F16, [4, 8])]))
    (v,) = rep.violations
    assert (v.node, v.rule, v.source) == ("cat", "zero_dim: e [0,8]", _notes("every operator except Const must"))


@pytest.mark.parametrize("dtype, reasons", [
    (TensorProto.FLOAT8E4M3FN, ["Lint rule that follows:"]),
    (TensorProto.FLOAT8E8M0, ["CANN ONNX parser element types", "Lint rule that follows:"]),
    (TensorProto.BFLOAT16, ["Lint rule that follows:"]),
    (TensorProto.INT4, ["CANN ONNX parser element types"]),
])
def test_forbidden_dtypes_on_an_initializer_and_a_value(dtype, reasons):
    """FP8 (and E8M0, also outside the parser's element types), BF16 (310P), INT4 (parser): on the initializer and on
    the Cast that makes a value of that type."""
    w8 = helper.make_tensor("w8", dtype, [8], np.zeros(8, np.int32).tolist() if dtype == TensorProto.INT4 else
                            np.zeros(8, np.uint16 if dtype == TensorProto.BFLOAT16 else np.uint8).tobytes(),
                            raw=dtype != TensorProto.INT4)
    cast = helper.make_node("Cast", ["hs"], ["q"], name="to_low", to=dtype)
    rep = _lint(_clean(extra_nodes=[cast], extra_inits=[w8]))
    src = ", ".join(_notes(r) for r in reasons)
    assert [(v.node, v.source) for v in rep.violations] == [("(initializer w8)", src), ("to_low", src)]
    assert rep.violations[0].rule.startswith(f"dtype: w8 is {TensorProto.DataType.Name(dtype).lower()} (")


def test_op_missing_from_the_parser_table_and_from_the_graph_list():
    """DequantizeLinear: no parser row (nor graph-list line); Tan: a parser row at 8-18 but not in the CANN EP list."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(np.ones(4, np.int8), "q8")]
    nodes = [helper.make_node("DequantizeLinear", ["q8", "s", "z"], ["dq"], name="dq"),
             helper.make_node("Tan", ["hs"], ["tan"], name="tan")]
    rep = _lint(_clean(extra_nodes=nodes, extra_inits=inits))
    got = sorted((v.node, v.rule.split(":")[0], v.source) for v in rep.violations)
    assert got == [("dq", "cann_graph", "cann_ep_graph_ops.txt:2: no line for op DequantizeLinear"),
                   ("dq", "parser", "atc_onnx_ops.tsv:8: no row for op DequantizeLinear"),
                   ("tan", "cann_graph", "cann_ep_graph_ops.txt:2: no line for op Tan")]
    assert "Unmatched key" in lint_ascend.PARSER_TABLE.read_text().splitlines()[7]
    assert "allow-list" in lint_ascend.GRAPH_OPS.read_text().splitlines()[1]


def test_attribute_limits_from_the_notes():
    """GatherND batch_dims=1 and ScatterND reduction='mul' break their rows' plugin notes; batch_dims=0 does not."""
    idx = numpy_helper.from_array(np.zeros((2, 1), np.int64), "gi")
    upd = numpy_helper.from_array(np.ones((2, 8), np.float16), "upd")
    nodes = [helper.make_node("GatherND", ["hw", "gi"], ["g1"], name="gnd1", batch_dims=1),
             helper.make_node("GatherND", ["hw", "gi"], ["g0"], name="gnd0"),
             helper.make_node("ScatterND", ["hw", "gi", "upd"], ["sc"], name="scatter_mul", reduction="mul")]
    rep = _lint(_clean(x_dims=(2,), extra_nodes=nodes, extra_inits=[idx, upd]))
    got = {v.node: v for v in rep.violations}
    assert set(got) == {"gnd1", "scatter_mul"}
    assert got["gnd1"].rule == "attribute: batch_dims=1; the parser's limit: 'batch_dims must be 0'"
    assert got["gnd1"].source == _row("GatherND")
    assert got["scatter_mul"].source == _row("ScatterND") and "reduction=mul" in got["scatter_mul"].rule


def test_no_graph_input():
    c = helper.make_node("Constant", [], ["y"], name="c", value=numpy_helper.from_array(np.ones(2, np.float16)))
    model = helper.make_model(helper.make_graph([c], "g", [], [helper.make_tensor_value_info("y", F16, [2])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    (v,) = _lint(model).violations
    assert (v.node, v.rule.split(":")[0], v.source) == ("(model)", "no_input", _notes("at least one input (E16001)"))


def test_unknown_intermediate_shapes_are_a_note_not_a_violation():
    """A Reshape to a computed shape that inference cannot follow: not a violation, counted in the report's notes."""
    nodes = [helper.make_node("Shape", ["hw"], ["sh"], name="shape"),
             helper.make_node("RandomUniformLike", ["sh"], ["r"], name="rnd", dtype=I64),
             helper.make_node("Reshape", ["hw", "r"], ["rs"], name="reshape")]
    rep = _lint(_clean(extra_nodes=nodes))
    assert rep.violations == []
    assert len(rep.info) == 1 and "left 1 of 11 node outputs" in rep.info[0]


def test_notes_grammar():
    assert lint_ascend.parse_versions("8-18") == frozenset(range(8, 19))
    assert lint_ascend.parse_versions("11,16-18") == {11, 16, 17, 18}
    assert lint_ascend.parse_versions("8-9,11-16") == {8, 9, *range(11, 17)}
    assert lint_ascend.parse_versions("any") is None and lint_ascend.parse_versions("unknown") == frozenset()
    lim, rest = ascend_limits.parse_notes("plugin: 2D/3D kernel only; storage_order must be 0; second output (Indices) "
                                          "rejected")
    assert [(x.kind, x.names, x.values) for x in lim] == [("one_of", ("storage_order",), ("0",)), ("no_output", (), ("1",))]
    assert rest == ("2D/3D kernel only",)
    # every "plugin:" clause that no grammar reads (docs/ascend_rules.md lists these as not checked)
    unparsed = {(r.op, c) for r in lint_ascend.load_parser_table().values() for c in r.unparsed
                if r.domain == "ai.onnx" and "plugin:" in lint_ascend.PARSER_TABLE.read_text().splitlines()[
                    int(r.where.split(":")[1]) - 1]}
    assert unparsed == {("EyeLike", "rejects unsupported dtype attribute values"), ("MaxPool", "2D/3D kernel only"),
                        ("Resize", "opset-18 attrs antialias, axes, keep_aspect_ratio_policy ignored with a warning"),
                        ("Split", "with num_outputs and no split sizes, the split axis (static) must divide evenly by "
                                  "num_outputs")}


def test_shipped_data_is_an_unmodified_copy():
    """Every file in sources.tsv has its recorded sha256 and size; equal to ../shared/ascend/ when that exists."""
    rows = [line.split("\t") for line in (lint_ascend.ASCEND / "sources.tsv").read_text().splitlines()
            if line and not line.startswith("#")][1:]
    assert {r[0] for r in rows} == {"NOTES.md", "atc_onnx_ops.tsv", "cann_ep_graph_ops.txt", "cann_ep_kernels.tsv"}
    for name, sha, size, _ in rows:
        data = (lint_ascend.ASCEND / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha, int(size)), name
        if SHARED.is_dir():
            assert data == (SHARED / name).read_bytes(), f"{name} differs from {SHARED / name}"


def _artifact(root: Path, graphs: dict[str, onnx.ModelProto], target: str = "ascend") -> Path:
    root.mkdir()
    for key, m in graphs.items():
        onnx.save(m, root / f"{key}.onnx")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": artifact.sha256(p)} for p in root.iterdir()}
    man = {"format": artifact.FORMAT, "format_version": artifact.FORMAT_VERSION, "target": target,
           "graphs": {k: {"file": f"{k}.onnx"} for k in graphs}, "files": files}
    (root / artifact.MANIFEST).write_text(json.dumps(man))
    return root


def test_lint_command_reads_every_graph_of_the_manifest(tmp_path, capsys):
    """Two prefill buckets and decode: all linted; `dsv4 lint --target ascend` prints one tab-separated line per
    violation (graph, node, op, rule, source) and exits 1; any profile runs on any artifact. (Keys "prefill" and
    "prefill.8": load_manifest of either artifact format reads them.)"""
    good = {"prefill": _clean(x_dims=(1, 4)), "prefill.8": _clean(x_dims=(1, 8)), "decode": _clean(x_dims=(1, 1))}
    art = _artifact(tmp_path / "good", good)
    assert lint.lint_artifact(art).nodes == {"prefill": 7, "prefill.8": 7, "decode": 7}
    assert main(["lint", str(art)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("# lint ascend: 0 violation(s)")
    bad = dict(good, **{"prefill.8": _clean(x_dims=(1, "T"))})
    art = _artifact(tmp_path / "bad", bad, target="ort-cpu")
    assert main(["lint", str(art), "--target", "ascend"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"prefill.8\t(input ids)\t-\tdynamic_dim: input ids is [1,T], not static\t" \
                     f"{_notes('Input dims with `dim_param`')}"
    assert all(len(line.split("\t")) == 5 for line in out if not line.startswith("#"))
    assert {line.split("\t")[0] for line in out if not line.startswith("#")} == {"prefill.8"}
    assert main(["lint", str(art)]) == 1  # the manifest's ort-cpu: no float16 MatMul/Softmax kernels on the CPU EP
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("prefill\tproj\tai.onnx::MatMul\ttype: ") and out[-1].startswith("# lint ort-cpu: ")
