"""Depth-independent tracing: trace one decoder layer of each kind, instantiate it for every layer.

V4's decoder layers differ only by their kind: the compression ratio (0 window, 4 CSA, 128 HCA) and the routing
(hash or learned), four kinds in Flash and Pro. ``trace_by_kind`` traces a model made of the first layer of each
kind (the same Block modules as the full skeleton, so packing and names match), then clones each traced layer's
nodes once per layer of that kind: its initializers renamed ``layers.{r}.*`` -> ``layers.{i}.*``, its state
``past.{r}.*`` / ``present.{r}.*`` -> ``past.{i}.*`` / ``present.{i}.*``, its residual input wired to the previous
layer's output. The tracer's cost is then that of the kinds present, whatever the depth; cloning is linear but
cheap (it copies nodes, it does not run torch.export).

A layer's nodes are the ones the exporter scoped under ``model.layers.{r}``; the residual streams are the only
[B, T, hc, D] value entering and leaving a layer. Anything else crossing between layers, or a subgraph inside a
layer, makes ``instantiate`` raise LayerError (and the caller trace the full model instead).
"""

from __future__ import annotations

import copy
import re
import warnings

import onnx_ir as ir
from onnx_ir._cloner import Cloner
from torch import nn

from dsv4.models.config import ModelArgs
from dsv4.models.model import DeepseekV4

from .signature import past, present

_SCOPE = re.compile(r"/model\.layers\.(\d+): ")
_TMP = "__dsv4_rep."  # names of the traced layer values while they are renamed


class LayerError(ValueError):
    """The traced graph does not have the layer structure instantiate() relies on."""


def kinds(args: ModelArgs) -> tuple[list[int], list[int]]:
    """(representative layers: the first of each kind in order; for every layer, the index of its representative)."""
    reps: list[int] = []
    first: dict[tuple[int, bool], int] = {}
    of = []
    for i in range(args.n_layers):
        k = (args.ratio(i), args.is_hash_layer(i))
        if k not in first:
            first[k] = len(reps)
            reps.append(i)
        of.append(first[k])
    return reps, of


def representative_model(model: DeepseekV4, reps: list[int]) -> DeepseekV4:
    """A shallow copy of `model` whose layers are `reps` (the same Block objects) and whose args say so. Hash
    layers come first in V4 (layers 0..n_hash-1), so the representatives keep that order."""
    a = model.args
    ratios = tuple(a.ratio(i) for i in reps) + tuple(a.compress_ratios[a.n_layers:])
    args = a.with_(n_layers=len(reps), compress_ratios=ratios, n_hash_layers=sum(a.is_hash_layer(i) for i in reps))
    rep = copy.copy(model)
    rep._modules = dict(model._modules)
    rep._modules["layers"] = nn.ModuleList(model.layers[i] for i in reps)
    rep.args = args
    return rep


def _layer(node: ir.Node) -> int | None:
    """The layer that scoped `node`; None for the rest and for constants (the exporter shares a constant between
    every node that uses the same value, whichever layer first made it)."""
    if node.op_type == "Constant" and node.domain == "" and not node.inputs:
        return None
    m = _SCOPE.search(node.metadata_props.get("namespace", ""))
    return int(m.group(1)) if m else None


def _is_streams(v: ir.Value, hc: int, dim: int) -> bool:
    s = v.shape
    return s is not None and s.rank() == 4 and s[2] == hc and s[3] == dim


def instantiate(m: ir.Model, args: ModelArgs, of: list[int]) -> None:
    """Turn `m`, traced from representative_model (layer r = the r-th kind), into the graph of `args`: layer i is a
    clone of layer ``of[i]``. In place; raises LayerError when the structure is not the expected one."""
    g = m.graph
    n_rep = max(of) + 1
    nodes = list(g)
    layer_of = {id(n): _layer(n) for n in nodes}
    for n in reversed(nodes):  # nodes without any scope belong to the layer that alone consumes them
        if layer_of[id(n)] is None and not n.metadata_props.get("namespace") and n.op_type != "Constant":
            users = {layer_of[id(u)] for o in n.outputs for u, _ in o.uses()}
            if len(users) == 1 and None not in users and not any(o.is_graph_output() for o in n.outputs):
                layer_of[id(n)] = users.pop()
    _hoist_shared_scalars(nodes, layer_of, args)
    body = [[n for n in nodes if layer_of[id(n)] == r] for r in range(n_rep)]
    inside = [{id(n) for n in b} for b in body]
    hc, dim = args.hc_mult, args.dim
    ext, x_in, x_out = [], [], []
    for r, b in enumerate(body):
        if not b:
            raise LayerError(f"layer {r}: no nodes scoped model.layers.{r}")
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in b for a in n.attributes.values()):
            raise LayerError(f"layer {r}: a node holds a subgraph")
        used = {}
        for n in b:
            for v in n.inputs:
                if v is not None and (v.producer() is None or id(v.producer()) not in inside[r]):
                    used[id(v)] = v
        ext.append(list(used.values()))
        xs = [v for v in ext[r] if _is_streams(v, hc, dim)]
        outs = {id(o): o for n in b for o in n.outputs for u, _ in o.uses() if id(u) not in inside[r]}
        xo = [o for o in outs.values() if not o.is_graph_output() or _is_streams(o, hc, dim)]  # (+ "hidden")
        if len(xs) != 1 or len(xo) != 1 or not _is_streams(xo[0], hc, dim):
            raise LayerError(f"layer {r}: expected one residual-stream input and output, found {len(xs)} and "
                             f"{[o.name for o in xo]}")
        x_in.append(xs[0])
        x_out.append(xo[0])
        for v in ext[r]:
            p = v.producer()
            if p is not None and layer_of[id(p)] is not None and v is not xs[0]:
                raise LayerError(f"layer {r}: reads {v.name} from layer {layer_of[id(p)]}")
    for r in range(1, n_rep):
        if x_in[r] is not x_out[r - 1]:
            raise LayerError(f"layer {r}: its residual input is not layer {r - 1}'s output")
    post = [n for n in nodes if layer_of[id(n)] is None and _after(n, x_out[-1])]

    init_prefix = [f"layers.{r}." for r in range(n_rep)]
    # The representative layer r is the real layer reps[r] (the first of its kind): it keeps the traced values (renamed:
    # outer nodes may read them, e.g. a state's shape), every other layer of the kind gets fresh ones.
    first = {r: of.index(r) for r in range(n_rep)}
    old_weights = {}
    for name in [k for k in g.initializers if any(k.startswith(p) for p in init_prefix)]:
        v = g.initializers.pop(name)
        r = int(name.split(".")[1])
        old_weights[id(v)] = (r, name[len(init_prefix[r]):])
        v.name = f"{_TMP}{r}.{old_weights[id(v)][1]}"
    old_state = {}
    for v in g.inputs:
        m_ = re.match(r"past\.(\d+)\.(.*)$", v.name or "")
        if m_:
            old_state[id(v)] = (int(m_.group(1)), m_.group(2))
            v.name = f"{_TMP}past.{m_.group(1)}.{m_.group(2)}"
    new_inputs: dict[str, ir.Value] = {}
    new_outputs: dict[str, ir.Value] = {}
    clones: list[ir.Node] = []
    cur = x_in[0]
    for i, r in enumerate(of):
        vmap: dict[ir.Value, ir.Value] = {}
        for v in ext[r]:
            if v is x_in[r]:
                vmap[v] = cur
            elif id(v) in old_weights and old_weights[id(v)][0] == r:  # a weight of layer r (popped above)
                name = f"layers.{i}.{old_weights[id(v)][1]}"
                if name not in g.initializers:
                    nv = v if i == first[r] else ir.Value(type=ir.TensorType(v.dtype), shape=ir.Shape(v.shape),
                                                          const_value=v.const_value)
                    nv.name = name
                    g.register_initializer(nv)
                vmap[v] = g.initializers[name]
            elif id(v) in old_state and old_state[id(v)][0] == r:
                name = past(f"{i}.{old_state[id(v)][1]}")
                nv = v if i == first[r] else ir.Value(type=ir.TensorType(v.dtype), shape=ir.Shape(v.shape))
                nv.name = name
                new_inputs[name] = vmap[v] = nv
            else:
                vmap[v] = v  # shared: input ids, positions, tables, fresh zero states of the same shape
        cl = Cloner(attr_map={}, value_map=vmap, metadata_props={})
        for n in body[r]:
            c = cl.clone_node(n)
            c.name = f"l{i}/{n.name}"
            for o, co in zip(n.outputs, c.outputs):
                if o.is_graph_output() and o.name.startswith(present(f"{r}.")):
                    co.name = present(f"{i}." + o.name[len(present(f"{r}.")):])
                    new_outputs[co.name] = co
                else:
                    co.name = f"l{i}/{o.name}"
                for k in ("namespace", "pkg.torch.onnx.name_scopes"):
                    if k in c.metadata_props:
                        c.metadata_props[k] = c.metadata_props[k].replace(f"model.layers.{r}", f"model.layers.{i}")
            clones.append(c)
        cur = vmap[x_out[r]]
    for n in post:
        for j, v in enumerate(n.inputs):
            if v is x_out[-1]:
                n.replace_input_with(j, cur)
    for j, o in enumerate(list(g.outputs)):  # the final streams as an output (--mtp: "hidden")
        if o is x_out[-1]:
            name, o.name = o.name, f"{_TMP}{o.name}"
            g.outputs[j], cur.name = cur, name
    _rebuild_io(g, args, new_inputs, new_outputs)
    old = [n for b in body for n in b]
    for n in old:  # detach first: remove(safe=False) would leave them users of the weights that layer reps[r] keeps
        for j in range(len(n.inputs)):
            n.replace_input_with(j, None)
    g.remove(old, safe=False)
    if post:
        g.insert_before(post[0], clones)
    else:
        g.extend(clones)
    g.sort()


def _hoist_shared_scalars(nodes: list[ir.Node], layer_of: dict, args: ModelArgs) -> None:
    """torch.export computes a symbolic size expression once and reuses it: a scalar made in layer a (e.g. from
    the input length) may feed layer b. Such a value and what it is computed from within layer a move out of the
    layers (shared, like the inputs), provided they read nothing of the layer: no streams, weights or state."""
    hc, dim = args.hc_mult, args.dim
    for n in nodes:
        a = layer_of[id(n)]
        if a is None:
            continue
        for o in n.outputs:
            if _is_streams(o, hc, dim) or not any(layer_of[id(u)] not in (a, None) for u, _ in o.uses()):
                continue
            todo, closure = [n], []
            while todo:
                c = todo.pop()
                if layer_of[id(c)] != a or c in closure:
                    continue
                closure.append(c)
                for v in c.inputs:
                    if v is None:
                        continue
                    if _is_streams(v, hc, dim) or v.is_initializer() or (v.is_graph_input() and v.name.startswith("past.")):
                        raise LayerError(f"layer {a}: {o.name}, read by another layer, depends on {v.name}")
                    if v.producer() is not None:
                        todo.append(v.producer())
            for c in closure:
                layer_of[id(c)] = None


def _after(node: ir.Node, x: ir.Value) -> bool:
    """Whether `node` depends on `x` (the last layer's output): the head side of the graph."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for v in n.inputs:
            if v is x:
                return True
            if v is not None and v.producer() is not None:
                todo.append(v.producer())
    return False


def _rebuild_io(g: ir.Graph, args: ModelArgs, new_inputs: dict, new_outputs: dict) -> None:
    """Graph inputs and outputs in the signature's order: non-layer ones first as they were, then per layer."""
    from dsv4.models.state import state_entries

    names = [e.name for e in state_entries(args)]
    keep_in = [v for v in g.inputs if not re.match(r"past\.\d+\.", v.name or "") and not (v.name or "").startswith(_TMP)]
    layer_in = [new_inputs[past(k)] for k in names if past(k) in new_inputs]
    g.inputs.clear()
    g.inputs.extend(keep_in + layer_in)
    old = {v.name: v for v in g.outputs}
    outs = [v for v in g.outputs if not re.match(r"present\.", v.name or "")]
    outs += [new_outputs.get(present(k)) or old[present(k)] for k in names]
    g.outputs.clear()
    g.outputs.extend(outs)


def trace_by_kind(model: DeepseekV4, graph: str, target, *args, **kw) -> ir.Model:
    """``export.trace`` of the representative layers, instantiated for every layer of `model` (falls back to
    tracing the whole model when every layer is its own kind, or when the traced structure is not the expected
    one: the result is the same graph either way, only the cost differs)."""
    from .tracing import trace

    reps, of = kinds(model.args)
    if len(reps) == model.args.n_layers:
        return trace(model, graph, target, *args, **kw)
    m = trace(representative_model(model, reps), graph, target, *args, **kw)
    try:
        instantiate(m, model.args, of)
    except LayerError as e:
        warnings.warn(f"trace {graph}: per-kind tracing not possible ({e}); tracing all {model.args.n_layers} layers",
                      stacklevel=2)
        return trace(model, graph, target, *args, **kw)
    return m
