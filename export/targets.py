"""The target table: one row per back end an artifact is exported for, read by every stage (DESIGN.md "Targets").

The ai.onnx opset is pinned per target and never left to onnx's default (28, which ONNX Runtime rejects):
ORT 1.31/1.32 accept up to 26; 23 is the opset whose standard RMSNormalization / RotaryEmbedding / Attention
the onnxscript fusions target, and the FP8 rounding (Cast to FLOAT8E4M3FN) needs at least 19.
"""

from __future__ import annotations

from dataclasses import dataclass

# --weights: "packed" keeps FP8/MXFP4 bytes (dequantised in-graph); the float modes dequantise at export and run
# the model in that dtype. float64 is for exactness tests. No bfloat16: ai.onnx Einsum (the grouped output
# projection, the mHC mix) has no bfloat16 type up to opset 26, so a bf16 graph fails onnx.checker.
WEIGHT_MODES = ("packed", "float32", "float16", "float64")
# --experts (ORT targets, packed weights): "packed" keeps the checkpoint's MXFP4 bytes (the selected experts
# dequantised in-graph), "int8" QMoE's lossless int8 blocks (2x the expert bytes). docs/export.md "Real size".
EXPERT_MODES = ("packed", "int8")


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # "ort" or "tvm": which runtimes/ package runs it
    opset: int  # ai.onnx opset of both graphs and of the attached function bodies
    providers: tuple[str, ...]  # ONNX Runtime execution providers, in preference order (ORT targets)
    weights: tuple[str, ...]  # accepted --weights modes; the first is the default
    dynamic: bool  # batch and prefill length dynamic (else: exported per static bucket)
    note: str
    trace_opset: int | None = None  # opset the graph is traced and transformed at, when the target's is lower
    cpu_fallback: bool = False  # accelerator EPs that this onnxruntime build lacks are dropped (parity on CPU)
    compact_state: bool = True  # FP8/MXFP4 codes in the decode state where simulated (docs/state_layout.md)
    growable_state: bool = False  # cache rows symbolic + prefill `capacity` input (docs/capacity.md)
    experts: tuple[str, ...] = ()  # --experts with packed weights: how MXFP4 expert stacks are stored, the first the
    # default (export/experts.py); empty where the lowering has one form only (TVM: its own bodies; ascend: float)
    bf16_initializers: bool = False  # packed weights through the passes: BF16 checkpoint tensors (embedding, head)
    # stay BF16 + one Cast per call (export/stream.py keep_bf16): half their bytes for a cast of ~2 GB per call at
    # Flash size. ort-cpu only: on a GPU, whose decode step is bound by the bytes it moves, the cast would read
    # 1.06 GB and write 2.1 GB per step to save 2.1 GB of disk per tensor (docs/export.md "Real size").

    @property
    def graph_opset(self) -> int:
        """The opset of the graph between tracing and save (``opset`` once saved)."""
        return self.trace_opset or self.opset

    @property
    def default_weights(self) -> str:
        return self.weights[0]


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ort-cpu", "ort", 23, ("CPUExecutionProvider",), WEIGHT_MODES, True,
           "ONNX Runtime CPU EP; dsv4 ops run their function bodies (inlined by ORT)", growable_state=True,
           experts=EXPERT_MODES, bf16_initializers=True),
    Target("ort-cuda", "ort", 23, ("CUDAExecutionProvider", "CPUExecutionProvider"), WEIGHT_MODES, True,
           "ONNX Runtime CUDA EP (onnxruntime-gpu, extra 'cuda'); MoE -> com.microsoft.MoE, packed weights -> "
           "DequantizeLinear where the CUDA kernel table covers them (docs/ort_cuda.md), other dsv4 ops inlined", growable_state=True,
           experts=EXPERT_MODES),
    Target("tvm-llvm", "tvm", 23, (), WEIGHT_MODES, True, "Apache TVM Relax, llvm"),
    Target("tvm-cuda", "tvm", 23, (), WEIGHT_MODES, True, "Apache TVM Relax, CUDA code generation"),
    # docs/ascend.md: opset 17 (the ceiling under CANN's 18), one opset import, every dsv4 op inlined to
    # standard ops, FP8/FP4 dequantised at export (A2/A3/310P have no FP8/FP4 kernels), static shapes per bucket.
    # Traced at 18 (torch's exporter's own opset) and converted down to 17 at save (onnx.version_converter).
    Target("ascend", "ort", 17, ("CANNExecutionProvider", "CPUExecutionProvider"), ("float16", "float32"), False,
           "Huawei Ascend through ATC (atc --framework=5) or ONNX Runtime's CANN EP: plain ai.onnx opset 17, static "
           "shapes (batch, prefill buckets, decode-state capacity), float16 with float32 islands",
           trace_opset=18, cpu_fallback=True, compact_state=False),  # float16 state: no uint8 code tables on ATC
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"target: unknown target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]
