"""THE dsv4 custom-op registry: one row per op in ONNX domain ``dsv4`` version 1 (DESIGN.md "The custom-op registry").

A row names every face of one op by one stem:

* eager reference: the ``torch.library`` op in models/kernels.py (or a plain torch function for the two ops
  that only occur inside other bodies);
* ONNX function body: ``export/functions.py`` (standard ops; any runtime can run it by inlining);
* ORT face and TVM face: import strings (``"inline"`` = run the body), so this table loads without
  onnxruntime or tvm installed.

Export keeps each dsv4 op as ONE bare node (ECOSYSTEM.md V2b/V11): an ``onnx.defs.OpSchema`` is registered for
every row, the translation emits the bare node, and ``attach_functions`` adds the bodies to the model after
export (torch 2.13's exporter would otherwise inline them and fold packed weights into float).
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxscript
from onnx.defs import OpSchema

from . import functions
from .functions import DOMAIN, DOMAIN_VERSION

_A = OpSchema.AttrType
FLOATS = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)")  # "T": activations
ACCUMS = ("tensor(float)", "tensor(double)")  # "F": fp32 accumulators (fp64 in fp64 models, as models/quant.up)


@dataclass(frozen=True)
class OpRow:
    name: str  # ONNX op type in domain dsv4; also the function body's name in export/functions.py
    eager: str  # import string of the eager reference ("module:attr")
    torch_op: str | None  # the torch.library op the exporter translates (None: occurs only inside other bodies)
    inputs: tuple[tuple[str, str], ...]  # (name, "T" or a fixed tensor type)
    outputs: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[str, OpSchema.AttrType], ...] = ()
    ort: str = "inline"
    tvm: str = "inline"
    optional: tuple[str, ...] = field(default=())  # inputs that may be omitted
    doc: str = ""
    sample: str = ""  # import string of its sample inputs (export/op_samples.py), for the registry tests

    @property
    def body(self) -> onnxscript.OnnxFunction:
        return functions.BODIES[self.name]

    def eager_fn(self) -> Callable:
        return load(self.eager)

    def computes_in_type(self) -> bool:
        """Whether the body follows its inputs' precision (fp64 models retype it); rows with only fixed output
        types (the dequants: always fp32, exact) keep fp32."""
        return any(t in ("T", "F") for _, t in self.outputs)

    def _uses(self, var: str) -> bool:
        return any(t == var for _, t in self.inputs + self.outputs)

    def schema(self) -> OpSchema:
        P = OpSchema.FormalParameter
        opt = OpSchema.FormalParameterOption.Optional
        single = OpSchema.FormalParameterOption.Single
        return OpSchema(
            self.name, DOMAIN, DOMAIN_VERSION, self.doc,
            inputs=[P(n, t, "", param_option=opt if n in self.optional else single) for n, t in self.inputs],
            outputs=[P(n, t) for n, t in self.outputs],
            type_constraints=[(v, list(ts), d) for v, ts, d in (("T", FLOATS, "activations"), ("F", ACCUMS, "accumulators"))
                              if self._uses(v)],
            attributes=[OpSchema.Attribute(n, k, "") for n, k in self.attributes],
        )


def load(path: str):
    """Resolve an import string ``package.module:attr``."""
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


_F, _I64, _U8 = "tensor(float)", "tensor(int64)", "tensor(uint8)"
_DTYPES = {_F: ir.DataType.FLOAT, _I64: ir.DataType.INT64, _U8: ir.DataType.UINT8}
_K = "dsv4.models.kernels:"
_S = "dsv4.export.op_samples:"
_TVM = "dsv4.runtimes.tvm.lowerings:"  # TVM faces: runtimes/tvm/lowerings.py
_LOWER = "dsv4.passes.lower_ort:"  # ORT faces: the rewrite rules of passes/lower_ort.py
_WEIGHTS = "dsv4.passes.ort_weights:"  # ... and of the packed-weight forms it uses (passes/ort_weights.py)

REGISTRY: tuple[OpRow, ...] = (
    OpRow("SparseAttn", "dsv4.export.custom_ops:sparse_attn_reference", "dsv4::sparse_attn",
          (("q", "T"), ("kv", "T"), ("sink", "F"), ("idx", _I64), ("scale", "F")), (("o", "T"),),
          tvm=_TVM + "sparse_attn", sample=_S + "sample_sparse_attn",
          doc="attention over selected rows of a shared K=V bank with a per-head sink logit; scale is a scalar "
              "tensor (exact in fp64 models)"),
    OpRow("IndexerTopK", _K + "indexer_topk", "dsv4::indexer_topk",
          (("q", "T"), ("k", "T"), ("w", "T"), ("n_visible", _I64)), (("idx", _I64),), (("top_k", _A.INT),),
          sample=_S + "sample_indexer_topk", doc="lightning-indexer scores and exactly top_k indices, -1 padded"),
    OpRow("Compress", _K + "compress", "dsv4::compress",
          (("kv", "F"), ("score", "F"), ("prev_kv", "F"), ("prev_score", "F")), (("entries", "F"),),
          (("overlap", _A.INT),), tvm=_TVM + "compress", sample=_S + "sample_compress",
          doc="gated softmax pooling of m-token blocks (overlapping halves when overlap=1)"),
    OpRow("HcSplitSinkhorn", _K + "hc_split_sinkhorn", "dsv4::hc_split_sinkhorn",
          (("mixes", "F"), ("scale", "F"), ("base", "F")), (("pre", "F"), ("post", "F"), ("comb", "F")),
          (("hc_mult", _A.INT), ("iters", _A.INT), ("eps", _A.FLOAT)),
          tvm=_TVM + "hc_split_sinkhorn", sample=_S + "sample_hc_split_sinkhorn",
          doc="mHC pre/post weights and the Sinkhorn-normalised comb matrix"),
    OpRow("Fp8Linear", _K + "fp8_linear", "dsv4::fp8_linear", (("x", "T"), ("weight", _U8), ("scale", _U8)),
          (("y", "T"),), tvm=_TVM + "fp8_linear", ort=_WEIGHTS + "LowerPackedLinear", sample=_S + "sample_fp8_linear",
          doc="x @ dequant(FP8 e4m3 weight with E8M0 128x128 tile scales)^T"),
    OpRow("Mxfp4Linear", _K + "mxfp4_linear", "dsv4::mxfp4_linear", (("x", "T"), ("weight", _U8), ("scale", _U8)),
          (("y", "T"),), tvm=_TVM + "mxfp4_linear", ort=_WEIGHTS + "LowerPackedLinear", sample=_S + "sample_mxfp4_linear",
          doc="x @ dequant(MXFP4 weight, E8M0 scales per 32)^T"),
    OpRow("Fp8Dequant", _K + "fp8_dequant", "dsv4::fp8_dequant", (("weight", _U8), ("scale", _U8)),
          (("w", _F),), tvm=_TVM + "fp8_dequant", ort=_WEIGHTS + "LowerPackedDequant", sample=_S + "sample_fp8_dequant",
          doc="FP8 e4m3 bytes + E8M0 tile scales -> fp32 (leading batch dims allowed)"),
    OpRow("Mxfp4Dequant", _K + "mxfp4_dequant", "dsv4::mxfp4_dequant", (("weight", _U8), ("scale", _U8)),
          (("w", _F),), tvm=_TVM + "mxfp4_dequant", ort=_WEIGHTS + "LowerPackedDequant", sample=_S + "sample_mxfp4_dequant",
          doc="packed e2m1 + E8M0 scales -> fp32 (leading batch dims allowed)"),
    OpRow("Fp8ActQdq", "dsv4.export.custom_ops:fp8_act_qdq_reference", None, (("x", "T"), ("block", _I64)),
          (("y", "T"),), sample=_S + "sample_fp8_act_qdq",
          doc="FP8 activation quantise/dequantise per block (used inside MoEExperts)"),
    OpRow("MoEExperts", "dsv4.export.custom_ops:moe_experts_reference", "dsv4::moe_experts",
          (("x", "T"), ("weights", "F"), ("idx", _I64), ("w1", "T"), ("w2", "T"), ("w3", "T")), (("y", "F"),),
          (("swiglu_limit", _A.FLOAT), ("act_quant", _A.INT)), sample=_S + "sample_moe_experts",
          tvm=_TVM + "moe_experts", doc="routed SwiGLU experts of one MoE layer over stacked float expert weights [E, out, in]"),
    OpRow("MoE", "dsv4.export.custom_ops:moe_reference", None,
          (("x", "T"), ("gate_weight", "T"), ("bias", "F"), ("tid2eid", _I64), ("ids", _I64), ("w1", "T"), ("w2", "T"),
           ("w3", "T"), ("shared", "F")), (("y", "F"),),
          (("top_k", _A.INT), ("route_scale", _A.FLOAT), ("swiglu_limit", _A.FLOAT), ("hash_routing", _A.INT),
           ("act_quant", _A.INT), ("scoring", _A.STRING)),
          ort="dsv4.passes.lower_ort:LowerMoE", sample=_S + "sample_moe",
          doc="one MoE layer made by passes/fuse_moe.py: sqrtsoftplus gate, hash or bias-corrected top-k selection, "
              "normalised x route_scale weights, routed experts, + the shared expert's output"),
)
ROWS: dict[str, OpRow] = {r.name: r for r in REGISTRY}
# torch ops translated into a row's node besides its own torch_op: name -> (row, translation)
ALIASES = {"dsv4::moe_experts_stacked": "MoEExperts"}
BY_TORCH_OP: dict[str, OpRow] = {r.torch_op: r for r in REGISTRY if r.torch_op} | {a: ROWS[n] for a, n in ALIASES.items()}


def moe_experts_reference(x, weights, idx, w1, w2, w3, swiglu_limit: float, act_quant: int):
    """The MoEExperts node's contract in terms of the eager op: stacked float weights, split per expert."""
    from dsv4.models import kernels

    return kernels.moe_experts(x, weights, idx, list(w1.unbind(0)), list(w2.unbind(0)), list(w3.unbind(0)), [], [],
                               [], kernels.FMT_FLOAT, float(swiglu_limit), bool(act_quant))


def moe_reference(x, gate_weight, bias, tid2eid, ids, w1, w2, w3, shared, top_k: int, route_scale: float,
                  swiglu_limit: float, hash_routing: int, act_quant: int, scoring: str):
    """The MoE node's contract: models/model.py Gate.forward + MoE.forward over stacked float expert weights, with
    the shared expert's output given (bias / tid2eid / ids are placeholders where the routing does not use them)."""
    import torch
    import torch.nn.functional as F

    from dsv4.models.quant import up

    if scoring != "sqrtsoftplus":
        raise ValueError(f"MoE: scoring {scoring!r} is not implemented (only 'sqrtsoftplus')")
    s = torch.sqrt(F.softplus(F.linear(up(x), up(gate_weight))))  # [N,E]
    idx = tid2eid[ids] if hash_routing else torch.topk(s + bias, int(top_k), dim=-1).indices
    w = s.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * float(route_scale)
    return moe_experts_reference(x, w, idx, w1, w2, w3, swiglu_limit, act_quant) + up(shared)


def sparse_attn_reference(q, kv, sink, idx, scale):
    """SparseAttn's contract: kernels.sparse_attn with the scale given as a scalar tensor."""
    from dsv4.models import kernels

    return kernels.sparse_attn(q, kv, sink, idx, float(scale))


def fp8_act_qdq_reference(x, block):
    """Fp8ActQdq's contract: models/quant.fp8_act_qdq with the block given as an int64 [1] tensor."""
    from dsv4.models import quant

    return quant.fp8_act_qdq(x, int(block.reshape(-1)[0]))


def register_schemas() -> None:
    """Register an OpSchema for every row (needed by torch 2.13's tracer for bare custom-domain nodes)."""
    for row in REGISTRY:
        if not onnx.defs.has(row.name, DOMAIN):
            onnx.defs.register_schema(row.schema())


# ---- translation: torch op -> one bare dsv4 node ------------------------------------------------------------
_dsv4 = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _bare(row: OpRow) -> Callable:
    n_in = len(row.inputs)

    def translate(*args):
        attrs = {}
        for (name, kind), v in zip(row.attributes, args[n_in:]):
            attrs[name] = int(v) if kind == _A.INT else float(v)
        return getattr(_dsv4, row.name)(*args[:n_in], **attrs)

    translate.__name__ = f"dsv4_{row.name}"
    return translate


def _sparse_attn(q, kv, sink, idx, scale):
    """The scale travels as a scalar tensor of the sink's type (fp64 models keep the exact double)."""
    dt = np.float64 if sink.dtype == ir.DataType.DOUBLE else np.float32
    return _dsv4.SparseAttn(q, kv, sink, idx, onnxscript.opset18.Constant(value=ir.tensor(np.array(scale, dtype=dt))))


def _moe_experts(x, weights, idx, w1, w2, w3, s1, s2, s3, fmt, swiglu_limit, act_quant):
    """Stack the per-expert weights (export.py turns each stack into ONE initializer [E, ...]) and dequantise
    packed ones with the dsv4 dequant ops, so the MoEExperts node always sees float [E, out, in]."""
    from dsv4.models import kernels

    op = onnxscript.opset18

    def stack(ws):
        return op.Concat(*[op.Unsqueeze(w, op.Constant(value_ints=[0])) for w in ws], axis=0)

    def weight(ws, ss):
        if fmt == kernels.FMT_FLOAT:
            return stack(ws)
        deq = _dsv4.Fp8Dequant if fmt == kernels.FMT_FP8 else _dsv4.Mxfp4Dequant
        return deq(stack(ws), stack(ss))

    return _dsv4.MoEExperts(x, weights, idx, weight(w1, s1), weight(w2, s2), weight(w3, s3),
                            swiglu_limit=float(swiglu_limit), act_quant=int(act_quant))


def _moe_experts_stacked(x, weights, idx, w1, w2, w3, s1, s2, s3, fmt, swiglu_limit, act_quant):
    """The stacked form: the weights are already [E, ...] initializers (export.py names them as the per-expert stack
    would be named); packed ones are dequantised with the dsv4 dequant ops, as in _moe_experts."""
    from dsv4.models import kernels

    def weight(w, s):
        if fmt == kernels.FMT_FLOAT:
            return w
        return (_dsv4.Fp8Dequant if fmt == kernels.FMT_FP8 else _dsv4.Mxfp4Dequant)(w, s)

    return _dsv4.MoEExperts(x, weights, idx, weight(w1, s1), weight(w2, s2), weight(w3, s3),
                            swiglu_limit=float(swiglu_limit), act_quant=int(act_quant))


_SPECIAL = {"MoEExperts": _moe_experts, "SparseAttn": _sparse_attn, "dsv4::moe_experts_stacked": _moe_experts_stacked}


def translation_table() -> dict:
    """``custom_translation_table`` for torch.onnx.export: every dsv4 torch op -> its bare node."""
    import torch

    import dsv4.models.kernels  # noqa: F401  (registers the torch.library ops)

    register_schemas()
    table = {}
    for row in REGISTRY:
        if row.torch_op is None:
            continue
        ns, name = row.torch_op.split("::")
        overload = getattr(getattr(torch.ops, ns), name).default
        table[overload] = _SPECIAL.get(row.name) or _bare(row)
    for alias in ALIASES:
        ns, name = alias.split("::")
        table[getattr(getattr(torch.ops, ns), name).default] = _SPECIAL[alias]
    return table


# ---- after export: bodies as model-local functions -----------------------------------------------------------
def dsv4_op_types(nodes) -> set[str]:
    """dsv4 op types used by `nodes` (NodeProtos), including inside If/Loop subgraphs."""
    out = set()
    for n in nodes:
        if n.domain == DOMAIN:
            out.add(n.op_type)
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out |= dsv4_op_types(g.node)
    return out


def dsv4_nodes(model: ir.Model) -> Counter:
    """Op-type histogram of the dsv4 nodes of the main graph (recursing into subgraphs, not into functions)."""
    return Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN)


_EXACT = {float(np.float32(v)): v for v in functions.EXACT_DOUBLES}


def _to_double(nodes) -> None:
    """Retype a body from fp32 compute to fp64 compute in place: Cast(to=FLOAT) -> DOUBLE, float constants ->
    double (attribute-referenced ones through a Cast: ONNX attributes are fp32), as models/quant.up() keeps
    fp64 models in fp64. Literal fp32 constants become the same value in fp64."""
    T = onnx.TensorProto
    for i in reversed(range(len(nodes))):  # ORT has no double Softplus kernel: log(1 + exp(x)), as export.py does
        n = nodes[i]
        if n.op_type == "Softplus" and n.domain == "":
            x, y = n.input[0], n.output[0]
            new = [onnx.helper.make_node("Constant", [], [y + "__one"], value=onnx.helper.make_tensor("", T.DOUBLE, [], [1.0])),
                   onnx.helper.make_node("Exp", [x], [y + "__exp"]),
                   onnx.helper.make_node("Add", [y + "__one", y + "__exp"], [y + "__1pe"]),
                   onnx.helper.make_node("Log", [y + "__1pe"], [y])]
            del nodes[i]
            for j, m in enumerate(new):
                nodes.insert(i + j, m)
    for i in range(len(nodes)):
        n = nodes[i]
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == T.FLOAT:
                a.i = T.DOUBLE
            elif n.op_type == "Constant" and a.name in ("value_float", "value_floats") and a.ref_attr_name:
                out = n.output[0]
                n.output[0] = out + "__f32"
                nodes.insert(i + 1, onnx.helper.make_node("Cast", [n.output[0]], [out], to=T.DOUBLE))
            elif n.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                vals = [_EXACT.get(v, v) for v in ([a.f] if a.name == "value_float" else list(a.floats))]
                dims = [] if a.name == "value_float" else [len(vals)]
                a.CopyFrom(onnx.helper.make_attribute("value", onnx.helper.make_tensor("", T.DOUBLE, dims, vals)))
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == T.FLOAT:
                arr = onnx.numpy_helper.to_array(a.t).astype("float64")
                a.t.CopyFrom(onnx.numpy_helper.from_array(arr, a.t.name))
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _to_double(g.node)


def attach_functions(model: ir.Model, compute: str = "float32") -> list[str]:
    """Add the body of every dsv4 op the graph uses (and of the dsv4 ops those bodies call) as model-local
    functions, stamped with the model's ai.onnx opset. compute: "float32" (the bodies as written) or "float64"
    (fp64 models, for exactness tests). Returns the attached op names, sorted. An unregistered dsv4 op raises."""
    opset = model.opset_imports[""]
    todo = set(dsv4_nodes(model))
    done: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in ROWS:
            raise KeyError(f"dsv4.{name}: no registry row (export/custom_ops.py)")
        proto = ROWS[name].body.to_function_proto()
        if compute == "float64" and ROWS[name].computes_in_type():
            _to_double(proto.node)
        callees = dsv4_op_types(proto.node)
        for imp in proto.opset_import:
            if imp.domain == "":
                imp.version = opset
        if callees and all(imp.domain != DOMAIN for imp in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))  # calls inside subgraphs
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
        done.add(name)
        todo |= callees - done
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    return sorted(done)


def op_model(name: str, inputs: list, attrs: dict, out_ranks: list[int] | None = None,
             opset: int = functions.BODY_OPSET, compute: str = "float32") -> ir.Model:
    """A one-node model running ``dsv4.<name>`` on graph inputs shaped like `inputs` (numpy arrays), with the
    bodies attached: what the registry tests run in each runtime. `out_ranks` gives the outputs a rank (with
    unknown dims), which onnx.checker requires of graph outputs."""
    row = ROWS[name]
    vals = [ir.Value(name=n, type=ir.TensorType(ir.DataType.from_numpy(a.dtype)), shape=ir.Shape(a.shape))
            for (n, _), a in zip(row.inputs, inputs)]
    node = ir.node(name, vals, attributes=attrs, domain=DOMAIN, num_outputs=len(row.outputs))
    var_type = {t: v.dtype for v, (_, t) in reversed(list(zip(vals, row.inputs)))}
    for v, (n, t) in zip(node.outputs, row.outputs):
        v.name = n
        v.dtype = var_type[t] if t in ("T", "F") else _DTYPES[t]
    for v, r in zip(node.outputs, out_ranks or ()):
        v.shape = ir.Shape([None] * r)
    graph = ir.Graph(vals, list(node.outputs), nodes=[node], opset_imports={"": opset, DOMAIN: DOMAIN_VERSION},
                     name=f"dsv4_{name}")
    model = ir.Model(graph, ir_version=10, producer_name="dsv4")
    attach_functions(model, compute)
    return model
