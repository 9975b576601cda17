"""Checkpoint (or in-memory model) -> verified artifact: prefill.onnx + decode.onnx + one weights file + manifest.

Stages (each reported by ``progress``):
1. source: a checkpoint directory, an in-memory DeepseekV4, or a synthetic checkpoint built from a preset;
2. skeleton: the model with meta parameters, packed where the source is packed (weights.py);
3. trace (tracing.py: ``torch.onnx.export(dynamo=True, optimize=False)`` with the registry's translation table;
   every dsv4 op is ONE bare ``dsv4.*`` node; routed experts one stacked initializer [E, ...]): dynamic targets
   trace the step once for both graphs (step.py), static ones each bucket; layers.py traces each layer kind once;
4. fold the traced graph's own constants (never the weights), attach the function bodies, optional passes;
5. write the weights tensor by tensor into the shared file and bind both graphs' initializers to it;
6. save, ``onnx.checker`` (full), manifest with sha256 of every file, atomic rename (artifact.py).
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript
import torch

from dsv4.models.config import check_sims
from dsv4.models.files import check_destination, check_space
from dsv4.models.model import DeepseekV4

from . import artifact, custom_ops
from .experts import expert_mode, with_experts
from .layers import trace_by_kind
from .mtp import check as check_mtp
from .mtp import trace_mtp
from .signature import graph_key, growable
from .static import finalize, static_shapes
from .step import capacity_default, split_step
from .stream import keep_bf16, reporter, write_weights
from .targets import Target, get_target
from .tracing import no_cycle_gc
from .weights import CheckpointSource, ModuleSource, skeleton

WEIGHTS_FILE = "weights.data"
PENDING = "<pending>"  # location of placeholder tensors until bind_weights points them at WEIGHTS_FILE
DERIVED = "dsv4.derived"  # Value.meta key: a pass's re-layout of stacked weights, written by bind_weights (passes/lower_ort.py)
Transform = Callable[[ir.Model, str, Target], dict]  # (model, graph name, target) -> per-pass counts


_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)\.(.*)$")
_STACKED = re.compile(r"^(.*\.ffn\.)stacked\.(w[123]\.(?:weight|scale))$")


def stack_experts(model: ir.Model) -> dict[str, list[str]]:
    """Replace each Concat(Unsqueeze(experts.{e}.X) for e) emitted by the MoE translation with ONE initializer
    ``experts.X`` [E, ...]; returns {stacked name: member names} for the weights writer."""
    g, stacks = model.graph, {}
    for node in list(g):
        if node.op_type != "Concat" or not node.inputs:
            continue
        ups = [v.producer() for v in node.inputs]
        if not all(u is not None and u.op_type == "Unsqueeze" for u in ups):
            continue
        members = [u.inputs[0] for u in ups]
        keys = [_EXPERT.match(v.name or "") if v.is_initializer() else None for v in members]
        if not all(keys) or [int(k.group(2)) for k in keys] != list(range(len(keys))):
            continue
        name = keys[0].group(1) + keys[0].group(3)
        first = members[0]
        shape = ir.Shape([len(members), *first.shape])
        stacked = ir.Value(name=name, type=first.type, shape=shape)
        nbytes = len(members) * first.const_value.nbytes
        stacked.const_value = ir.ExternalTensor(PENDING, 0, nbytes, first.dtype, shape=shape, name=name)  # bound later
        g.register_initializer(stacked)
        node.outputs[0].replace_all_uses_with(stacked)
        g.remove([node, *ups], safe=True)
        for v in members:
            if not v.uses():
                g.initializers.pop(v.name)
        stacks[name] = [v.name for v in members]
    for v in list(g.initializers.values()):  # traced stacked (export/weights.py StackedExperts): rename, list members
        m = _STACKED.match(v.name or "")
        if not m:
            continue
        g.initializers.pop(v.name)
        name = f"{m.group(1)}experts.{m.group(2)}"
        n, nbytes = v.shape[0], v.const_value.nbytes
        v.name = name
        v.const_value = ir.ExternalTensor(PENDING, 0, nbytes, v.dtype, shape=ir.Shape(v.shape), name=name)  # bound later
        g.register_initializer(v)
        stacks[name] = [f"{m.group(1)}experts.{e}.{m.group(2)}" for e in range(n)]
    return stacks


def fold_constants(model: ir.Model) -> None:
    """Fold what the tracer left constant (shape arithmetic, Constant chains, the Hadamard matrix), drop dead
    nodes, merge duplicates, without reading any weight: the initializers are hidden from the folder while it
    runs (they hold meta tensors until bound). Folded values stay Constant nodes, never new initializers."""
    g = model.graph
    held = {name: v.const_value for name, v in g.initializers.items() if not _real(v.const_value)}
    for name in held:
        g.initializers[name].const_value = None
    try:
        for _ in range(2):
            if not onnxscript.optimizer.fold_constants(model).modified:
                break
            onnxscript.optimizer.remove_unused_nodes(model)
        ir.passes.common.CommonSubexpressionEliminationPass()(model)
        onnxscript.optimizer.remove_unused_nodes(model)
    finally:
        for name, v in g.initializers.items():
            if name in held:
                v.const_value = held[name]


def softplus_for_double(model: ir.Model) -> int:
    """ORT has no double Softplus kernel: rewrite Softplus(x) as torch computes it, Where(x > 20, x, Log(1 +
    Exp(x))) (F.softplus's threshold 20), in fp64 graphs only. Returns the number of nodes rewritten."""
    g, n = model.graph, 0
    for node in list(g):
        if node.op_type != "Softplus" or node.domain != "":
            continue
        x = node.inputs[0]
        one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(1.0))})
        thr = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(20.0))})
        ex = ir.node("Exp", [x])
        add = ir.node("Add", [one.outputs[0], ex.outputs[0]])
        log = ir.node("Log", [add.outputs[0]])
        gt = ir.node("Greater", [x, thr.outputs[0]])
        out = ir.node("Where", [gt.outputs[0], x, log.outputs[0]])
        g.insert_before(node, [one, thr, ex, add, log, gt, out])
        out.outputs[0].shape, out.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        node.outputs[0].replace_all_uses_with(out.outputs[0], replace_graph_outputs=True)
        g.remove(node, safe=True)
        n += 1
    return n


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)


def export_artifact(out: str | Path, *, checkpoint: str | Path | None = None, model: DeepseekV4 | None = None,
                    preset: str | None = None, seed: int = 0, target: str = "ort-cpu", weights: str | None = None,
                    experts: str | None = None, layers: int | None = None,
                    max_seq_len: int | None = None, quant_sim: bool | None = None, all_logits: bool = False,
                    mtp: bool = False,
                    quant_sims: dict[str, bool] | None = None, overwrite: bool = False,
                    transform: Transform | None = None, progress: bool | None = None, batch: int | None = None,
                    prefill_lengths: tuple[int, ...] | None = None,
                    space_check: bool | Callable[[int], None] = True) -> ExportResult:
    """Export an artifact directory `out` from exactly one of: a checkpoint directory, an in-memory model, or a
    preset (a synthetic checkpoint with `seed` is written to a temporary directory first).

    weights: "packed" (FP8/MXFP4 stay packed; dequantised in-graph) or "float32"/"float16"/"float64"
    (dequantised here; float64 for exactness tests). max_seq_len / quant_sim override the config, quant_sims each
    simulation ({"kv_quant_sim": False, ...}: ModelArgs' switches, docs/quant_sim.md). batch /
    prefill_lengths: the static shapes of a static target (ascend; export/static.py): one prefill graph per length. transform(model, graph, target), e.g.
    ``dsv4.passes.pipeline.run``, runs on each graph after the bodies are attached; its counts land in the
    manifest. Raises ValueError for bad arguments; nothing is left under `out` on failure.

    experts (ort-cpu and ort-cuda, packed): "packed" (default; the checkpoint's MXFP4 bytes) or "int8" (QMoE's
    blocks), see export/experts.py. layers: export the first N decoder layers (+ head and MTP) of a checkpoint or preset.
    all_logits: prefill graphs return the logits of every position (parity, scoring), else only of each row's last
    real token (default: a long prompt's logits are [B, 1, V], not [B, T, V]). mtp: also the MTP graph and the
    multi-token verify graph of speculative decoding (export/mtp.py). space_check: refuse, before writing any
    weight, an artifact the destination's filesystem has no room for (DiskSpaceError; docs/export.md); a callable
    gets the weights file's bytes on disk instead and may refuse them itself (export --ranks).
    """
    if sum(x is not None for x in (checkpoint, model, preset)) != 1:
        raise ValueError("export: give exactly one of checkpoint, model, preset")
    tgt = get_target(target)
    weights = weights or tgt.default_weights
    if weights not in tgt.weights:
        raise ValueError(f"--weights: {weights!r} is not one of {', '.join(tgt.weights)} for {tgt.name}")
    experts = expert_mode(tgt.name, weights, experts)
    if layers is not None and model is not None:
        raise ValueError("--layers: slices a checkpoint or a preset, not an in-memory model")
    transform = with_experts(transform, experts)
    overrides = {k: v for k, v in (("max_seq_len", max_seq_len), ("quant_sim", quant_sim)) if v is not None}
    overrides |= check_sims(quant_sims or {})
    if not tgt.compact_state:  # ascend: the simulated values stay floats in the state (docs/state_layout.md)
        overrides["compact_state"] = False
    if tgt.dynamic and (batch is not None or prefill_lengths is not None):
        raise ValueError(f"--batch / --prefill-lengths: {tgt.name} exports dynamic shapes; they apply to static "
                         "targets (ascend)")
    if tgt.trace_opset is not None and transform is None:
        raise ValueError(f"--no-passes: the {tgt.name} target needs its pass pipeline (every dsv4 op inlined, the "
                         f"rewrites of passes/{tgt.name}.py) before its graphs can be saved at opset {tgt.opset}")
    out = Path(out)
    check_destination(out, overwrite)
    seconds: dict[str, float] = {}
    with ExitStack() as stack, artifact.stage_printer(progress) as stage:
        t0 = time.perf_counter()
        with stage("source"):
            source_info: dict = {}
            if preset is not None:
                from dsv4.models.checkpoint_write import write_synthetic
                from dsv4.models.config import preset as get_preset

                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dsv4-synth-")))
                pargs = get_preset(preset, **overrides)
                overrides.setdefault("max_seq_len", pargs.max_seq_len)  # config.json does not carry it
                checkpoint = write_synthetic(pargs, tmp / preset, seed=seed, progress=False,
                                             space_check=bool(space_check))
                source_info = {"kind": "synthetic", "preset": preset, "seed": seed}
            if model is not None:
                src = ModuleSource(model)
                args = model.args.with_(**overrides)
                source_info = {"kind": "model"}
            else:
                src = CheckpointSource(checkpoint, layers=layers, **overrides)
                stack.callback(src.close)
                args = src.args
                source_info = source_info or {"kind": "checkpoint"}  # + its identity, not its path (package.py)
                if layers is not None:
                    source_info["layers"] = layers
        seconds["source"] = time.perf_counter() - t0
        with stage("skeleton"):
            skel = skeleton(args, src, weights)
            buffers = {n: b.clone() for n, b in skel.named_buffers()}  # real (RoPE tables); traced on meta
            skel.to("meta")
        shapes = static_shapes(tgt, args, batch, prefill_lengths)
        plan = [("prefill", n) for n in (shapes["prefill_lengths"] if shapes else [None])] + [("decode", None)]
        if mtp:
            check_mtp(args, tgt)
            plan += [("verify", None), ("mtp", None)]
        graphs: dict[str, ir.Model] = {}
        stacks: dict[str, list[str]] = {}
        counts: dict[str, dict] = {}
        traced: dict[str, ir.Model] = {}
        if not shapes:  # dynamic: one trace of the step serves both graphs (export/step.py)
            t = time.perf_counter()
            with stage("trace step"), no_cycle_gc():
                traced = split_step(trace_by_kind(skel, "step", tgt, all_logits=all_logits, hidden=mtp), args,
                                    skel.dtype, growable(args, tgt))
            seconds["trace step"] = time.perf_counter() - t
        for kind, length in plan:
            graph = graph_key(kind, length)
            t = time.perf_counter()
            if graph == "mtp":
                with stage("trace mtp"), no_cycle_gc():
                    traced[graph] = trace_mtp(skel, tgt)
                seconds["trace mtp"] = time.perf_counter() - t
            elif graph not in traced:
                with stage(f"trace {graph}"), no_cycle_gc():
                    traced[graph] = trace_by_kind(skel, kind, tgt, shapes and shapes["batch"], length,  # layers.py
                                                  all_logits=all_logits or graph == "verify", hidden=mtp)
                seconds[f"trace {graph}"] = time.perf_counter() - t
            m = traced.pop(graph)
            t = time.perf_counter()
            with stage(f"fold + functions {graph}"):
                stacks.update(stack_experts(m))
                fold_constants(m)
                custom_ops.attach_functions(m, "float64" if weights == "float64" else "float32")
                if weights == "float64":
                    softplus_for_double(m)
                if transform is not None:
                    counts[graph] = transform(m, graph, tgt)
                graphs[graph] = m
            seconds[f"fold {graph}"] = time.perf_counter() - t
        space = space_check if callable(space_check) else \
            (lambda need: check_space(out.parent, need, f"--out {out}")) if space_check else None
        with artifact.writing(out, overwrite) as tmp:
            t = time.perf_counter()
            with stage("weights") as status:
                written = bind_weights(graphs, src, buffers, stacks, tmp / WEIGHTS_FILE,
                                       bf16=tgt.bf16_initializers and weights == "packed" and transform is not None,  # not raw graphs
                                       report=reporter(status, progress), space=space)
            seconds["weights"] = time.perf_counter() - t
            t = time.perf_counter()
            with stage("save + check"):
                for graph, m in graphs.items():
                    capacity_default(m, args.max_seq_len)
                    path = tmp / f"{graph}.onnx"
                    onnx.save(finalize(ir.serde.serialize_model(m), tgt), path)
                    onnx.checker.check_model(str(path), full_check=True)
            seconds["save"] = time.perf_counter() - t
            seconds["total"] = time.perf_counter() - t0
            t = time.perf_counter()
            digest = written.pop("sha256")
            manifest = artifact.build_manifest(tmp, args, tgt, weights, graphs, source_info, counts, seconds,
                                               WEIGHTS_FILE, shapes, all_logits, checkpoint, mtp,
                                               hashed={WEIGHTS_FILE: digest})
            manifest["export_seconds"]["manifest (sha256)"] = round(time.perf_counter() - t, 2)
            manifest.update(experts=experts, weights_written={k: round(v, 2) for k, v in written.items()})
            artifact.write_manifest(tmp, manifest)
    return ExportResult(out, manifest, seconds)


def bind_weights(graphs: dict[str, ir.Model], source, buffers: dict[str, torch.Tensor],
                 stacks: dict[str, list[str]], path: Path, bf16: bool = False, report=None, space=None) -> dict:
    """Write every initializer of the graphs once into `path` and point both graphs at it (export/stream.py);
    `bf16`: BF16 checkpoint tensors stay BF16, cast in-graph; `space(need)` may refuse the size first. Returns
    the writer's statistics."""
    if bf16:
        keep_bf16(graphs, source)
    return write_weights(graphs, source, buffers, stacks, path, DERIVED, report, space)


def _real(t) -> bool:
    """Whether an initializer's value holds data (not a meta/fake placeholder nor a pending external one)."""
    if t is None or isinstance(t, ir.ExternalTensor):
        return False
    raw = getattr(t, "raw", None)
    return not (isinstance(raw, torch.Tensor) and (raw.is_meta or type(raw).__name__ == "FakeTensor"))


def _torch(dt: ir.DataType) -> torch.dtype:
    from .weights import _torch_dtype

    return _torch_dtype(dt)
