"""tvm-cuda for the export configurations, without a GPU: CUDA source -> nvcc PTX -> ptxas, and the schedule census.

`dsv4 compile --target tvm-cuda` runs ``nvcc -ptx -arch=<arch>`` on each graph's CUDA source and ``ptxas
-arch=<arch> <graph>.ptx -o /dev/null`` on the result (it raises on any error; the manifest then says "ptxas":
"ok"), so a passing compile means every kernel of the graph assembles for that architecture. Batch and length
stay symbolic. Costs on 2 shared cores: the fast tier builds single ops only (seconds); every graph compile is
slow: the default export's decode graph (~7 min: the quant_sim kernels), both graphs of each export
configuration, a float16 export (~10-15 min together). The fast suite's graph to PTX is tests/test_tvm.py's
float32 decode graph (~1 min).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import fuse_artifact

from dsv4.export import custom_ops
from dsv4.tools.cli import main

pytestmark = pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("ptxas")),
                                reason="needs nvcc and ptxas on the PATH (CUDA toolkit) for PTX checks")


@pytest.fixture(scope="session")
def tiny_artifact_tvm_cuda(tiny_artifact, tmp_path_factory):
    """The default tiny export for tvm-cuda: packed FP8/MXFP4 weights, quant_sim on, fp32 activations."""
    dst = tmp_path_factory.mktemp("tvm_cuda") / "packed"
    fuse_artifact(tiny_artifact, dst, "tvm-cuda")
    return dst


@pytest.fixture(scope="session")
def tiny_artifact_tvm_cuda_f16(tiny_checkpoint, tmp_path_factory):
    """tiny exported with --weights float16 (fp16 activations), quant_sim on, through the tvm-cuda pipeline."""
    from dsv4.export.export import export_artifact

    raw = export_artifact(tmp_path_factory.mktemp("art") / "tiny_f16", checkpoint=tiny_checkpoint, max_seq_len=1024,
                          weights="float16", progress=False).path
    dst = tmp_path_factory.mktemp("tvm_cuda") / "f16"
    fuse_artifact(raw, dst, "tvm-cuda")
    return dst


@pytest.fixture(scope="session")
def tiny_artifact_tvm_cuda_f32(tiny_artifact_f32, tmp_path_factory):
    """tiny_artifact_f32 (float32 weights, quant_sim off) through the tvm-cuda pipeline."""
    dst = tmp_path_factory.mktemp("tvm_cuda") / "f32"
    fuse_artifact(tiny_artifact_f32, dst, "tvm-cuda")
    return dst


def compile_cuda(art, out, arch: str, graphs: str) -> dict:
    assert main(["compile", str(art), "--target", "tvm-cuda", "--arch", arch, "--graphs", graphs, "--out", str(out),
                 "--no-progress"]) == 0
    return json.loads((out / "manifest.json").read_text())


def check_graph(out, cm: dict, graph: str, arch: str) -> None:
    """PTX for `arch` that ptxas accepted; every dsv4 kernel on a dsv4 schedule, none on dlight's Fallback."""
    info = cm["graphs"][graph]
    ptx = (out / info["ptx"]).read_text()
    assert f".target {arch}" in ptx
    assert info["ptxas"] == "ok"  # compile ran ptxas -arch=<arch> on it and raises on any error
    census = info["schedule_of"]
    assert sum(info["schedules"].values()) == len(census)
    kernels = {k: s for k, s in census.items() if k.startswith("dsv4_")}
    assert kernels and not [k for k, s in kernels.items() if s == "Fallback"], kernels
    assert {s for k, s in kernels.items() if "linear" in k} <= {"dsv4-linear"}  # none with float weights
    assert {"dsv4-row", "Matmul"} <= set(info["schedules"])


FORMAT_OPS = ("Fp8Linear", "Mxfp4Linear", "Fp8Dequant", "Mxfp4Dequant")  # the packed-format decoders: fast tier


@pytest.mark.parametrize("row", [r if r.name in FORMAT_OPS else pytest.param(r, marks=pytest.mark.slow)
                                 for r in custom_ops.REGISTRY if r.tvm != "inline"], ids=lambda r: r.name)
def test_every_lowering_assembles_for_sm90(row, tmp_path):
    """Each lowered dsv4 op alone (its registry sample, the first case): CUDA build, nvcc PTX and ptxas for sm_90,
    on a dsv4 schedule. Covers Mxfp4Linear, which the tiny graphs do not use (experts go through MoEExperts).
    The row-scheduled ops are slow here (HcSplitSinkhorn, SparseAttn ~1 min each) and covered by the graphs."""
    import onnx_ir as ir

    from dsv4.runtimes.tvm import backend, frontend

    inputs, attrs = custom_ops.load(row.sample)(np.random.default_rng(0), np.dtype("float32"))[0]
    n_out = len(row.outputs)
    mod, _ = frontend.import_model(ir.serde.serialize_model(custom_ops.op_model(row.name, inputs, attrs, [4] * n_out)))
    census: dict[str, str] = {}
    ex = backend.build(mod, backend.make_target("tvm-cuda", "sm_90"), census)
    kernels = {k: v for k, v in census.items() if k.startswith("dsv4_")}
    assert kernels and set(kernels.values()) <= {"dsv4-row", "dsv4-linear", "spatial"}, census
    if "Linear" in row.name:
        assert set(kernels.values()) == {"dsv4-linear"}
    ptx = backend.ptx(backend.cuda_source(ex), "sm_90", tmp_path / "k.ptx")
    assert ".target sm_90" in ptx.read_text()
    backend.ptxas(ptx, "sm_90")


@pytest.mark.slow  # 434 s of the 16-min fast suite; default-sm_90 below compiles this graph (and prefill) too
def test_default_export_decode_sm90(tiny_artifact_tvm_cuda, tmp_path, capsys):
    """The default export (packed, quant_sim on, symbolic batch): the decode graph to sm_90 PTX; census printed."""
    out = tmp_path / "cuda"
    cm = compile_cuda(tiny_artifact_tvm_cuda, out, "sm_90", "decode")
    check_graph(out, cm, "decode", "sm_90")
    assert cm["graphs"]["decode"]["schedules"]["dsv4-linear"] >= 1
    text = capsys.readouterr().out  # not a terminal: plain lines, one function per line
    assert "schedule census" in text and "function=dsv4_fp8_linear  schedule=dsv4-linear" in text


def test_ort_artifact_is_refused_in_one_line(tiny_artifact_default, tmp_path, capsys):
    """An ort-cpu export (com.microsoft MoE/QMoE) is refused with one line naming the export to run."""
    assert main(["compile", str(tiny_artifact_default), "--target", "tvm-cuda", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "ort-cpu" in err and "dsv4 export " in err and "--target tvm-cuda --weights packed" in err
    assert not (tmp_path / "x").exists()


def test_census_printing_never_wraps_names(capsys):
    from dsv4.tools.cmd_compile import print_compiled

    long = "fused_matmul1_maximum11_tir_abs3_tir_negative1_tir_exp_add14_tir_log2_greater_add15_where9_tir_sqrt2"
    info = {"library": "decode.so", "lowered": {}, "inlined": [], "params": [], "seconds": {"import": 1, "build": 2},
            "schedules": {"Matmul": 1, "Fallback": 1}, "schedule_of": {long: "Matmul", "add": "Fallback"}}
    print_compiled({"target": "tvm-cuda", "arch": "sm_90", "graphs": {"decode": info}}, "ART", "OUT", terminal=False)
    lines = capsys.readouterr().out.splitlines()
    assert f"  graph=decode  function={long}  schedule=Matmul" in lines
    assert "  schedule=Fallback  decode=1" in lines and not any("function=add" in ln for ln in lines)


@pytest.mark.slow  # each case compiles both graphs (~7-14 min on 2 shared cores); float16 adds its export
@pytest.mark.parametrize("config, arch", [("tiny_artifact_tvm_cuda", "sm_90"), ("tiny_artifact_tvm_cuda_f16", "sm_90"),
                                          ("tiny_artifact_tvm_cuda_f16", "sm_80"),
                                          ("tiny_artifact_tvm_cuda_f32", "sm_90")],
                         ids=["default-sm_90", "float16-sm_90", "float16-sm_80", "float32-nosim-sm_90"])
def test_export_configurations_both_graphs(config, arch, request, tmp_path):
    """Both graphs of the default export (packed, quant_sim on, fp32), a float16 export (the linears cast their fp32
    sums back in the epilogue) and a float32 quant_sim-off export, to PTX that ptxas accepts."""
    out = tmp_path / "cuda"
    cm = compile_cuda(request.getfixturevalue(config), out, arch, "prefill,decode")
    for g in ("prefill", "decode"):
        check_graph(out, cm, g, arch)
