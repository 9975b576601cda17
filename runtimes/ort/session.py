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
    tgt = get_target(target)
    want = list(providers) if providers else list(tgt.providers or ("CPUExecutionProvider",))
    have = ort.get_available_providers()
    if not providers and tgt.cpu_fallback:  # e.g. ascend without onnxruntime-cann: the CPU run is its parity check
        want = [p for p in want if p in have] or ["CPUExecutionProvider"]
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
    settings = ort_settings(manifest)
    for k, v in settings.get("session_config_entries", {}).items():
        so.add_session_config_entry(k, str(v))
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so, list(settings["disabled_optimizers"])


def ort_settings(manifest: dict) -> dict:
    """The manifest's ``onnxruntime`` section (export/package.py); artifacts written before it: the same rules."""
    if manifest.get("onnxruntime"):
        return manifest["onnxruntime"]
    return {"disabled_optimizers": ["ConstantFolding"] if manifest["weights"] == "packed" else [],
            "session_config_entries": {}, "environment": {"ORT_QMOE_CPU_QNBIT_GEMM": "fp32"}}


TAP = "layer{}.streams"  # graph output name of a decoder layer's output streams in a tapped copy


def layer_output_values(path: Path, hc_mult: int, dim: int) -> list[str]:
    """Names of the values that carry each decoder layer's output streams [B, T, hc_mult, dim] out of the layer, in
    layer order: produced by a node of layers.i (torch's module path in the node metadata), read by a node outside
    it. Raises if a layer has none or several (the graph no longer says where its layers end)."""
    import onnx_ir as ir

    from dsv4.passes._graph import layer_of

    model = ir.load(str(path))
    found: dict[int, set[str]] = {}
    for node in model.graph:
        layer = layer_of(node)
        if layer is None or not layer.startswith("layers."):
            continue
        for v in node.outputs:
            if v.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16) or v.shape is None \
                    or v.shape.rank() != 4 or list(v.shape)[2:] != [hc_mult, dim]:
                continue
            if any(layer_of(u.node) != layer for u in v.uses()) or v.is_graph_output():
                found.setdefault(int(layer.split(".")[1]), set()).add(v.name)
    n_layers = max(found) + 1 if found else 0
    bad = [i for i in range(n_layers) if len(found.get(i, ())) != 1]
    if not found or bad:
        raise ValueError(f"{path}: cannot tap the decoder layers' outputs: layer(s) {bad or 'all'} have "
                         f"{[sorted(found.get(i, ())) for i in bad] if bad else 'no'} [B,T,{hc_mult},{dim}] output "
                         "values read outside the layer")
    return [next(iter(found[i])) for i in range(n_layers)]


def tapped_model(art: Path, graph_file: str, hc_mult: int, dim: int) -> bytes:
    """`graph_file` with extra outputs ``layer{i}.streams``: the decoder layers' output streams (an Identity of each
    tapped value), serialised for a session built in memory; the artifact is not touched (its weights are read in
    place, see load_sessions)."""
    import onnx

    values = layer_output_values(art / graph_file, hc_mult, dim)
    m = onnx.load(str(art / graph_file), load_external_data=False)
    for i, v in enumerate(values):
        name = TAP.format(i)
        m.graph.node.append(onnx.helper.make_node("Identity", [v], [name], name=f"tap_{name}"))
        m.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    return m.SerializeToString()


def load_sessions(art: str | Path, providers: list[str] | None = None, optimization: str = "all",
                  threads: int | None = None, spinning: bool = False, verify: bool = True,
                  layer_taps: bool = False) -> tuple[dict, dict[str, ort.InferenceSession]]:
    """(manifest, {"prefill": session, "decode": session}); verifies the artifact's hashes unless verify=False.
    layer_taps: run copies of the graphs that also output every decoder layer's streams (``tapped_model``)."""
    art = Path(art)
    man = load_manifest(art, verify=verify)
    provs = providers_for(man["target"], providers)
    # the environment the artifact's kernels are exact under, e.g. QMoE (passes/lower_ort.py: MXFP4 experts as int8
    # blocks of 32) only on ORT's dequantise + fp32 GEMM path; by default its CPU kernel quantises the activations to
    # int8 (rel. error 1e-2). Read at session creation; a value the user set wins.
    for k, v in ort_settings(man).get("environment", {}).items():
        os.environ.setdefault(k, str(v))
    so, disabled = session_options(man, optimization, threads, spinning)
    if man.get("rank"):  # one rank of an expert-parallel artifact (export/ranks.py): the all-reduce kernel
        from .distributed import session_library

        session_library(man, so)
    models: dict = {g: str(art / info["file"]) for g, info in man["graphs"].items()}
    if layer_taps:  # in-memory graphs read their external weights from the artifact directory
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(art.resolve()))
        cfg = man["config"]
        models = {g: tapped_model(art, info["file"], cfg["hc_mult"], cfg["dim"]) for g, info in man["graphs"].items()}
    cann = man.get("ascend", {}).get("cann_ep", {}).get("provider_options")
    if cann and "CANNExecutionProvider" in provs:  # the options the artifact was built for (export/static.py)
        provs = [("CANNExecutionProvider", cann) if p == "CANNExecutionProvider" else p for p in provs]
    sessions = {g: ort.InferenceSession(m, so, providers=provs, disabled_optimizers=disabled)
                for g, m in models.items()}
    if man.get("rank"):  # a failed all-reduce raises CollectiveError from run()
        from .distributed import wrap_sessions

        sessions = wrap_sessions(man, sessions)
    return man, sessions
