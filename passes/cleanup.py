"""Cleanup: constant folding where cheap (never a weight), exact no-op removal, identity elimination,
common-subexpression elimination, dead nodes / initializers / functions / opsets, topological sort.

Everything reuses onnx_ir's and onnxscript's passes; what is ours is which weights the folder may see (none:
they are external data, meta tensors during export, or lazily derived re-layouts) and the choice of rewrite
rules, which must be exact: ``x * 1``, ``x / 1`` and identity Transposes / Casts go, ``Cast(Cast(x))`` stays (the
FP8 simulation rounds through exactly that).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import div_by_1_rule, mul_by_1_rule, no_op_cast_rule, no_op_transpose_rule

FOLD_MAX_ELEMENTS = 64  # initializers up to this size (lifted scalars) take part in folding; larger ones are weights


class Counted(ir.passes.PassResult):
    """A pass result with the per-pass counts that pipeline.run reports."""

    def __init__(self, model: ir.Model, modified: bool, counts: dict[str, int]):
        super().__init__(model, modified)
        self.counts = counts


def nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def _is_weight(v: ir.Value) -> bool:
    """External, lazily derived, larger than a lifted scalar, or a meta/fake tensor of a graph being exported."""
    t = v.const_value
    raw = getattr(t, "raw", None)
    return isinstance(t, (ir.ExternalTensor, ir.LazyTensor)) or int(np.prod(t.shape.numpy())) > FOLD_MAX_ELEMENTS \
        or bool(getattr(raw, "is_meta", False)) or type(raw).__name__ == "FakeTensor"


@contextmanager
def weights_hidden(model: ir.Model):
    """Hide every weight-sized initializer value from folders and rule matchers (restored afterwards, also on error
    and on values a pass removed from the graph meanwhile): weights are external data, meta tensors while
    exporting, or lazily derived, and reading them is never a pass's business."""
    held = [(v, v.const_value) for v in model.graph.initializers.values() if v.const_value is not None and _is_weight(v)]
    for v, _ in held:
        v.const_value = None
    try:
        yield
    finally:
        for v, t in held:
            v.const_value = t


class FoldConstants(ir.passes.InPlacePass):
    """onnxscript's constant folder with the weights hidden; folded values stay Constant nodes."""

    def call(self, model: ir.Model) -> Counted:
        before = nodes(model)
        with weights_hidden(model):
            res = onnxscript.optimizer.fold_constants(model)
            onnxscript.optimizer.remove_unused_nodes(model)
        return Counted(model, res.modified, {"folded": before - nodes(model)})


EXACT_RULES = (mul_by_1_rule, div_by_1_rule, no_op_transpose_rule, no_op_cast_rule)


class ExactSimplify(ir.passes.InPlacePass):
    """Remove operations that return their input unchanged, bit for bit."""

    def call(self, model: ir.Model) -> Counted:
        n = pattern.RewriteRuleSet(list(EXACT_RULES), commute=True).apply_to_model(model)
        return Counted(model, n > 0, {"no-ops": n})


class DedupConstants(ir.passes.InPlacePass):
    """Merge folded constant initializers of equal value (weights hidden), so that CSE sees one value: the folder
    makes a fresh initializer for every folded shape piece, and two copies of one [1] keep otherwise identical
    shape computations (and what they feed, e.g. two act-quant chains of one input) apart."""

    def call(self, model: ir.Model) -> Counted:
        before = len(model.graph.initializers)
        log = logging.getLogger(common.DeduplicateInitializersPass.__module__)
        log.addFilter(_hidden_weight_skips)
        try:
            with weights_hidden(model):
                common.DeduplicateInitializersPass(size_limit=FOLD_MAX_ELEMENTS)(model)
        finally:
            log.removeFilter(_hidden_weight_skips)
        return Counted(model, len(model.graph.initializers) < before, {})


def _hidden_weight_skips(record: logging.LogRecord) -> bool:
    """Drop onnx_ir's "Skipped deduplication of initializer ... as it has no constant value" warning: those are the
    weights weights_hidden hid on purpose (one line per weight on every export otherwise)."""
    return "has no constant value" not in str(record.msg)


class Cleanup(ir.passes.InPlacePass):
    """The whole cleanup family in one pass; counts the nodes each step removed."""

    def call(self, model: ir.Model) -> Counted:
        counts: dict[str, int] = {}
        modified = False
        steps = (("fold", FoldConstants()), ("no-ops", ExactSimplify()),
                 ("identity", common.IdentityEliminationPass()), ("dedup", DedupConstants()), ("cse", common.CommonSubexpressionEliminationPass()),
                 ("dead", common.RemoveUnusedNodesPass()), ("functions", common.RemoveUnusedFunctionsPass()),
                 ("opsets", common.RemoveUnusedOpsetsPass()), ("sort", common.TopologicalSortPass()))
        for name, step in steps:
            before, funcs = nodes(model), len(model.functions)
            res = step(model)
            modified |= res.modified
            if name == "functions":
                counts[name] = funcs - len(model.functions)
            elif name not in ("opsets", "sort", "dedup"):
                counts[name] = before - nodes(model)
        return Counted(model, modified, counts)
