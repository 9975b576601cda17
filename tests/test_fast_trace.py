"""export/fast_trace.py: one torch trace gives the public exporter's graph, node for node."""

from __future__ import annotations

import hashlib

import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv4.export import fast_trace, layers, tracing
from dsv4.export.targets import get_target
from dsv4.export.weights import ModuleSource, skeleton
from dsv4.models import DeepseekV4, preset

pytestmark = pytest.mark.skipif(not fast_trace.SUPPORTED,
                                reason=f"fast_trace is written against torch {fast_trace.TORCH_VERSION}")


def _structure(m: ir.Model) -> list[tuple[str, str]]:
    """(output name, hash of everything that computes it): op, domain, attributes, every value's dtype and shape,
    the initializers by name and the layer scope that export/layers.py reads; value and node names left out."""
    memo: dict[int, str] = {}

    def h(v: ir.Value | None) -> str:
        if v is None:
            return "-"
        if id(v) not in memo:
            p = v.producer()
            if p is None:
                s = f"in {v.name} {v.dtype} {v.shape}"
            else:
                attrs = sorted((k, repr(a.value.numpy().tolist()) if a.type == ir.AttributeType.TENSOR else repr(a.value))
                               for k, a in p.attributes.items())
                s = (f"{p.domain}::{p.op_type} {attrs} {layers._layer(p)} ({' '.join(h(i) for i in p.inputs)}) "
                     f"#{p.outputs.index(v)} {v.dtype} {v.shape}")
            memo[id(v)] = hashlib.sha1(s.encode()).hexdigest()
        return memo[id(v)]

    return [(o.name, h(o)) for o in m.graph.outputs]


def _both_paths(monkeypatch, trace) -> tuple[ir.Model, ir.Model]:
    """trace() through onnx_trace twice: with torch.onnx.export unavailable (so fast_trace made it), and with
    fast_trace failing (so onnx_trace fell back to the public exporter)."""

    def unavailable(*a, **k):
        raise RuntimeError("this path is switched off here")

    with monkeypatch.context() as mp:
        mp.setattr(torch.onnx, "export", unavailable)
        fast = trace()
    with monkeypatch.context() as mp:
        mp.setattr(fast_trace, "export", unavailable)
        public = trace()
    return fast, public


def _assert_same_graph(fast: ir.Model, public: ir.Model) -> None:
    assert sum(1 for _ in fast.graph) == sum(1 for _ in public.graph)
    assert [(v.name, str(v.shape), v.dtype) for v in fast.graph.inputs] == \
        [(v.name, str(v.shape), v.dtype) for v in public.graph.inputs]
    assert sorted(fast.graph.initializers) == sorted(public.graph.initializers)
    assert _structure(fast) == _structure(public)


class _Toy(nn.Module):
    """A dsv4 op, an int64 x float product (type promotion inserts a Cast), ops the ONNX table decomposes, a state
    updated and one passed through, batch and length dynamic."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 128)
        self.register_buffer("w", torch.zeros(128, 128, dtype=torch.uint8))  # e4m3 bytes
        self.register_buffer("s", torch.full((1, 1), 127, dtype=torch.uint8))  # E8M0 scale 1

    def forward(self, ids, state, keep):
        x = torch.ops.dsv4.fp8_linear(self.embed(ids), self.w, self.s)  # [B,T,128]
        x = F.silu(x) * (ids.unsqueeze(-1) * 0.5)
        return torch.log_softmax(x.flatten(1), -1), state + x.amax(1), keep


def test_one_trace_gives_the_public_exporters_graph(monkeypatch):
    """A small module with the features the model's graphs use: both paths give the same graph, names included."""
    import dsv4.models.kernels  # noqa: F401  (registers torch.ops.dsv4)

    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=1, max=64)
    example = (torch.zeros(2, 7, dtype=torch.int64), torch.zeros(2, 128), torch.zeros(2, 3))
    dyn = ({0: batch, 1: length}, {0: batch}, {0: batch})
    names = ["input_ids", "past.x", "past.keep"], ["logits", "present.x", "present.keep"]
    fast, public = _both_paths(monkeypatch, lambda: tracing.onnx_trace(_Toy(), example, dyn, *names,
                                                                       get_target("ort-cpu")))
    _assert_same_graph(fast, public)
    assert "Cast" in [n.op_type for n in fast.graph] and fast.graph.inputs[0].shape == ir.Shape(["batch", "length"])


@pytest.mark.slow  # two traces of a CSA layer (~30 s on 2 cores)
def test_one_trace_gives_the_public_exporters_step_graph(monkeypatch):
    """The step graph of a one-layer CSA model (compressor, indexer, packed weights, the state): the exporter's
    path through fast_trace and the public torch.onnx.export agree on every node and output."""
    args = preset("tiny", n_layers=1, n_hash_layers=1, compress_ratios=(4, 0))
    model = skeleton(args, ModuleSource(DeepseekV4(args)), "packed").to("meta")  # as export_artifact traces it
    _assert_same_graph(*_both_paths(monkeypatch, lambda: tracing.trace(model, "step", get_target("ort-cpu"))))
