"""I/O names and symbolic dims of the two graphs (DESIGN.md "Decode state").

prefill: ``input_ids`` [batch, length]                    -> ``logits`` [batch, 1, vocab] + ``present.*``
         (the last position's logits; [batch, length, vocab] in an artifact exported with ``--all-logits``,
         manifest ``"logits": "all"``)
decode:  ``input_ids`` [batch, 1] + ``past.{name}`` (state) -> ``logits`` [batch, 1, vocab]      + ``present.*``

Static-shape targets (ascend) export one prefill graph per bucket length, keyed ``prefill.{T}`` in the manifest
(file ``prefill.{T}.onnx``), with every dim a number and one more input, ``lengths`` [batch] int64: the real tokens
of each row, the rest being right padding up to T (models/model.py ``step``).

``{name}`` runs over models/state.py's ``state_entries`` in order (``pos``, then ``{layer}.{kind}``); the
decode graph's ``present.{name}`` feeds the next step's ``past.{name}``.

Growable state (dynamic ONNX Runtime targets, docs/capacity.md): the per-token caches of a ratio-m layer have
``rows{m}`` rows, a symbol, and the prefill graph takes ``capacity`` (int64 scalar, default the export's
max_seq_len as an overridable initializer): its fresh state has ``capacity // m`` rows per cache, so a runtime may
start a sequence small and grow the state (models/state.py ``resize``) without changing results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dsv4.models.config import ModelArgs
from dsv4.models.state import state_entries

INPUT_IDS = "input_ids"
LENGTHS = "lengths"
LOGITS = "logits"
CAPACITY = "capacity"  # prefill input of growable artifacts: positions the fresh state holds
HIDDEN = "hidden"  # the final streams [batch, length, hc, dim] the MTP graph reads (artifacts exported with --mtp)
BATCH, LENGTH = "batch", "length"
GRAPHS = ("prefill", "decode")  # every artifact's two graphs
MTP_GRAPHS = ("verify", "mtp")  # an artifact exported with --mtp also has these (export/mtp.py)
_ONNX_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
               torch.int64: "int64", torch.uint8: "uint8"}  # uint8: the compact state's codes (models/kvstore.py)


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


def rows_dim(ratio: int) -> str:
    """The symbolic row count of a ratio-m per-token cache in a growable artifact."""
    return f"rows{ratio}"


def growable(args: ModelArgs, target) -> bool:
    """Does an artifact of `target` get the growable state: a dynamic ONNX Runtime target, every per-token cache
    with at least 2 rows at max_seq_len (a 1-row cache cannot be traced with a symbolic row count)."""
    ratios = {entry_ratio(args, e.name) for e in state_entries(args) if e.per_token}
    return bool(target.growable_state and target.dynamic and all(args.max_seq_len // m >= 2 for m in ratios))


def entry_ratio(args: ModelArgs, name: str) -> int:
    """The compression ratio of the layer a state entry belongs to (``{layer}.*`` or ``mtp{j}.*``)."""
    layer = name.split(".", 1)[0]
    return args.ratio(args.n_layers + int(layer[3:]) if layer.startswith("mtp") else int(layer))


def _dims(args: ModelArgs, e, B, growable: bool) -> tuple:
    return (B, rows_dim(entry_ratio(args, e.name)), *e.shape[1:]) if growable and e.per_token else (B, *e.shape)


def graph_key(kind: str, length: int | None = None) -> str:
    """Manifest key of a graph: "decode", "prefill", or "prefill.{length}" for a static prefill bucket."""
    return kind if kind == "decode" or length is None else f"{kind}.{length}"


def graph_kind(key: str) -> str:
    """The kind of a manifest graph key: "prefill", "decode", "verify" or "mtp"."""
    kind = key.split(".", 1)[0]
    if kind not in GRAPHS + MTP_GRAPHS:
        raise ValueError(f"graph: expected one of {GRAPHS + MTP_GRAPHS} (or prefill.N), got {key!r}")
    return kind


def bucket_of(key: str) -> int | None:
    """The static prefill length of a ``prefill.{T}`` key, else None."""
    return int(key.split(".", 1)[1]) if key.startswith("prefill.") else None


def signature(args: ModelArgs, dtype: torch.dtype, graph: str, batch: int | None = None, all_logits: bool = True,
              hidden: bool = False, growable: bool = False) -> tuple[list[IOSpec], list[IOSpec]]:
    """(inputs, outputs) of `graph` ("prefill", "decode" or a static "prefill.{T}"; with --mtp also "verify" and
    "mtp", export/mtp.py); `batch`: static batch; all_logits: the prefill logits of every position (artifacts
    before the last-position default: no key); hidden: prefill/decode also output the final streams; growable: the
    per-token caches have ``rows{m}`` rows and prefill takes ``capacity`` (the mtp graph's own state stays fixed)."""
    kind, bucket = graph_kind(graph), bucket_of(graph)
    length = 1 if kind == "decode" else (LENGTH if bucket is None else bucket)
    B = BATCH if batch is None else batch
    fdt = "float64" if dtype == torch.float64 else "float32"
    streams = IOSpec(HIDDEN, _ONNX_DTYPE[dtype], (B, length, args.hc_mult, args.dim))
    grow = growable and kind != "mtp" and batch is None
    state = [IOSpec(e.name, _ONNX_DTYPE[e.dtype], _dims(args, e, B, grow)) for e in state_entries(args, dtype, kind == "mtp")]
    inputs = [streams] if kind == "mtp" else []
    inputs.append(IOSpec(INPUT_IDS, "int64", (B, length)))
    if bucket is not None:
        inputs.append(IOSpec(LENGTHS, "int64", (B,)))
    if grow and kind == "prefill":
        inputs.append(IOSpec(CAPACITY, "int64", ()))
    if kind != "prefill":
        inputs += [IOSpec(past(s.name), s.dtype, s.dims) for s in state]
    n_logits = length if (kind == "verify" or (kind == "prefill" and all_logits)) else 1
    outputs = [IOSpec(LOGITS, fdt, (B, n_logits, args.vocab_size))]
    outputs += [IOSpec(present(s.name), s.dtype, s.dims) for s in state]
    if kind == "verify" or (hidden and kind in ("prefill", "decode")):
        outputs.append(streams)
    return inputs, outputs


def state_layout(args: ModelArgs, dtype: torch.dtype, batch: int | None = None, mtp: bool = False,
                 growable: bool = False) -> list[dict]:
    """The manifest's state table: which past.* feeds which present.*, shapes, dtypes, fills, per-token growth
    (`mtp`: the MTP graph's own state, manifest ``mtp_state``); a per-token cache also says its layer's ``ratio``
    (growable: its rows are ``rows{ratio}``, capacity // ratio of the capacity a runtime allocates)."""
    grow = growable and not mtp and batch is None
    return [{"name": e.name, "past": past(e.name), "present": present(e.name), "dtype": _ONNX_DTYPE[e.dtype],
             "shape": list(_dims(args, e, BATCH if batch is None else batch, grow)),
             "fill": e.fill if e.fill == e.fill and abs(e.fill) != float("inf") else str(e.fill),
             "per_token": e.per_token, **({"ratio": entry_ratio(args, e.name)} if e.per_token else {})}
            for e in state_entries(args, dtype, mtp)]
