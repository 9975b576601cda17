"""Op selection: for each dsv4 op, keep the node where the target runs it as one kernel, otherwise inline its
function body. Afterwards a target sees, per op, either opaque nodes it can run or standard ONNX, never both.

Which ops a target keeps follows from the registry's faces (export/custom_ops.py):

* TVM targets keep the ops whose ``tvm`` face names a lowering (runtimes/tvm/lowerings.py) and inline the rest.
* ONNX Runtime has no dsv4 kernels: an ``ort`` face names a graph lowering to ORT contrib ops, which runs as its own
  pass before this one (passes/lower_ort.py); a node that lowering refused (its reason is in the code) is inlined.
  On ort-cpu and ort-cuda, IndexerTopK and SparseAttn inline query-chunked wrappers of their bodies
  (passes/chunk_queries.py: a Loop over 256-query blocks, as the eager kernels do) in graphs with more than one
  query (prefill), so that prefill memory and time stay linear in length; and NarrowMoE's experts run one per trip
  of a Loop in prefill graphs (passes/chunk_experts.py: memory bounded whatever the number of experts the prompt
  selects; each trip on the rows of the tokens that chose its expert).

Inlined nodes keep the call's metadata (its layer) and are tagged ``dsv4.op = <op>`` so that ``census`` can
attribute them to the op they implement.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from dsv4.export import custom_ops
from dsv4.export.functions import DOMAIN
from dsv4.export.targets import get_target

from ._graph import DSV4_OP_KEY
from .chunk_experts import chunk
from .chunk_queries import swap_in
from .cleanup import Counted

PREFILL_LOOPS = ("ort-cpu", "ort-cuda")  # targets whose prefill graphs chunk queries and experts in Loops


def kept_ops(target: str) -> frozenset[str]:
    """dsv4 ops that `target` runs as opaque nodes."""
    runtime = get_target(target).runtime
    if runtime == "tvm":
        return frozenset(r.name for r in custom_ops.REGISTRY if r.tvm != "inline")
    return frozenset()


class SelectOps(ir.passes.InPlacePass):
    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> Counted:
        keep = kept_ops(self.target)
        inlined: dict[str, int] = {}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain == DOMAIN and node.op_type not in keep:
                node.metadata_props.setdefault(DSV4_OP_KEY, node.op_type)  # inherited by the inlined nodes
                inlined[node.op_type] = inlined.get(node.op_type, 0) + 1
        chunked = swap_in(model) if self.target in PREFILL_LOOPS else []
        experts = chunk(model) if self.target in PREFILL_LOOPS else {}
        common.InlinePass(criteria=lambda f: f.domain == DOMAIN and f.name not in keep)(model)
        left = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN}
        if left - keep:
            raise RuntimeError(f"select_ops({self.target}): dsv4 ops {sorted(left - keep)} were neither kept nor inlined")
        counts = {f"inlined {k}": v for k, v in sorted(inlined.items())}
        counts |= {f"query-chunked {k}": inlined[k] for k in chunked if k in inlined}
        counts |= experts
        counts |= {f"kept {k}": sum(1 for n in model.graph if n.domain == DOMAIN and n.op_type == k) for k in sorted(left)}
        return Counted(model, bool(inlined), counts)
