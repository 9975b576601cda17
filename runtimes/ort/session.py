"""ONNX Runtime sessions for an artifact (the only place, with its siblings, that imports onnxruntime).

Packed artifacts disable ORT's ConstantFolding: otherwise ORT folds the inlined dequant bodies of the
uint8 weights into fp32 initializers at load (ECOSYSTEM.md V2b/V11.5), 4-8x the memory and no longer the
artifact's numerics path. Float artifacts keep it (it pre-transposes weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from dsv4.export.artifact import load_manifest
from dsv4.export.targets import get_target

OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def providers_for(target: str, providers: list[str] | None = None) -> list[str]:
    """The execution providers to use: `providers` if given, else the target's, checked against this build."""
    want = list(providers) if providers else list(get_target(target).providers or ("CPUExecutionProvider",))
    have = ort.get_available_providers()
    missing = [p for p in want if p not in have]
    if missing:
        raise ValueError(f"providers: {', '.join(missing)} not available in this onnxruntime build "
                         f"(available: {', '.join(have)}); ort-cuda needs onnxruntime-gpu and a GPU")
    return want


def session_options(manifest: dict, optimization: str = "all", threads: int | None = None,
                    spinning: bool = False) -> tuple[ort.SessionOptions, list[str]]:
    """(options, disabled optimizers) for an artifact. threads: intra-op threads (None: ORT's default, one per
    core). spinning: let idle ORT threads spin (lower latency on an idle machine; steals CPU from everything
    else, e.g. the eager model in a parity run)."""
    if optimization not in OPTIMIZATION:
        raise ValueError(f"optimization: expected one of {', '.join(OPTIMIZATION)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION[optimization]
    if threads is not None:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    disabled = ["ConstantFolding"] if manifest["weights"] == "packed" else []
    return so, disabled


def load_sessions(art: str | Path, providers: list[str] | None = None, optimization: str = "all",
                  threads: int | None = None, spinning: bool = False,
                  verify: bool = True) -> tuple[dict, dict[str, ort.InferenceSession]]:
    """(manifest, {"prefill": session, "decode": session}); verifies the artifact's hashes unless verify=False."""
    art = Path(art)
    man = load_manifest(art, verify=verify)
    provs = providers_for(man["target"], providers)
    # QMoE (passes/lower_ort.py: MXFP4 experts as int8 blocks of 32) is exact only on ORT's dequantise + fp32 GEMM
    # path; by default its CPU kernel quantises the activations to int8 (rel. error 1e-2). Read at session creation.
    os.environ.setdefault("ORT_QMOE_CPU_QNBIT_GEMM", "fp32")
    so, disabled = session_options(man, optimization, threads, spinning)
    sessions = {g: ort.InferenceSession(str(art / info["file"]), so, providers=provs, disabled_optimizers=disabled)
                for g, info in man["graphs"].items()}
    return man, sessions
