"""``--experts``: how an ORT artifact (ort-cpu, ort-cuda) with packed weights stores the MXFP4 routed experts
(docs/export.md "Real size": "packed" keeps the checkpoint's bytes, "int8" QMoE's blocks), and how the choice
reaches the ORT lowering (passes/lower_ort.py reads ``model.meta[EXPERTS_KEY]``)."""

from __future__ import annotations

from .targets import EXPERT_MODES, get_target

__all__ = ["EXPERT_MODES", "EXPERTS_KEY", "expert_mode", "with_experts"]

EXPERTS_KEY = "dsv4.experts"  # ir.Model.meta key: written by with_experts, read by passes/lower_ort.py


def expert_mode(target: str, weights: str, experts: str | None) -> str | None:
    """``--experts`` for `target` (its ``experts`` modes; packed weights only). "packed" (the default): the
    checkpoint's bytes, the selected experts dequantised in-graph; "int8": QMoE's lossless int8 blocks (2x the
    expert bytes). Other targets and float weights: None (the question does not arise). Raises ValueError for a bad
    combination."""
    modes = get_target(target).experts if weights == "packed" else ()
    if experts is None:
        return modes[0] if modes else None
    if experts not in EXPERT_MODES:
        raise ValueError(f"--experts: {experts!r} is not one of {', '.join(EXPERT_MODES)}")
    if experts not in modes:
        raise ValueError(f"--experts: applies to packed weights on the ORT targets (got target {target}, weights "
                         f"{weights})")
    return experts


def with_experts(transform, experts: str | None):
    """The export's transform with the expert storage stamped on each graph first (read by the ORT lowering)."""
    if transform is None or experts is None:
        return transform

    def run(model, graph, target):
        model.meta[EXPERTS_KEY] = experts
        return transform(model, graph, target)

    return run
