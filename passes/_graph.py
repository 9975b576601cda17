"""Small read-only helpers the rule families share: constants, producers, identity-like wrappers, layers.

Nothing here changes a graph. Weights are never read: ``const`` only looks at small values that already hold
data (Constant nodes, lifted scalars), so it is safe on graphs whose initializers are still meta or pending.
"""

from __future__ import annotations

import ast

import numpy as np
import onnx_ir as ir

CONST_MAX_ELEMENTS = 64  # larger values are weights or tables: never read by a rule
LAYER_SCOPE_KEY = "pkg.torch.onnx.name_scopes"  # torch exporter's module path per node
DSV4_OP_KEY = "dsv4.op"  # set on nodes that implement one dsv4 op (inlined body or ORT lowering)


def producer(v: ir.Value | None, *op_types: str, domain: str = "") -> ir.Node | None:
    """v's producer if it is one of `op_types` in `domain`, else None."""
    node = v.producer() if v is not None else None
    if node is None or node.domain != domain or (op_types and node.op_type not in op_types):
        return None
    return node


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def const(v: ir.Value | None) -> np.ndarray | None:
    """The value of a small constant: a Constant node, an initializer holding data, or a Cast/CastLike of one."""
    if v is None:
        return None
    t = v.const_value
    if t is None:
        node = v.producer()
        if node is not None and node.domain == "" and node.op_type in ("Cast", "CastLike") and node.inputs:
            inner = const(node.inputs[0])
            to = ir.DataType(attr(node, "to")) if node.op_type == "Cast" else node.inputs[1].dtype
            if inner is not None:
                return inner.astype(to.numpy()) if to is not None else inner
        if node is not None and node.domain == "" and node.op_type == "Constant":
            a = next(iter(node.attributes.values()), None)
            if a is not None and a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                return np.asarray(a.value)
            if a is not None and a.name == "value":
                t = a.value
        if t is None:
            return None
    if isinstance(t, ir.ExternalTensor) or int(np.prod(t.shape.numpy())) > CONST_MAX_ELEMENTS:
        return None
    try:
        return t.numpy()
    except Exception:  # meta / fake tensors of a graph still being exported
        return None


def scalar(v: ir.Value | None) -> float | None:
    c = const(v)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None


def strip(v: ir.Value | None) -> ir.Value | None:
    """Skip wrappers that do not change a value: Identity, Transpose with the identity permutation, one-input
    Max/Min, Cast to the same type, and Expand(v, Shape(v)) (the exporter's indexing emits Expand(v, Shape(Max(v))))."""
    while v is not None:
        node = v.producer()
        if node is None or node.domain != "":
            return v
        op = node.op_type
        src = node.inputs[0] if node.inputs else None
        if op == "Identity" or (op in ("Max", "Min") and len(node.inputs) == 1):
            v = src
        elif op == "Transpose" and list(attr(node, "perm", []) or []) == list(range(len(attr(node, "perm", []) or []))):
            v = src
        elif op == "Cast" and src is not None and src.dtype is not None and src.dtype == v.dtype:
            v = src
        elif op == "Expand" and len(node.inputs) == 2 and (sh := producer(node.inputs[1], "Shape")) is not None \
                and strip(sh.inputs[0]) is strip(src) and attr(sh, "start", 0) == 0 and attr(sh, "end") is None:
            v = src
        else:
            return v
    return v


def strip_up(v: ir.Value | None) -> ir.Value | None:
    """strip, and also the reference's up(): Cast to float32 / float64."""
    v = strip(v)
    while (node := producer(v, "Cast")) is not None and attr(node, "to") in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
        v = strip(node.inputs[0])
    return v


def weight(v: ir.Value | None) -> ir.Value | None:
    """The graph initializer behind v (through identities and up-casts), or None when v is computed."""
    v = strip_up(v)
    return v if v is not None and v.is_initializer() else None


def describe(v: ir.Value | None) -> str:
    """'Op(name)' of v's producer, for failure reasons."""
    if v is None:
        return "nothing"
    node = v.producer()
    if node is None:
        return f"{'initializer' if v.is_initializer() else 'graph input'} {v.name}"
    return f"{node.domain + '.' if node.domain else ''}{node.op_type}({node.name})"


def depends_on(v: ir.Value, src: ir.Value, limit: int = 400) -> bool:
    """Whether `src` is an ancestor of `v`, looking at no more than `limit` nodes."""
    seen, todo = set(), [v]
    while todo and len(seen) < limit:
        cur = todo.pop()
        if cur is src:
            return True
        node = cur.producer() if cur is not None else None
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(i for i in node.inputs if i is not None)
    return False


def layer_of(node: ir.Node) -> str | None:
    """'layers.3' / 'mtp.0' from the torch exporter's module path of the node, or None (embedding, head, ...)."""
    raw = node.metadata_props.get(LAYER_SCOPE_KEY)
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    for sc in scopes:
        parts = sc.split(".")
        if len(parts) >= 3 and parts[0] == "model" and parts[1] in ("layers", "mtp") and parts[2].isdigit():
            return f"{parts[1]}.{parts[2]}"
    return None


def scope_of(node: ir.Node) -> str:
    """The innermost module path of the node below its layer (e.g. 'ffn.shared_experts.w1'), or ''."""
    raw = node.metadata_props.get(LAYER_SCOPE_KEY)
    try:
        scopes = ast.literal_eval(raw) if raw else []
    except (ValueError, SyntaxError):
        scopes = []
    mods = [s for s in scopes if s.startswith("model.")]
    return ".".join(mods[-1].split(".")[3:]) if mods else ""
