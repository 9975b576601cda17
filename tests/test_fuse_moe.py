"""passes/fuse_moe.py and passes/lower_ort.py: the MoE rule (one positive case per routing kind, negative cases
with their reasons) and every ORT lowering of dsv4.MoE, each proven against the eager reference and the body."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from dsv4.export import custom_ops
from dsv4.models import quant
from dsv4.passes import fuse_moe, lower_ort
from dsv4.passes.pipeline import run

# fp32 graph vs fp32 graph or eager: the same maths in another accumulation order (matmuls over <= 64 terms, a
# softmax instead of a division for the ORT ops); relative to the output's scale, as tests/test_export.py.
RTOL = 1e-5
E, D, I, K, N, V = 8, 64, 64, 2, 7, 16
F32 = ir.DataType.FLOAT


def _f(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def weights(form: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Gate, bias, table and experts; form: "float" stacks, "mxfp4" / "fp8" packed stacks (+ "<w>_scale")."""
    rng = np.random.default_rng(seed)
    out = {"wg": _f(rng, E, D, scale=D ** -0.5), "bias": _f(rng, E, scale=0.1),
           "tid2eid": np.stack([rng.permutation(E)[:K] for _ in range(V)]).astype(np.int64),
           "sw1": _f(rng, I, D, scale=D ** -0.5), "sw2": _f(rng, D, I, scale=I ** -0.5), "sw3": _f(rng, I, D, scale=D ** -0.5)}
    for name, (o, i) in (("w1", (I, D)), ("w2", (D, I)), ("w3", (I, D))):
        w = torch.from_numpy(_f(rng, E, o, i, scale=3 * i ** -0.5))  # large enough that the clamp at 10 acts
        if form == "float":
            out[name] = w.numpy()
        else:
            fn = quant.mxfp4_quantize if form == "mxfp4" else quant.fp8_block_quantize
            packed = [fn(w[e]) for e in range(E)]
            out[name] = torch.stack([p[0].view(torch.uint8) for p in packed]).numpy()
            out[name + "_scale"] = torch.stack([p[1] for p in packed]).numpy()
    return out


def dense(name: str, form: str, w: dict) -> torch.Tensor:
    if form == "float":
        return torch.from_numpy(w[name])
    deq = quant.mxfp4_dequant if form == "mxfp4" else quant.fp8_block_dequant
    return torch.stack([deq(torch.from_numpy(w[name][e]), torch.from_numpy(w[name + "_scale"][e])) for e in range(E)])


def routing_model(form: str = "float", selection: str = "learned", scoring: str = "sqrtsoftplus",
                  shared_from_x: bool = True, act_quant: int = 0, seed: int = 0) -> tuple[ir.Model, dict]:
    """An MoE layer the way the exporter writes it (torch's softplus decomposition, Gemm gate, MoEExperts, shared
    expert Gemms, the final Add), with the variations the negative cases need."""
    w = weights(form, seed)
    t = ir.tape.Tape()
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape(["n", D]))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["n"]))
    other = ir.Value(name="other", type=ir.TensorType(F32), shape=ir.Shape(["n", D]))
    inits = {k: ir.Value(name=k, type=ir.TensorType(ir.DataType.from_numpy(v.dtype)), shape=ir.Shape(v.shape),
                         const_value=ir.tensor(v, name=k)) for k, v in w.items()}

    def const(v):
        return t.op("Constant", [], {"value": ir.tensor(np.asarray(v))})

    logits = t.op("Gemm", [x, inits["wg"]], {"transB": 1})
    if scoring == "sqrtsoftplus":
        one, thr = const(np.float32(1.0)), const(np.float32(20.0))
        scaled = t.op("Mul", [logits, one])
        sp = t.op("Where", [t.op("Greater", [scaled, thr]), logits, t.op("Div", [t.op("Softplus", [scaled]), one])])
        s = t.op("Sqrt", [sp])
    else:  # V3-style sigmoid scores
        s = t.op("Sigmoid", [logits])
    if selection == "hash":
        idx = t.op("Gather", [inits["tid2eid"], ids], {"axis": 0})
    else:
        ranked = t.op("Add", [s, inits["bias"]]) if selection == "learned" else logits
        _, idx = t.op_multi_out("TopK", [ranked, const(np.array([K]))], {"axis": -1, "largest": 1, "sorted": 1},
                                num_outputs=2)
    g = t.op("GatherElements", [s, idx], {"axis": 1})
    r = t.op("Mul", [t.op("Div", [g, t.op("ReduceSum", [g, const(np.array([-1]))], {"keepdims": 1})]),
                     const(np.float32(1.5))])
    stacks = []
    for name in ("w1", "w2", "w3"):
        if form == "float":
            stacks.append(inits[name])
        else:
            op = "Mxfp4Dequant" if form == "mxfp4" else "Fp8Dequant"
            stacks.append(t.op(op, [inits[name], inits[name + "_scale"]], domain="dsv4"))
    y = t.op("MoEExperts", [x, r, idx, *stacks], {"swiglu_limit": 10.0, "act_quant": act_quant}, domain="dsv4")
    if shared_from_x:
        gs, us = t.op("Gemm", [x, inits["sw1"]], {"transB": 1}), t.op("Gemm", [x, inits["sw3"]], {"transB": 1})
        shared = t.op("Gemm", [t.op("Mul", [t.op("Mul", [gs, t.op("Sigmoid", [gs])]), us]), inits["sw2"]], {"transB": 1})
    else:
        shared = other
    out = t.op("Add", [y, shared])
    out.name = "y"
    graph = ir.Graph([x, ids, other], [out], nodes=t.nodes, initializers=list(inits.values()),
                     opset_imports={"": 23, "dsv4": 1}, name="moe_layer")
    model = ir.Model(graph, ir_version=10)
    custom_ops.attach_functions(model)
    return model, w


def feeds(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": _f(rng, N, D), "ids": rng.integers(0, V, N).astype(np.int64), "other": _f(rng, N, D)}


def run_ort(model: ir.Model, inputs: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # our graph, not ORT's rewrite of it
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in inputs.items() if k in names})[0]


def eager(w: dict, form: str, selection: str, inputs: dict, act_quant: int = 0) -> np.ndarray:
    """custom_ops.moe_reference (the registry's eager face) on the same weights, shared expert in torch."""
    x = torch.from_numpy(inputs["x"])
    gs, us = x @ torch.from_numpy(w["sw1"]).T, x @ torch.from_numpy(w["sw3"]).T
    shared = (torch.nn.functional.silu(gs) * us) @ torch.from_numpy(w["sw2"]).T
    hashed = selection == "hash"
    table = torch.from_numpy(w["tid2eid"]) if hashed else torch.zeros(1, K, dtype=torch.int64)
    ids = torch.from_numpy(inputs["ids"]) if hashed else torch.zeros(1, dtype=torch.int64)
    bias = torch.zeros(E) if hashed else torch.from_numpy(w["bias"])
    y = custom_ops.moe_reference(x, torch.from_numpy(w["wg"]), bias, table, ids, dense("w1", form, w),
                                 dense("w2", form, w), dense("w3", form, w), shared, K, 1.5, 10.0, int(hashed),
                                 act_quant, "sqrtsoftplus")
    return y.numpy()


def assert_close(got, ref, what):
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= RTOL * scale, f"{what}: max abs {err:.3g} > {RTOL} x {scale:.3g}"


def ops(model: ir.Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph:
        k = f"{n.domain}.{n.op_type}" if n.domain else n.op_type
        out[k] = out.get(k, 0) + 1
    return out


# ---- the fusion rule ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["learned", "hash"])
def test_routing_experts_and_shared_add_fuse_into_one_moe_node(selection):
    """The exported routing + MoEExperts + Add(shared) become one dsv4.MoE with the layer's attributes; same numbers."""
    model, w = routing_model(selection=selection)
    inputs = feeds()
    raw = run_ort(model, inputs)
    assert fuse_moe.explain(model) == {next(n.name for n in model.graph if n.op_type == "MoEExperts"): "fusable"}
    assert fuse_moe.FuseMoEPass()(model).counts["MoE"] == 1
    o = ops(model)
    assert o.get("dsv4.MoE") == 1 and "dsv4.MoEExperts" not in o
    assert not {"TopK", "Softplus", "Sqrt", "GatherElements", "ReduceSum", "Gather"} & set(o), o
    node = next(n for n in model.graph if n.op_type == "MoE")
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs == {"top_k": K, "route_scale": 1.5, "swiglu_limit": 10.0, "hash_routing": int(selection == "hash"),
                     "act_quant": 0, "scoring": "sqrtsoftplus"}
    custom_ops.attach_functions(model)
    fused = run_ort(model, inputs)
    assert_close(fused, raw, "fused body vs raw graph")
    assert_close(fused, eager(w, "float", selection, inputs), "fused body vs eager")


def test_topk_that_is_not_a_routing_gate_does_not_fuse():
    """A TopK over the gate logits (no scores + bias) is not V4's routing: nothing fuses, and explain says why."""
    model, _ = routing_model(selection="logits")
    n = len(list(model.graph))
    (reason,) = fuse_moe.explain(model).values()
    assert reason.startswith("selection: TopK ranks Gemm(") and "not scores + bias: not a routing gate" in reason
    _refused(model, reason)
    assert len(list(model.graph)) == n  # nothing rewritten


def test_a_lone_topk_is_no_candidate():
    """A TopK that feeds no MoEExperts (e.g. the indexer's) is never touched."""
    t = ir.tape.Tape()
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([3, 10]))
    vals, idx = t.op_multi_out("TopK", [x, t.op("Constant", [], {"value": ir.tensor(np.array([4]))})], {"axis": -1},
                               num_outputs=2)
    model = ir.Model(ir.Graph([x], [vals, idx], nodes=t.nodes, opset_imports={"": 23}), ir_version=10)
    assert fuse_moe.explain(model) == {}
    assert fuse_moe.FuseMoEPass()(model).counts["MoE"] == 0 and [n.op_type for n in model.graph] == ["Constant", "TopK"]


def test_routing_with_another_scoring_function_does_not_fuse():
    """Sigmoid scores (V3's routing) are not the sqrtsoftplus dsv4.MoE implements: no fusion, reason given."""
    model, _ = routing_model(scoring="sigmoid")
    (reason,) = fuse_moe.explain(model).values()
    assert reason.startswith("scoring: the gathered scores come from Sigmoid(") and "sqrtsoftplus" in reason
    _refused(model, reason)


def test_an_add_of_something_else_is_not_the_shared_expert():
    """The routed output added to a tensor not computed from the layer input does not fuse."""
    model, _ = routing_model(shared_from_x=False)
    (reason,) = fuse_moe.explain(model).values()
    assert reason.startswith("shared: the added graph input other is not computed from the layer input")
    _refused(model, reason)


def _refused(model, reason: str) -> None:
    """The pass does not fuse the non-V4 MoE, and fails (its target relies on one dsv4.MoE per MoE layer) with the
    rule's reason for that node (issue [6]: a rule that does not fire is an error, not a 0 in a table)."""
    from dsv4.passes.expect import ExpectationError

    with pytest.raises(ExpectationError) as e:
        fuse_moe.FuseMoEPass()(model)
    assert "1 of 1 not rewritten" in str(e.value) and reason in str(e.value)


# ---- the ORT lowerings -------------------------------------------------------------------------------------------
LOWERED = {"float": "com.microsoft.MoE", "mxfp4": "com.microsoft.QMoE", "fp8": "com.microsoft.MoE"}


@pytest.mark.parametrize("selection", ["learned", "hash"])
@pytest.mark.parametrize("form", ["float", "mxfp4", "fp8"])
def test_ort_lowering_is_exact(form, selection, monkeypatch):
    """Each lowering of dsv4.MoE (float experts -> MoE with a derived interleaved fc1; MXFP4 -> QMoE on int8 blocks;
    FP8 computed stacks -> MoE interleaved in-graph) equals the eager reference and the function body."""
    monkeypatch.setenv("ORT_QMOE_CPU_QNBIT_GEMM", "fp32")  # what runtimes/ort/session.py sets
    model, w = routing_model(form=form, selection=selection)
    inputs = feeds()
    raw = run_ort(model, inputs)
    counts = run(model, "ort-cpu")
    assert counts["fuse_moe"]["MoE"] == 1 and counts["lower_ort"]["lowered"] == 1
    o = ops(model)
    assert o.get(LOWERED[form]) == 1 and not any(k.startswith("dsv4.") for k in o), o
    assert (form == "fp8") == ("Concat" in o)  # only computed stacks are interleaved per call
    got = run_ort(model, inputs)
    assert_close(got, eager(w, form, selection, inputs), f"{LOWERED[form]} vs eager")
    assert_close(got, raw, f"{LOWERED[form]} vs the raw graph")


def test_lowering_refuses_the_fp8_activation_simulation_and_says_why():
    """With act_quant=1 the qdq of h sits inside each expert: the node keeps its body; explain names the reason."""
    model, _ = routing_model(act_quant=1)
    fuse_moe.FuseMoEPass()(model)
    (reason,) = lower_ort.explain(model).values()
    assert reason.startswith("act_quant=1: the reference quantises h")
    assert lower_ort.LowerOrtPass()(model).counts["lowered"] == 0 and ops(model).get("dsv4.MoE") == 1


def test_qmoe_needs_the_fp32_gemm_path(monkeypatch):
    """Without ORT_QMOE_CPU_QNBIT_GEMM=fp32 ORT quantises QMoE's activations to int8: visibly off (why the runtime
    sets it)."""
    monkeypatch.delenv("ORT_QMOE_CPU_QNBIT_GEMM", raising=False)
    model, w = routing_model(form="mxfp4")
    run(model, "ort-cpu")
    ref = eager(w, "mxfp4", "learned", feeds())
    err = float(np.abs(run_ort(model, feeds()) - ref).max()) / float(np.abs(ref).max())
    assert err > 100 * RTOL


def test_mxfp4_to_int8_blocks_is_lossless():
    """q8 = 128 + 2 e2m1 with scale 2^(e-128) reproduces the MXFP4 weight bit for bit, every code and scale."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(2 * 32)  # every code, in blocks of 32
    scales = torch.tensor([0, 1, 100, 127], dtype=torch.uint8).repeat_interleave(8).view(1, 32)  # incl. 2^-127
    packed = quant.mxfp4_pack(codes.view(1, -1)[:, : 32 * 32])
    q = lower_ort.mxfp4_to_q8(packed).to(torch.float32) - lower_ort.ZERO_POINT
    s = lower_ort.e8m0_to_q8_scale(scales).repeat_interleave(32, -1)
    ref = quant.mxfp4_dequant(packed, scales)
    assert torch.equal(q * s, ref)


def _assert_lowers_to_dequantize_linear(name: str, q: np.ndarray, s: np.ndarray, rng, key: str) -> None:
    """A one-node model: dsv4.<name>Linear on x (2-D weights) or dsv4.<name>Dequant (3-D stacks) over the weight
    initializers q, s; after LowerOrtPass it is one DequantizeLinear (counted under `key`) and no dsv4 node, and
    its output equals the lookup-table body's (assert_array_equal: -0.0 == +0.0)."""
    t = ir.tape.Tape()
    cols = q.shape[-1] * (2 if name == "Mxfp4" else 1)
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([3, cols]))
    wv, sv = (ir.Value(name=n, type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(a.shape),
                       const_value=ir.tensor(a, name=n)) for n, a in (("w", q), ("s", s)))
    linear = q.ndim == 2
    y = t.op(f"{name}Linear", [x, wv, sv], domain="dsv4") if linear else t.op(f"{name}Dequant", [wv, sv], domain="dsv4")
    y.name, y.dtype = "y", F32
    model = ir.Model(ir.Graph([x] if linear else [], [y], nodes=t.nodes, initializers=[wv, sv],
                              opset_imports={"": 23, "dsv4": 1}), ir_version=10)
    custom_ops.attach_functions(model)
    feed = {"x": _f(rng, 3, cols)} if linear else {}
    body = run_ort(model, feed)
    counts = lower_ort.LowerOrtPass()(model).counts
    assert counts[key] == 1 and counts["DequantizeLinear (FP8)"] + counts["DequantizeLinear (MXFP4)"] == 1
    o = ops(model)
    assert o.get("DequantizeLinear") == 1 and not any(k.startswith("dsv4.") for k in o), o
    np.testing.assert_array_equal(run_ort(model, feed), body)


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (3, 130, 260)])  # whole tiles, partial tiles, a stack
def test_fp8_weights_dequantise_with_ort_dequantize_linear_bit_for_bit(shape):
    """Fp8Linear (2-D) and Fp8Dequant (a 3-D stack) on weight initializers lower to DequantizeLinear over the same
    bytes as FLOAT8E4M3FN with the tile scales per row: the output equals the lookup-table body's bit for bit."""
    rng = np.random.default_rng(0)
    w = torch.from_numpy(_f(rng, *shape))
    q, s = zip(*(quant.fp8_block_quantize(m) for m in (w.reshape(-1, *shape[-2:]))))
    q = torch.stack([t.view(torch.uint8) for t in q]).reshape(shape).numpy()
    s = torch.stack(s).reshape(*shape[:-2], *torch.stack(s).shape[1:]).numpy()
    _assert_lowers_to_dequantize_linear("Fp8", q, s, rng, "DequantizeLinear (FP8)")


@pytest.mark.parametrize("shape", [(64, 96), (3, 40, 128)])  # a linear, an expert stack
def test_mxfp4_weights_dequantise_with_ort_dequantize_linear(shape):
    """Mxfp4Linear (2-D) and Mxfp4Dequant (a 3-D stack) on weight initializers lower to DequantizeLinear over
    QMoE's int8 re-encoding (block 32, zero point 128): the output equals the lookup-table body's (values equal;
    the lookup's -0.0 for code 8 becomes +0.0)."""
    rng = np.random.default_rng(1)
    w = torch.from_numpy(_f(rng, *shape))
    q, s = zip(*(quant.mxfp4_quantize(m) for m in w.reshape(-1, *shape[-2:])))
    q = torch.stack([t.view(torch.uint8) for t in q]).reshape(*shape[:-1], shape[-1] // 2).numpy()
    s = torch.stack([t.view(torch.uint8) for t in s]).reshape(*shape[:-1], shape[-1] // 32).numpy()
    _assert_lowers_to_dequantize_linear("Mxfp4", q, s, rng, "DequantizeLinear (MXFP4)")


@pytest.mark.parametrize("selection", ["learned", "hash"])
@pytest.mark.parametrize("tokens", [N, 2])  # all experts in use; fewer than E (2 tokens x top-2 of 8)
def test_moe_with_act_quant_narrows_to_the_selected_experts(selection, tokens, monkeypatch):
    """act_quant=1 over MXFP4 stacks (quant_sim on): no contrib op can hold the FP8 simulation, so the MoE keeps its
    body's math, but only the experts some token selected are gathered and dequantised (DequantizeLinear over int8
    blocks), one expert per trip of a Loop (no input_ids [B, 1]: a prefill graph, passes/chunk_experts.py): the same
    numbers as the body, bit for bit, and the eager reference within RTOL."""
    for name in ("D", "I"):  # the FP8 activation blocks are 128 wide: this layer's widths must be multiples
        monkeypatch.setitem(globals(), name, 128)
    model, w = routing_model(form="mxfp4", selection=selection, act_quant=1)
    inputs = {k: v[:tokens] for k, v in feeds().items()}
    raw = run_ort(model, inputs)

    def positional(*a):  # O(position) per call on onnx_ir's linked list: quadratic passes at Flash depth
        raise AssertionError("a pass indexed the graph by position")

    with monkeypatch.context() as patch:
        patch.setattr(ir.Graph, "index", positional)
        patch.setattr(ir.Graph, "__getitem__", positional)
        counts = run(model, "ort-cpu")
    assert counts["fuse_moe"]["MoE"] == 1 and counts["lower_ort"]["narrowed MoE"] == 1
    assert counts["lower_ort"]["lowered"] == 0
    o = ops(model)
    assert o.get("NonZero") == 1 and o.get("Loop") == 1 and not any(k.startswith("dsv4.") for k in o), o
    assert counts["select_ops"]["expert-chunked MoE"] == 1
    assert counts["hoist_experts"]["nodes hoisted"] > 0  # the body's trip-invariant nodes (its constants, limits)
    loop = next(n for n in model.graph if n.op_type == "Loop")
    body = [n.op_type for n in loop.attributes["body"].as_graph()]
    assert body.count("DequantizeLinear") == 3
    assert body.count("NonZero") == 1 and body.count("ScatterND") == 1  # only the rows that chose the trip's expert
    got = run_ort(model, inputs)
    np.testing.assert_array_equal(got, raw)
    assert_close(got, eager(w, "mxfp4", selection, inputs, act_quant=1), "narrowed MoE vs eager")


def test_decode_graph_keeps_the_dense_narrowed_moe(monkeypatch):
    """A graph whose input_ids is [batch, 1] (decode: U <= top_k x batch) keeps NarrowMoE's dense form, no Loop."""
    for name in ("D", "I"):
        monkeypatch.setitem(globals(), name, 128)
    model, _ = routing_model(form="mxfp4", act_quant=1)
    model.graph.inputs.append(ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", 1])))
    inputs = {k: v[:2] for k, v in feeds().items()} | {"input_ids": np.zeros((2, 1), np.int64)}
    raw = run_ort(model, inputs)
    counts = run(model, "ort-cpu")
    assert counts["lower_ort"]["narrowed MoE"] == 1 and "expert-chunked MoE" not in counts["select_ops"]
    o = ops(model)
    assert "Loop" not in o and o.get("DequantizeLinear") == 3, o
    np.testing.assert_array_equal(run_ort(model, inputs), raw)
