"""Weights a pass derives from other weights (re-layouts, re-encodings): no graph op, no run-time copy.

A derived initializer carries ``Derived(sources, fn)`` in ``Value.meta[export.DERIVED]``. While exporting,
``export.bind_weights`` calls it with a reader of the source tensors (expert by expert for stacked weights) and
streams the parts into the one weights file; the sources, now unused by the graph, are not written. On a model
that already holds its weights (loaded from an artifact) the same spec evaluates lazily (``ir.LazyTensor``) when
the model is saved or run. Rules read names, types and shapes only, never the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from dsv4.export.export import DERIVED

Members = Callable[[str, ir.DataType, tuple[int, ...]], Iterator[torch.Tensor]]  # name -> its experts (or itself)


@dataclass(frozen=True)
class Derived:
    """fn maps one expert's source slices (or the whole sources, stacked=False) to its part of the weight."""

    sources: tuple[tuple[str, ir.DataType, tuple[int, ...]], ...]
    fn: Callable[..., torch.Tensor]
    stacked: bool

    def __call__(self, members: Members) -> Iterator[torch.Tensor]:
        for parts in zip(*(members(n, dt, shape) for n, dt, shape in self.sources)):
            yield self.fn(*parts).contiguous()


def _from_values(values: list[ir.Value], stacked: bool) -> Members:
    """Reader from bound initializers (a model loaded from an artifact)."""
    by_name = {v.name: v for v in values}

    def members(name, dtype, shape):
        arr = by_name[name].const_value.numpy()
        if arr.dtype.itemsize == 1 and arr.dtype != np.uint8:
            arr = arr.view(np.uint8)
        if not stacked:
            return iter([torch.from_numpy(np.array(arr))])
        return (torch.from_numpy(np.array(arr[e])) for e in range(arr.shape[0]))

    return members


def derived_initializer(op, name: str, dtype: ir.DataType, shape: tuple[int, ...], sources: list[ir.Value],
                        fn: Callable[..., torch.Tensor], stacked: bool = True) -> ir.Value:
    """A new initializer `name` = fn over `sources` (stacked: per expert, parts back to back along axis 0)."""
    spec = Derived(tuple((v.name, v.dtype, tuple(int(d) for d in v.shape)) for v in sources), fn, stacked)

    def evaluate():  # only when the sources hold data; while exporting bind_weights writes it instead
        parts = list(spec(_from_values(sources, stacked)))
        arr = (torch.stack(parts) if stacked else parts[0]).numpy()
        if dtype == ir.DataType.FLOAT8E4M3FN:
            arr = arr.view(ml_dtypes.float8_e4m3fn)
        return ir.tensor(arr, name=name)

    value = op.initializer(ir.LazyTensor(evaluate, dtype, ir.Shape(shape), name=name), name=name)
    value.meta[DERIVED] = spec
    return value


def single_use(v: ir.Value) -> bool:
    """Whether v feeds exactly one node input: a derived copy then replaces it instead of duplicating it."""
    return len(v.uses()) == 1 and not v.is_graph_output()
