"""Decode state: explicit, fixed-capacity, functional (DESIGN.md "Decode state", SPEC §5.1).

A state is a flat ``dict[str, Tensor]``; every forward returns a new one and never writes into its input.
Keys are ``pos`` (int64 [B], the next absolute position of each sequence) and ``{layer}.{kind}``:

| kind         | layers      | shape                         | contents                                          |
|--------------|-------------|-------------------------------|---------------------------------------------------|
| window       | all         | [B, window, head_dim]         | ring of raw KV rows, slot = position % window     |
| kv           | ratio > 0   | [B, max_seq_len // m, head_dim] | compressed KV entries, slot = block index         |
| comp_kv      | ratio > 0   | [B, c*m, c*head_dim] fp32     | compressor partial state (c = 2 when m = 4)       |
| comp_score   | ratio > 0   | [B, c*m, c*head_dim] fp32     | gate scores incl. ape; -inf where empty           |
| index        | ratio 4     | [B, max_seq_len // 4, index_head_dim] | indexer keys                              |
| index_kv / index_score | ratio 4 | [B, 8, 2*index_head_dim] fp32 | the indexer compressor's partial state      |

With overlap (m = 4) rows 0..m-1 hold the previous complete block and rows m..2m-1 the current one.
The MTP block has its own state with the key prefix ``mtp{j}``.

Where the kv / index simulations are on (and ``compact_state`` is not False) window, kv and index are held in
the paper's layout instead, as the parts of models/kvstore.py: ``window_fp8`` / ``window_scale`` /
``window_rope`` (and the same for ``kv``) and ``index_fp4`` / ``index_scale``; ``float_view`` gives the float
values of either layout under the plain names (docs/state_layout.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kvstore
from .config import ModelArgs


@dataclass(frozen=True)
class StateEntry:
    name: str
    shape: tuple[int, ...]  # without the batch dim
    dtype: torch.dtype
    fill: float
    per_token: bool  # grows with the sequence (compressed caches) vs fixed (ring, partial states)


def layer_entries(args: ModelArgs, layer: int, prefix: str, dtype: torch.dtype) -> list[StateEntry]:
    r = args.ratio(layer)
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # compressor partial states
    kv, index = kvstore.kv_layout(args, dtype), kvstore.index_layout(args, dtype)

    def rows(kind: str, n: int, layout, per_token: bool) -> list[StateEntry]:
        return [StateEntry(f"{prefix}.{kvstore.entry_name(kind, p)}", (n, w), dt, 0.0, per_token)
                for p, w, dt in layout]

    out = rows("window", args.window_size, kv, False)
    if r > 0:
        c = 2 if r == 4 else 1
        out += rows("kv", args.max_seq_len // r, kv, True) + [
            StateEntry(f"{prefix}.comp_kv", (c * r, c * args.head_dim), acc, 0.0, False),
            StateEntry(f"{prefix}.comp_score", (c * r, c * args.head_dim), acc, float("-inf"), False),
        ]
    if r == 4:
        out += rows("index", args.max_seq_len // r, index, True) + [
            StateEntry(f"{prefix}.index_kv", (2 * r, 2 * args.index_head_dim), acc, 0.0, False),
            StateEntry(f"{prefix}.index_score", (2 * r, 2 * args.index_head_dim), acc, float("-inf"), False),
        ]
    return out


def state_entries(args: ModelArgs, dtype: torch.dtype = torch.float32, mtp: bool = False) -> list[StateEntry]:
    """The state layout of the main model (or of the MTP blocks), in a fixed order."""
    pos = StateEntry("pos", (), torch.int64, 0.0, False)
    if mtp:
        return [pos] + [e for j in range(args.n_mtp_layers)
                        for e in layer_entries(args, args.n_layers + j, f"mtp{j}", dtype)]
    return [pos] + [e for i in range(args.n_layers) for e in layer_entries(args, i, str(i), dtype)]


def init_state(args: ModelArgs, batch: int, dtype: torch.dtype = torch.float32, device=None,
               mtp: bool = False) -> dict[str, torch.Tensor]:
    """A fresh state at position 0 for `batch` sequences."""
    return {e.name: torch.full((batch, *e.shape), e.fill, dtype=e.dtype, device=device)
            for e in state_entries(args, dtype, mtp)}


def layer_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of one layer, keyed by kind (``window``, ``kv``, ...)."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def bytes_per_token(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Amortised state bytes per token for each layer kind, plus the fixed bytes per sequence."""
    out: dict[str, float] = {}
    fixed = 0
    for i in range(args.n_layers):
        kind = {0: "window", 4: "csa", 128: "hca"}[args.ratio(i)]
        per = 0.0
        for e in layer_entries(args, i, str(i), dtype):
            n = 1
            for s in e.shape:
                n *= s
            b = n * e.dtype.itemsize
            if e.per_token:
                per += b / args.max_seq_len
            else:
                fixed += b
        out[kind] = out.get(kind, 0.0) + per
    out["total_per_token"] = sum(v for k, v in out.items())
    out["fixed_per_sequence"] = float(fixed)
    return out


def compact_bytes_per_token(args: ModelArgs) -> float:
    """Amortised bytes/token of the paper's storage layout (SPEC §5.2): FP8 e4m3 KV nope dims + BF16 rope dims +
    E8M0 scales per 64 (padded to 8 bytes as vLLM does) and MXFP4 indexer keys (+ one E8M0 scale per 32)."""
    nope = args.nope_head_dim
    kv_entry = nope + 2 * args.rope_head_dim + max(8, -(-nope // 64))
    index_entry = args.index_head_dim // 2 + args.index_head_dim // 32
    total = 0.0
    for i in range(args.n_layers):
        r = args.ratio(i)
        if r == 4:
            total += (kv_entry + index_entry) / 4
        elif r == 128:
            total += kv_entry / 128
    return total


def float_view(state: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` with every compact cache decoded to its float values under the plain name (``{layer}.window``,
    ``.kv``, ``.index``; the simulated values, bit for bit); plain entries pass through. Parity and tests compare
    states of either layout through this view (the layout is read from the entries present; `args` gives dims)."""
    out = dict(state)
    stores = {"window": kvstore.Fp8Rows(args.nope_head_dim, args.rope_head_dim),
              "kv": kvstore.Fp8Rows(args.nope_head_dim, args.rope_head_dim),
              "index": kvstore.Mxfp4Keys(args.index_head_dim)}
    for kind, store in stores.items():
        first = f".{kind}_{store.parts[0]}"
        for name in [k for k in state if k.endswith(first)]:
            prefix = name[: -len(first)]
            parts = kvstore.read({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")},
                                 kind, store.to(next(iter(state.values())).device))
            for p in store.parts:
                out.pop(f"{prefix}.{kvstore.entry_name(kind, p)}")
            out[f"{prefix}.{kind}"] = store.decode(parts, dtype)
    return out


def as_layout(state: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` (either layout) in the layout `args` gives, e.g. an eager model's compact state for an artifact that
    keeps floats (ascend) or the other way round. Lossless both ways: the float values are on the codes' grids."""
    want = state_entries(args, dtype)
    if all(e.name in state for e in want) and len(want) == len(state):
        return state
    fv = float_view(state, args, dtype)
    stores = {"index": kvstore.index_store(args), "window": kvstore.kv_store(args), "kv": kvstore.kv_store(args)}
    out, encoded = {}, {}
    for e in want:
        if e.name in fv:
            out[e.name] = fv[e.name]
            continue
        prefix, kind = e.name.split(".", 1)
        base, part = kind.split("_", 1)
        key = f"{prefix}.{base}"
        if key not in encoded:
            encoded[key] = stores[base].to(fv[key].device).encode(fv[key], dtype)[0]
        out[e.name] = encoded[key][part]
    return out


def capacity(state: dict[str, torch.Tensor], args: ModelArgs) -> int:
    """Positions `state` can hold (sequence length, the smallest over its compressed caches): a cache of R rows
    of a ratio-m layer takes the entries of positions < R*m; entry R completes only at position (R+1)*m - 1, so
    (R+1)*m - 1 positions fit. max_seq_len bounds it too; a model without compressed layers has only that."""
    kinds = {"kv", "index"} | {f"kv_{p}" for p in kvstore.Fp8Rows.parts} | \
        {f"index_{p}" for p in kvstore.Mxfp4Keys.parts}
    caps = [(int(v.shape[1]) + 1) * args.ratio(int(k.split(".")[0])) - 1 for k, v in state.items()
            if k[0].isdigit() and k.split(".", 1)[1] in kinds]
    return min([args.max_seq_len, *caps])


def resize(state: dict[str, torch.Tensor], args: ModelArgs, new_capacity: int) -> dict[str, torch.Tensor]:
    """`state` with room for `new_capacity` positions: every compressed cache grown with its fill (or cut) to
    new_capacity // ratio rows; the rest unchanged. Results do not change: an entry row is read only once its
    block is complete (j < (pos+1) // m) and written only at its own slot, so rows past the position are never
    seen (tests/test_state_compact.py). A state may start small and grow as its sequences do."""
    if not 0 < new_capacity <= args.max_seq_len:
        raise ValueError(f"resize: capacity {new_capacity} is not in (0, max_seq_len={args.max_seq_len}]")
    held = int(state["pos"].max()) if state["pos"].numel() else 0
    if new_capacity < held:
        raise ValueError(f"resize: capacity {new_capacity} < position {held} held by the state")
    fills = {e.name: e.fill for e in state_entries(args) if e.per_token}
    dims = {e.name: e.name.split(".")[0] for e in state_entries(args) if e.per_token}
    out = dict(state)
    for name, fill in fills.items():
        if name not in state:
            continue
        v, rows = state[name], new_capacity // args.ratio(int(dims[name]))
        if rows <= v.shape[1]:
            out[name] = v[:, :rows]
        else:
            pad = torch.full((v.shape[0], rows - v.shape[1], *v.shape[2:]), fill, dtype=v.dtype, device=v.device)
            out[name] = torch.cat([v, pad], 1)
    return out
