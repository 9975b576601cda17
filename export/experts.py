"""``--experts``: how an ort-cpu artifact with packed weights stores the MXFP4 routed experts (docs/export.md
"Real size": "packed" keeps the checkpoint's bytes, "int8" QMoE's blocks), and how the choice reaches the ORT
lowering (passes/lower_ort.py reads ``model.meta[EXPERTS_KEY]``)."""

from __future__ import annotations

EXPERT_MODES = ("packed", "int8")
EXPERTS_KEY = "dsv4.experts"  # ir.Model.meta key: written by with_experts, read by passes/lower_ort.py


def expert_mode(target: str, weights: str, experts: str | None) -> str | None:
    """``--experts``: how an ort-cpu artifact stores MXFP4 routed experts. "packed" (default): the checkpoint's
    bytes, the selected experts dequantised in-graph; "int8": QMoE's lossless int8 blocks (1.5x the bytes). Other
    targets and float weights: None (the question does not arise). Raises ValueError for a bad combination."""
    if experts is None:
        return "packed" if target == "ort-cpu" and weights == "packed" else None
    if experts not in EXPERT_MODES:
        raise ValueError(f"--experts: {experts!r} is not one of {', '.join(EXPERT_MODES)}")
    if target != "ort-cpu" or weights != "packed":
        raise ValueError(f"--experts: applies to ort-cpu with packed weights (got target {target}, weights {weights})")
    return experts


def with_experts(transform, experts: str | None):
    """The export's transform with the expert storage stamped on each graph first (read by the ORT lowering)."""
    if transform is None or experts is None:
        return transform

    def run(model, graph, target):
        model.meta[EXPERTS_KEY] = experts
        return transform(model, graph, target)

    return run
