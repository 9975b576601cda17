"""What a pipeline must achieve: passes state the rewrites their target relies on, and a shortfall is an error.

A rewrite rule that silently stops matching (the exporter changed a pattern, a check grew stricter) would
otherwise leave a pipeline that reports "0" and an artifact that runs the slow or wrong path. The passes of
the pipelines raise ``ExpectationError`` naming every node that should have been rewritten and the rule's own
reason (its check's MatchResult) for not doing so.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer


class ExpectationError(ValueError):
    """A pass rewrote fewer nodes than its target relies on; the message names them and the rules' reasons (a
    ValueError: the CLI prints it as one error, not a traceback)."""


def why_not(rules: pattern.RewriteRuleSet, model: ir.Model, node: ir.Node) -> str:
    """The reason the rules give for not rewriting `node` (the root of their patterns), from a traced match."""
    tracer = MatchingTracer()
    for rule in rules.rules:
        if rule.try_rewrite(model, model.graph, node, tracer=tracer) is not None:
            return f"{rule.name} matches now (it did not when the pass ran)"
    reasons = [f"{getattr(rule, 'name', None) or type(rule).__name__}: {m.match_result.reason or m.status.name}"
               for rule, infos in tracer.best_matches_map.items() for m in infos]
    return "; ".join(reasons) or "no rule's pattern matches this node"


def shortfall(what: str, expected: int, left: dict[str, str]) -> None:
    """Raise when `left` (node name -> reason) is not empty: `expected` nodes should all have been rewritten."""
    if left:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in left.items())
        raise ExpectationError(f"{what}: {len(left)} of {expected} not rewritten:\n{lines}")
