"""Expert parallelism (issue [11], docs/scale.md): the rank template of a graph, written once, sharded per rank.

After ``lower_ort`` every MoE layer of an ort-cpu graph is a NarrowMoE (passes/lower_ort.py): the global routing
(scores, top-k or tid2eid, weights normalised over the k selected), ``used`` [E] = the experts some token selected,
``eids`` = NonZero(used), ``pos`` = CumSum(used) - 1, and ``dsv4.MoEExperts(x, w, pos[idx], stacks[eids])`` + the
shared expert. This pass makes each layer expert-parallel, keeping the routing global:

    rel    = idx - OFFSET;  valid = 0 <= rel < COUNT          (this rank holds experts OFFSET .. OFFSET+COUNT-1)
    used_l = Slice(used, START, END), or [1, 0, ...] when it is all 0 (U >= 1: never an empty stack)
    eids, pos  from used_l;   idx_l = Where(valid, rel, 0);   w_l = Where(valid, w, 0)
    y      = MoEExperts(x, w_l, pos[idx_l], local stacks[eids])     this rank's experts' contributions, [N, D]
    out    = Dsv4AllReduce(y) + shared                               the shared expert once, after the sum

A slot routed to another rank's expert gets weight exactly 0 and points at local expert 0: pos[0] is -1 when that
expert is unused (the slot then hits no row of MoEExperts), else its row gets 0·w added: either way nothing changes.
A rank whose experts serve every slot it sees computes exactly the single-rank rows (same experts, same order).
The rank-dependent numbers are Constant nodes holding SENTINELS (values no graph computes), found by value and
replaced per rank by export/ranks.py, which also cuts the expert stacks (listed in the model's metadata under
SHARDED) to the rank's rows. Sentinels feed only ops with a run-time input, so no folder can fold them away.

The collective is ``ai.onnx.contrib.Dsv4AllReduce`` (one float input, its sum over the ranks): the domain of
onnxruntime-extensions' Python kernels, registered by runtimes/ort/distributed.py over torch.distributed.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from dsv4.export.functions import DOMAIN

from .cleanup import Counted

COLLECTIVE_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' PyOp domain
ALL_REDUCE = "Dsv4AllReduce"
SHARDED = "dsv4.ranks.sharded"  # model metadata: JSON list of the expert-stack initializers cut per rank
SLOTS = "dsv4.ranks.slots"  # all-reduce node metadata: names of the layer's pidx / rel / valid values
SUMS = ("ordered", "partial")  # how the routed terms are summed across ranks (passes/ordered_sum.py)
# rank-dependent constants of the template: name -> sentinel value (int64); export/ranks.py writes the real ones
SENTINELS = {"offset": -7_301_000_000_001, "start": -7_301_000_000_002, "end": -7_301_000_000_003,
             "count": -7_301_000_000_004}
SCALAR = ("offset", "count")  # 0-d constants; start / end are [1] (Slice inputs)


def sentinel_values(offset: int, count: int) -> dict[str, int]:
    """The real values of the template's constants for the rank holding experts offset .. offset+count-1."""
    return {"offset": offset, "start": offset, "end": offset + count, "count": count}


def _const(name: str, value, dtype=np.int64) -> ir.Node:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(value, dtype=dtype))}, name=f"ranks/{name}")
    node.outputs[0].name = f"dsv4.ranks.{name}"
    return node


def _producer(v: ir.Value, op_type: str, what: str) -> ir.Node:
    p = v.producer()
    if p is None or p.op_type != op_type:
        raise ValueError(f"shard_experts: {what} ({v.name}) is not produced by {op_type} but by "
                         f"{p.op_type if p else 'nothing'}: not the NarrowMoE form this pass shards")
    return p


class ShardExperts(ir.passes.InPlacePass):
    """Every NarrowMoE layer -> its expert-parallel template (module docstring). Refuses graphs whose MoEs run
    another way (com.microsoft.MoE/QMoE, a function body), naming the first such node."""

    def call(self, model: ir.Model) -> Counted:
        g = model.graph
        other = [n for n in g if (n.domain, n.op_type) in {(DOMAIN, "MoE"), ("com.microsoft", "MoE"),
                                                            ("com.microsoft", "QMoE")}]
        if other:
            n = other[0]
            raise ValueError(f"--ranks: MoE node {n.name} runs as {n.domain}.{n.op_type}; expert sharding is "
                             "implemented for the NarrowMoE form (ort-cpu, --weights packed, --experts packed: the "
                             "defaults), not for --experts int8 / float weights / --no-passes")
        layers = [n for n in g if n.domain == DOMAIN and n.op_type == "MoEExperts"]
        if not layers:
            raise ValueError("--ranks: the graph has no dsv4.MoEExperts node (NarrowMoE) to shard")
        consts = {k: _const(k, v if k in SCALAR else [v]) for k, v in SENTINELS.items()}
        zero1, one1, axis0 = _const("zero1", [0]), _const("one1", [1]), _const("axis0", [0])
        zero, fzero = _const("zero", 0), _const("fzero", 0.0, np.float32)
        first = next(iter(g))
        g.insert_before(first, [*consts.values(), zero1, one1, axis0, zero, fzero])
        c = {k: n.outputs[0] for k, n in consts.items()}
        sharded: list[str] = []
        for m in layers:
            sharded += self._shard(g, m, c, zero1.outputs[0], one1.outputs[0], axis0.outputs[0], zero.outputs[0],
                                   fzero.outputs[0])
        if COLLECTIVE_DOMAIN not in model.opset_imports:
            model.opset_imports[COLLECTIVE_DOMAIN] = 1
        model.metadata_props[SHARDED] = json.dumps(sorted(set(sharded)))
        ir.passes.common.TopologicalSortPass()(model)
        return Counted(model, True, {"sharded MoE": len(layers), "expert stacks": len(set(sharded))})

    @staticmethod
    def _shard(g: ir.Graph, m: ir.Node, c: dict, zero1, one1, axis0, zero, fzero) -> list[str]:
        w, pidx = m.inputs[1], m.inputs[2]
        gpos = _producer(pidx, "Gather", "MoEExperts' expert positions")
        pos, idx = gpos.inputs[0], gpos.inputs[1]
        cumsum = _producer(_producer(pos, "Sub", "pos").inputs[0], "CumSum", "pos - 1")
        used = cumsum.inputs[0]
        stacks, eids = [], None
        for s in m.inputs[3:6]:
            dq = s.producer()
            if dq is None or dq.op_type not in ("Mxfp4Dequant", "DequantizeLinear"):
                raise ValueError(f"shard_experts: {m.name}: expert stack {s.name} is not a dequantised gather")
            for v in dq.inputs:
                if v is None:
                    continue
                gat = _producer(v, "Gather", f"{m.name}'s stack input")
                if gat.inputs[0] is None or not gat.inputs[0].is_initializer():
                    raise ValueError(f"shard_experts: {m.name}: {gat.name} does not gather an initializer")
                if eids is not None and gat.inputs[1] is not eids:
                    raise ValueError(f"shard_experts: {m.name}: the stacks are gathered by different expert lists")
                eids = gat.inputs[1]
                stacks.append(gat.inputs[0].name)
        nonzero = _producer(_producer(eids, "Reshape", "eids").inputs[0], "NonZero", "eids")
        if nonzero.inputs[0] is not used or cumsum.inputs[0] is not used:
            raise ValueError(f"shard_experts: {m.name}: eids and pos come from different expert masks")
        tag = m.name or "moe"

        def node(op, inputs, **attrs):
            return ir.node(op, inputs, attributes=attrs, name=f"{tag}/ranks/{op}_{len(g)}")

        # local mask of the experts used; when none is, local expert 0 (weight 0: U >= 1, never an empty stack)
        sl = node("Slice", [used, c["start"], c["end"], axis0])
        top = node("ReduceMax", [sl.outputs[0]], keepdims=0)
        none = node("Equal", [top.outputs[0], zero])
        one0 = node("ScatterElements", [sl.outputs[0], zero1, one1], axis=0)
        ul = node("Where", [none.outputs[0], one0.outputs[0], sl.outputs[0]])
        # the slots routed to this rank: local index, else 0 with weight 0
        rel = node("Sub", [idx, c["offset"]])
        ge = node("GreaterOrEqual", [rel.outputs[0], zero])
        lt = node("Less", [rel.outputs[0], c["count"]])
        valid = node("And", [ge.outputs[0], lt.outputs[0]])
        il = node("Where", [valid.outputs[0], rel.outputs[0], zero])
        g.insert_after(used.producer(), [sl, top, none, one0, ul, rel, ge, lt, valid, il])
        nonzero.replace_input_with(0, ul.outputs[0])
        cumsum.replace_input_with(0, ul.outputs[0])
        gpos.replace_input_with(1, il.outputs[0])
        wl = node("Where", [valid.outputs[0], w, fzero])
        g.insert_before(m, [wl])
        m.replace_input_with(1, wl.outputs[0])
        y = m.outputs[0]
        if y.is_graph_output():
            raise ValueError(f"shard_experts: {m.name}'s output is a graph output")
        uses = list(y.uses())
        ar = ir.node(ALL_REDUCE, [y], domain=COLLECTIVE_DOMAIN, name=f"{tag}/ranks/{ALL_REDUCE}")
        ar.outputs[0].name = f"{y.name}.all_reduced" if y.name else None
        ar.outputs[0].dtype, ar.outputs[0].shape = y.dtype or ir.DataType.FLOAT, y.shape  # NarrowMoE: float32
        for use in uses:
            use.node.replace_input_with(use.idx, ar.outputs[0])
        g.insert_after(m, [ar])
        # what passes/ordered_sum.py needs to exchange the per-slot terms instead (named: they survive inlining)
        gpos.outputs[0].name, rel.outputs[0].name = f"{tag}.ranks.pidx", f"{tag}.ranks.rel"
        valid.outputs[0].name = f"{tag}.ranks.valid"
        ar.metadata_props[SLOTS] = json.dumps({k: f"{tag}.ranks.{k}" for k in ("pidx", "rel", "valid")})
        return stacks


def rank_pipeline(target: str, rank_sum: str = "ordered"):
    """The target's pipeline with ShardExperts right after the MoE lowering (before bodies are inlined) and, for
    rank_sum "ordered", OrderedSum at the end (passes/ordered_sum.py)."""
    from .ordered_sum import OrderedSum
    from .pipeline import PIPELINES

    if rank_sum not in SUMS:
        raise ValueError(f"--rank-sum: expected one of {', '.join(SUMS)}, got {rank_sum!r}")

    if target != "ort-cpu":
        raise ValueError(f"--ranks: expert-parallel artifacts are implemented for the ort-cpu target, not {target} "
                         "(docs/scale.md: NCCL on GPUs)")
    out = []
    for name, p in PIPELINES[target]:
        out.append((name, p))
        if name == "lower_ort":
            out.append(("shard_experts", ShardExperts()))
    if rank_sum == "ordered":
        out.append(("ordered_sum", OrderedSum()))
    return tuple(out)


def rank_transform(model: ir.Model, graph: str, target, rank_sum: str = "ordered") -> dict:
    """export_artifact's ``transform`` for a rank template: the pipeline with ShardExperts (and OrderedSum)."""
    from .pipeline import run

    name = getattr(target, "name", target)
    return run(model, name, rank_pipeline(name, rank_sum))
