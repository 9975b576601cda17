"""I/O names and symbolic dims of the two graphs (DESIGN.md "Decode state").

prefill: ``input_ids`` [batch, length]                    -> ``logits`` [batch, length, vocab] + ``present.*``
decode:  ``input_ids`` [batch, 1] + ``past.{name}`` (state) -> ``logits`` [batch, 1, vocab]      + ``present.*``

``{name}`` runs over models/state.py's ``state_entries`` in order (``pos``, then ``{layer}.{kind}``); the
decode graph's ``present.{name}`` feeds the next step's ``past.{name}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dsv4.models.config import ModelArgs
from dsv4.models.state import state_entries

INPUT_IDS = "input_ids"
LOGITS = "logits"
BATCH, LENGTH = "batch", "length"
GRAPHS = ("prefill", "decode")
_ONNX_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
               torch.int64: "int64"}


def past(name: str) -> str:
    return f"past.{name}"


def present(name: str) -> str:
    return f"present.{name}"


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str  # numpy-style name
    dims: tuple[str | int, ...]

    def to_json(self) -> dict:
        return asdict(self) | {"dims": list(self.dims)}


def signature(args: ModelArgs, dtype: torch.dtype, graph: str) -> tuple[list[IOSpec], list[IOSpec]]:
    """(inputs, outputs) of `graph` ("prefill" or "decode")."""
    if graph not in GRAPHS:
        raise ValueError(f"graph: expected one of {GRAPHS}, got {graph!r}")
    length = LENGTH if graph == "prefill" else 1
    state = [IOSpec(e.name, _ONNX_DTYPE[e.dtype], (BATCH, *e.shape)) for e in state_entries(args, dtype)]
    inputs = [IOSpec(INPUT_IDS, "int64", (BATCH, length))]
    if graph == "decode":
        inputs += [IOSpec(past(s.name), s.dtype, s.dims) for s in state]
    outputs = [IOSpec(LOGITS, "float64" if dtype == torch.float64 else "float32", (BATCH, length, args.vocab_size))]
    outputs += [IOSpec(present(s.name), s.dtype, s.dims) for s in state]
    return inputs, outputs


def state_layout(args: ModelArgs, dtype: torch.dtype) -> list[dict]:
    """The manifest's state table: which past.* feeds which present.*, shapes, dtypes, fills, per-token growth."""
    return [{"name": e.name, "past": past(e.name), "present": present(e.name), "dtype": _ONNX_DTYPE[e.dtype],
             "shape": [BATCH, *e.shape], "fill": e.fill if e.fill == e.fill and abs(e.fill) != float("inf")
             else str(e.fill), "per_token": e.per_token} for e in state_entries(args, dtype)]
