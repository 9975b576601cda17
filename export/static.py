"""Static-shape targets (ascend, docs/ascend.md): the bucket plan, the save-time opset conversion, and what a user
runs on the device (ATC command lines, ONNX Runtime CANN EP options), recorded in the manifest.

Every dim of a static artifact is a number: batch B, one prefill graph per bucket length T (prompts are right-padded
up to the next bucket; the ``lengths`` input keeps the padding out of the state), and the decode state's capacity
``max_seq_len``. ATC compiles one offline model per shape and ORT's CANN EP one per distinct input-shape set
(NOTES.md §2.3), so fixed shapes are what both gates compile once.
"""

from __future__ import annotations

import onnx
import onnx.numpy_helper
import onnx.version_converter

from dsv4.models.config import ModelArgs

from .targets import Target

DEFAULT_LENGTHS = (128, 1024)
DEFAULT_SOC = "Ascend910B3"  # Atlas A2 (NOTES.md §3); ATC's --soc_version takes the chip name without spaces
# fp16 graph with fp32 islands (router softplus, RMS sums, Sinkhorn, attention softmax): CANN's default precision
# mode casts fp32 operators down to fp16 (NOTES.md §4.4), which overflows exactly there; keep the graph's dtypes.
PRECISION_MODE = "must_keep_origin_dtype"


def parse_lengths(text: str | None) -> tuple[int, ...] | None:
    """``--prefill-lengths 128,1024,4096`` -> (128, 1024, 4096)."""
    if text is None:
        return None
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--prefill-lengths: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise ValueError("--prefill-lengths: no length given")
    return out


def static_shapes(target: Target, args: ModelArgs, batch: int | None, lengths: tuple[int, ...] | None) -> dict | None:
    """{"batch", "prefill_lengths", "max_seq_len"} of a static target (checked), None for a dynamic one."""
    if target.dynamic:
        return None
    batch = 1 if batch is None else batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch: expected an integer >= 1, got {batch!r}")
    cap = args.max_seq_len
    if lengths is None:
        lengths = tuple(n for n in DEFAULT_LENGTHS if n <= cap) or (cap,)
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cap]
    if bad:
        raise ValueError(f"--prefill-lengths: {bad} not in [1, max_seq_len={cap}]")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"--prefill-lengths: duplicate lengths in {list(lengths)}")
    return {"batch": batch, "prefill_lengths": sorted(lengths), "max_seq_len": cap}


def finalize(proto: onnx.ModelProto, target: Target) -> onnx.ModelProto:
    """The graph as saved: converted from the trace opset down to the target's (e.g. 18 -> 17: the Reduce* axes
    inputs become attributes) by onnx's version converter; a no-op for targets traced at their own opset."""
    if target.trace_opset is None or target.trace_opset == target.opset:
        return proto
    if [(o.domain, o.version) for o in proto.opset_import] != [("", target.trace_opset)] or proto.functions:
        left = [f"{o.domain or 'ai.onnx'}:{o.version}" for o in proto.opset_import]
        raise ValueError(f"{target.name}: expected a plain ai.onnx:{target.trace_opset} graph before the opset "
                         f"conversion, got opset imports {left} and {len(proto.functions)} functions (a pass left them)")
    for node in proto.graph.node:  # the converter reads Constant values only from the `value` attribute
        if node.op_type == "Constant" and node.attribute[0].name != "value":
            node.CopyFrom(_constant_as_tensor(node))
    out = onnx.version_converter.convert_version(proto, target.opset)
    out.ir_version = min(out.ir_version, onnx.IR_VERSION)
    for node in out.graph.node:  # left by the 18 -> 17 Reduce* adapter; opset 13's Reduce* (but ReduceSum) lack it
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes" or a.i != 0]
            if len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)
    return out



def _constant_as_tensor(node: onnx.NodeProto) -> onnx.NodeProto:
    """Constant(value_float / value_floats / value_int / value_ints = v) as Constant(value = tensor v)."""
    import numpy as np

    (a,) = node.attribute
    kind = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if a.name not in kind:
        raise ValueError(f"Constant {node.name!r}: attribute {a.name} cannot be converted")
    v = np.asarray(onnx.helper.get_attribute_value(a), dtype=kind[a.name])
    t = onnx.numpy_helper.from_array(v)
    return onnx.helper.make_node("Constant", [], list(node.output), name=node.name, value=t)


def device_section(graphs: dict[str, dict], shapes: dict, soc: str = DEFAULT_SOC) -> dict:
    """The manifest's "ascend" entry: per graph the ATC command line, and ONNX Runtime CANN EP options."""
    atc = {}
    for key, info in graphs.items():
        shape = ";".join(f"{i['name']}:{','.join(str(d) for d in i['dims']) or ''}" for i in info["inputs"])
        out = info["file"].removesuffix(".onnx").replace(".", "_")
        atc[key] = (f"atc --model={info['file']} --framework=5 --output={out} --soc_version={soc} "
                    f"--input_format=ND --input_shape=\"{shape}\" --precision_mode={PRECISION_MODE}")
    return {
        "soc_version": soc,
        "precision_mode": PRECISION_MODE,
        "atc": atc,
        "cann_ep": {  # onnxruntime-cann: InferenceSession(file, so, providers=[("CANNExecutionProvider", options)])
            "provider_options": {"device_id": "0", "enable_cann_graph": "1", "precision_mode": PRECISION_MODE,
                                 "dump_om_model": "1"},
            "session_options": {"graph_optimization_level": "ORT_DISABLE_ALL"},
        },
        "note": "soc_version is the chip ATC compiles for (Ascend910B1-B4 = Atlas A2, Ascend910_93xx = A3, "
                "Ascend310P1/3/5/7 = Atlas inference; NOTES.md §3); run atc with the artifact's weights.data beside "
                "the model file (external data)",
    }
