"""One trace, two graphs: prefill and decode are the same function of (tokens, state).

``DeepseekV4.step`` serves prefill, chunked prefill and decode alike; the prefill graph differs from the decode
graph only by where its state comes from (a fresh state built in the graph, models/state.py ``init_state``) and by
its token count (any T vs 1). Dynamic targets therefore trace ONE graph, the step — ``input_ids`` [batch, length]
+ ``past.*`` -> ``logits`` + ``present.*`` — and derive both graphs of the artifact from it:

- decode: the step with ``length`` fixed to 1 in every shape (a dim written in terms of ``length`` is evaluated
  at 1; one that still depends on ``batch`` keeps it symbolic), so the folder specialises what the tracer would
  have specialised for a [batch, 1] example;
- prefill: the step with each ``past.{name}`` input replaced by ``ConstantOfShape([batch, *shape], fill)``, the
  values ``init_state`` allocates; the signature stays export/signature.py's.

This halves the export's tracing, which dominates its cost (docs/export.md "One trace").
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import sympy
import torch

from dsv4.models.config import ModelArgs
from dsv4.models.state import state_entries

from .signature import BATCH, CAPACITY, INPUT_IDS, LENGTH, entry_ratio, past

_DIM = re.compile(r"^[\w\s+\-*/()]+$")


def split_step(step: ir.Model, args: ModelArgs, dtype: torch.dtype, grow: bool = False) -> dict[str, ir.Model]:
    """{"prefill": ..., "decode": ...} from a traced step graph (`step` becomes the decode graph); grow: the
    prefill's per-token caches get ``capacity // m`` rows from the ``capacity`` input (export/signature.py)."""
    prefill = step.clone()
    _bind_fresh_state(prefill.graph, args, dtype, grow)
    prefill.graph.name = "dsv4_prefill"
    _fix_length(step.graph, 1)
    step.graph.name = "dsv4_decode"
    return {"prefill": prefill, "decode": step}


def capacity_default(m: ir.Model, max_seq_len: int) -> None:
    """A growable prefill's ``capacity`` input gets max_seq_len as its default (an initializer of the same name:
    ONNX Runtime then treats it as an overridable input), so a program that does not feed it gets the full
    capacity; added after the passes, which would otherwise fold it."""
    cap = next((v for v in m.graph.inputs if v.name == CAPACITY), None)
    if cap is not None and cap.name not in m.graph.initializers:
        cap.const_value = ir.tensor(np.array(max_seq_len, dtype=np.int64), name=CAPACITY)
        m.graph.register_initializer(cap)


def _const(values: list[int], name: str) -> ir.Node:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(torch.tensor(values, dtype=torch.int64))}, name=name)
    node.outputs[0].name = name.replace("/", ".")
    return node


def _bind_fresh_state(g: ir.Graph, args: ModelArgs, dtype: torch.dtype, grow: bool = False) -> None:
    """Each past.{name} input -> ConstantOfShape(Concat(Shape(input_ids)[:1], shape), fill); inputs removed.
    grow: a per-token cache's rows are ``capacity // m`` (a new scalar input ``capacity``) instead of a number."""
    ids = next(v for v in g.inputs if v.name == INPUT_IDS)
    batch = ir.node("Shape", [ids], attributes={"start": 0, "end": 1}, name="fresh/batch")
    batch.outputs[0].name = "fresh.batch"
    nodes = [batch]
    rows: dict[int, ir.Value] = {}
    if grow:
        cap = ir.Value(name=CAPACITY, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
        g.inputs.append(cap)
        for m in sorted({entry_ratio(args, e.name) for e in state_entries(args, dtype) if e.per_token}):
            k, one = _const([m], f"fresh/rows{m}/ratio"), _const([1], f"fresh/rows{m}/one")
            div = ir.node("Div", [cap, k.outputs[0]], name=f"fresh/rows{m}/div")
            rs = ir.node("Reshape", [div.outputs[0], one.outputs[0]], name=f"fresh/rows{m}")
            div.outputs[0].name, rs.outputs[0].name = f"fresh.rows{m}.div", f"fresh.rows{m}"
            nodes += [k, one, div, rs]
            rows[m] = rs.outputs[0]
    by_name = {v.name: v for v in g.inputs}
    for e in state_entries(args, dtype):
        old = by_name.get(past(e.name))
        if old is None:
            raise ValueError(f"step graph: no input {past(e.name)}")
        m = entry_ratio(args, e.name) if grow and e.per_token else None
        dims = _const(list(e.shape) if m is None else list(e.shape[1:]), f"fresh/{e.name}/dims")
        parts = [batch.outputs[0]] + ([] if m is None else [rows[m]]) + [dims.outputs[0]]
        shape = ir.node("Concat", parts, attributes={"axis": 0}, name=f"fresh/{e.name}/shape")
        fill = ir.node("ConstantOfShape", [shape.outputs[0]],
                       attributes={"value": ir.tensor(torch.full((1,), e.fill, dtype=e.dtype))},
                       name=f"fresh/{e.name}")
        shape.outputs[0].name = f"fresh.{e.name}.shape"
        new = fill.outputs[0]
        new.name, new.dtype, new.shape = f"fresh.{e.name}", old.dtype, old.shape
        nodes += [dims, shape, fill]
        passed = [i for i, v in enumerate(g.outputs) if v is old]  # present.X = past.X: keep the output's name
        old.replace_all_uses_with(new, replace_graph_outputs=False)
        for i in passed:
            ident = ir.node("Identity", [new], name=f"fresh/{e.name}/present")
            ident.outputs[0].name, ident.outputs[0].dtype, ident.outputs[0].shape = old.name.replace("past.", "present.", 1), old.dtype, old.shape
            nodes.append(ident)
            g.outputs[i] = ident.outputs[0]
    g.inputs[:] = [v for v in g.inputs if not (v.name or "").startswith("past.")]
    first = next(iter(g), None)
    if first is None:
        g.extend(nodes)
    else:
        g.insert_before(first, nodes)


def _fix_length(g: ir.Graph, n: int) -> None:
    """Every dim written in terms of ``length`` evaluated at n (in the graph, its functions' bodies are not traced);
    the other symbols (``batch``, the cache rows ``rows{m}``) stay symbolic."""
    names = {d.value for v in g.inputs if v.shape is not None for d in v.shape
             if isinstance(d, ir.SymbolicDim) and d.value and d.value.isidentifier() and d.value != LENGTH}
    syms = {k: sympy.Symbol(k, integer=True, positive=True) for k in names | {BATCH}}
    cache: dict[str, object] = {}

    def fix(d):
        if not isinstance(d, ir.SymbolicDim) or d.value is None or LENGTH not in d.value:
            return d
        if d.value not in cache:
            if not _DIM.match(d.value):
                raise ValueError(f"step graph: cannot evaluate the dim {d.value!r}")
            r = sympy.simplify(eval(d.value, {"__builtins__": {}}, {LENGTH: sympy.Integer(n), **syms}))  # noqa: S307
            cache[d.value] = int(r) if r.is_Integer else (str(r) if r.is_Symbol and r in syms.values() else
                                                          None if r.free_symbols - set(syms.values()) else str(r))
        return cache[d.value]

    values = list(g.inputs) + [o for node in g for o in node.outputs]
    for v in values:
        if v.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value and LENGTH in d.value
                                       for d in v.shape):
            v.shape = ir.Shape([fix(d) for d in v.shape])
    _static_shape_slices(g)


def _static_shape_slices(g: ir.Graph) -> None:
    """Shape(x, start, end) whose selected dims are now all numbers -> a Constant: the shape arithmetic the tracer
    wrote in terms of ``length`` then folds, as it would have for a [batch, 1] example."""
    for node in list(g):
        if node.op_type != "Shape" or node.domain != "" or node.inputs[0] is None or node.inputs[0].shape is None:
            continue
        dims = list(node.inputs[0].shape)
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(dims))
        sel = dims[slice(start, end)]
        if not all(isinstance(d, int) for d in sel):
            continue
        const = ir.node("Constant", [], attributes={"value": ir.tensor(torch.tensor(sel, dtype=torch.int64))},
                        name=f"{node.name}/static")
        const.outputs[0].name, const.outputs[0].dtype, const.outputs[0].shape = \
            f"{node.outputs[0].name}.static", ir.DataType.INT64, ir.Shape([len(sel)])
        g.insert_before(node, const)
        node.outputs[0].replace_all_uses_with(const.outputs[0], replace_graph_outputs=True)
