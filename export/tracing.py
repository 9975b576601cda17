"""Tracing: the torch wrappers of the graphs (prefill, decode, the step and verify of export/step.py and
export/mtp.py) and ``torch.onnx.export`` with the dsv4 translation table. export.py drives it per graph;
layers.py traces each layer kind once through ``trace``."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings

import onnx_ir as ir
import torch
from torch import nn

from dsv4.models.model import DeepseekV4
from dsv4.models.state import init_state, state_entries

from . import custom_ops, fast_trace
from .signature import BATCH, HIDDEN, INPUT_IDS, LENGTH, LENGTHS, LOGITS, entry_ratio, growable, past, present, rows_dim
from .targets import Target


class _Prefill(nn.Module):
    """input_ids [B,T] from position 0 -> (logits, *state): the fresh state is built inside the graph."""

    def __init__(self, model: DeepseekV4, last_only: bool = False, hidden: bool = False):
        super().__init__()
        self.model, self.last_only, self.hidden = model, last_only, hidden
        self.names = [e.name for e in state_entries(model.args, model.dtype)]

    def out(self, logits, new, X):
        """(logits, *present state[, the final streams "hidden" that the MTP graph reads])."""
        return (logits, *[new[n] for n in self.names], *([X] if self.hidden else []))

    def forward(self, input_ids):
        state = init_state(self.model.args, input_ids.shape[0], self.model.dtype, input_ids.device)
        return self.out(*self.model.step(input_ids, state, last_only=self.last_only))


class _Decode(_Prefill):
    """input_ids [B,1] + past state -> (logits, *present state)."""

    def forward(self, input_ids, *past_state):
        return self.out(*self.model.step(input_ids, dict(zip(self.names, past_state)), last_only=self.last_only))


@contextlib.contextmanager
def _quiet():
    """The exporter's progress prints and its warnings about unrelated packages (torchvision) off."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def no_cycle_gc():
    """Python's cyclic garbage collector paused while a trace and its graph copies run, one collection after.
    Tracing and cloning create ~10^5-10^6 objects; each automatic collection rescans the growing heap. Measured
    (benchmarks/trace_depth.py, CPU including the final collection, docs/PERF.md): Pro 61 layers 33.1 -> 27.4 s,
    Pro 8 layers 25.2 -> 23.2 s, Flash 2 layers 5.7 -> 5.2 s; peak RSS of the Pro 61 trace +0.06 GB (the cycles
    wait for the end)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


class _PaddedPrefill(_Prefill):
    """input_ids [B,T] right-padded + lengths [B] -> (logits, *state): static-shape prefill buckets."""

    def forward(self, input_ids, lengths):
        state = init_state(self.model.args, input_ids.shape[0], self.model.dtype, input_ids.device)
        return self.out(*self.model.step(input_ids, state, lengths, last_only=self.last_only))


def trace(model: DeepseekV4, graph: str, target: Target, batch: int | None = None, length: int | None = None,
          all_logits: bool = False, hidden: bool = False) -> ir.Model:
    """One graph of a meta-device model as an ir.Model with bare dsv4 nodes (initializers hold meta tensors).
    batch / length (static targets): every dim fixed, the prefill graph takes ``lengths`` (right padding).
    all_logits: the logits of every position (else the last real one's: ``DeepseekV4.step(last_only=True)``).
    hidden: one more output, the final streams [B,T,hc,D] (``hidden``: the MTP graph's input, export/mtp.py);
    graph "verify" is the step with every position's logits and the hidden output (speculative decoding)."""
    args, names = model.args, [e.name for e in state_entries(model.args, model.dtype)]
    static = batch is not None
    b = batch if static else 2
    dyn_batch = torch.export.Dim(BATCH, min=1, max=4096)
    if graph == "prefill":
        n = length if static else 7
        ids = torch.zeros(b, n, dtype=torch.int64, device="meta")
        if static:
            wrapper = _PaddedPrefill(model, not all_logits, hidden)
            example, dyn = (ids, torch.ones(b, dtype=torch.int64, device="meta")), None
            inputs = [INPUT_IDS, LENGTHS]
        else:
            wrapper, example = _Prefill(model, not all_logits, hidden), (ids,)
            dyn = ({0: dyn_batch, 1: torch.export.Dim(LENGTH, min=1, max=args.max_seq_len)},)
            inputs = [INPUT_IDS]
    else:  # "decode" (one token), or "step" (dynamic targets: T tokens after the past, export/step.py)
        wrapper = _Decode(model, not all_logits, hidden)
        state = init_state(args, b, model.dtype, "meta")
        n = 7 if graph in ("step", "verify") else 1  # torch.export specialises an example size of 1: trace at 7
        example = (torch.zeros(b, n, dtype=torch.int64, device="meta"), *[state[k] for k in names])
        ids_dims = {0: dyn_batch} | ({1: torch.export.Dim(LENGTH, min=1, max=args.max_seq_len)} if n > 1 else {})
        rows = _rows_dims(args, model.dtype) if growable(args, target) and not static else {}
        dyn = None if static else (ids_dims, tuple({0: dyn_batch} | rows.get(k, {}) for k in names))  # (ids, *past)
        inputs = [INPUT_IDS] + [past(k) for k in names]
    outputs = [LOGITS] + [present(k) for k in names] + ([HIDDEN] if hidden else [])
    m = onnx_trace(wrapper, example, dyn, inputs, outputs, target)
    m.graph.name = f"dsv4_{graph}" if not static or graph == "decode" else f"dsv4_prefill_{length}"
    return m


def _rows_dims(args, dtype) -> dict[str, dict]:
    """{past entry: {1: Dim}} for the per-token caches: their rows symbolic, one Dim per compression ratio
    (``rows{m}``), so a runtime may allocate the state for fewer positions and grow it (docs/capacity.md)."""
    dims: dict[int, object] = {}
    for e in state_entries(args, dtype):
        if e.per_token:
            m = entry_ratio(args, e.name)
            dims.setdefault(m, torch.export.Dim(rows_dim(m), min=2, max=args.max_seq_len // m))
    return {e.name: {1: dims[entry_ratio(args, e.name)]} for e in state_entries(args, dtype) if e.per_token}


def onnx_trace(wrapper: nn.Module, example: tuple, dyn, inputs: list[str], outputs: list[str], target: Target
               ) -> ir.Model:
    """torch.onnx.export (dynamo, no optimisation, the dsv4 translation table) of `wrapper`, initializers under
    their official names, module scopes kept and stack traces dropped. On the pinned torch, fast_trace.py gives the
    same graph from one torch trace instead of two; should it fail, the public exporter runs (and reports)."""
    table = custom_ops.translation_table()
    with _quiet():
        try:
            m = fast_trace.export(wrapper.eval(), example, dyn, inputs, outputs, target.graph_opset, table)
        except Exception:  # noqa: BLE001  (torch not the pinned one, or a case its one trace does not handle)
            m = torch.onnx.export(
                wrapper.eval(), example, dynamo=True, optimize=False, opset_version=target.graph_opset,
                custom_translation_table=table, dynamic_shapes=dyn, input_names=inputs, output_names=outputs,
                verbose=False).model
    for v in list(m.graph.initializers.values()):  # "model.layers.0..." -> the official "layers.0..."
        if v.name.startswith("model."):
            m.graph.initializers.pop(v.name)
            v.name = v.name[len("model."):]
            m.graph.register_initializer(v)
    for node in ir.traversal.RecursiveGraphIterator(m.graph):  # keep the module scopes, drop the big stack traces
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    m.producer_name, m.producer_version = "dsv4", _version()
    return m


def _version() -> str:
    import dsv4

    return dsv4.__version__
