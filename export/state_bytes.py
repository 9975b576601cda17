"""Decode-state bytes of an artifact, from its manifest's state table (docs/state_layout.md).

* ``per_token``: the bytes the state grows by per token, amortised: a compressed entry of a ratio-m layer is
  written once every m tokens, so it counts its row's bytes / m (the ring and the compressor partial states are
  fixed);
* ``fixed_per_sequence``: the bytes that do not grow (window rings, compressor partial states, ``pos``);
* ``per_sequence``: what one sequence's state takes as allocated, at the artifact's ``max_seq_len``;
* ``per_layer_kind``: per_token and fixed bytes of ONE layer of each kind present (window / csa / hca);
* ``release``: where the state's dims are the released ones (head_dim 512, rope 64, indexer 128, window 128:
  the same in Flash and Pro), per_token and fixed bytes of the whole Flash and Pro models, each layer kind's
  figure times its count in the release's layer schedule; a kind the artifact lacks is named in ``missing``.
  A 2-layer slice with one CSA and one HCA layer therefore gives the full models' figures.
"""

from __future__ import annotations

import re

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "uint8": 1}
KINDS = {0: "window", 4: "csa", 128: "hca"}
RELEASE_DIMS = {"head_dim": 512, "rope_head_dim": 64, "index_head_dim": 128, "window_size": 128}


def entry_bytes(e: dict) -> int:
    """Bytes of one state entry for one sequence (the batch dim left out)."""
    if e["dtype"] not in ITEMSIZE:
        raise ValueError(f"state entry {e['name']!r}: unknown dtype {e['dtype']!r}")
    n = ITEMSIZE[e["dtype"]]
    for d in e["shape"][1:]:
        n *= int(d)
    return n


def at_capacity(e: dict, max_seq_len: int) -> dict:
    """A state table entry with a growable artifact's ``rows{m}`` dim (export/signature.py) at max_seq_len rows."""
    shape = [max_seq_len // int(d[4:]) if isinstance(d, str) and re.fullmatch(r"rows\d+", d) else d
             for d in e["shape"]]
    return e | {"shape": shape}


def state_bytes(config: dict, state: list[dict]) -> dict:
    """The figures above for a manifest's ``config`` and ``state`` table."""
    ratios = config["compress_ratios"]
    state = [at_capacity(e, config["max_seq_len"]) for e in state]
    kinds: dict[str, dict] = {}
    per_token = fixed = allocated = 0.0
    for e in state:
        b = entry_bytes(e)
        allocated += b
        m = re.match(r"(\d+)\.", e["name"])
        layer = int(m.group(1)) if m else None
        if layer is not None:
            k = kinds.setdefault(KINDS[ratios[layer]], {"layers": set(), "per_token": 0.0, "fixed": 0.0})
            k["layers"].add(layer)
        if e.get("per_token"):
            if layer is None or ratios[layer] == 0:
                raise ValueError(f"state entry {e['name']!r} grows per token but is not in a compressed layer")
            t = b / e["shape"][1] / ratios[layer]  # one row every ratio tokens
            per_token += t
            k["per_token"] += t
        else:
            fixed += b
            if layer is not None:
                k["fixed"] += b
    per_kind = {name: {"layers": len(k["layers"]), "per_token": k["per_token"] / len(k["layers"]),
                       "fixed": k["fixed"] / len(k["layers"])} for name, k in sorted(kinds.items())}
    out = {"per_token": per_token, "fixed_per_sequence": fixed, "per_sequence": allocated,
           "max_seq_len": config["max_seq_len"], "per_layer_kind": per_kind}
    if all(config.get(k) == v for k, v in RELEASE_DIMS.items()):
        known = dict(per_kind)
        ring = [e for e in state if re.match(r"\d+\.window", e["name"])]
        if "window" not in known and ring:  # a window-only layer holds just the ring that every layer holds
            first = ring[0]["name"].split(".")[0] + "."
            known["window"] = {"layers": 0, "per_token": 0.0,
                               "fixed": float(sum(entry_bytes(e) for e in ring if e["name"].startswith(first)))}
        out["release"] = {name: release_figure(name, known) for name in ("flash", "pro")}
    return out


def release_figure(name: str, per_kind: dict) -> dict:
    """per_token / fixed bytes of the released model `name` from one layer of each kind (per_kind)."""
    from dsv4.models.config import PRESETS

    p = PRESETS[name]
    main = p["compress_ratios"][: p["n_layers"]]
    counts = {KINDS[r]: sum(1 for x in main if x == r) for r in sorted(set(main))}
    missing = sorted(k for k, c in counts.items() if c and k not in per_kind)
    out = {"layers": counts, "missing": missing}
    if not missing:
        out["per_token"] = sum(c * per_kind[k]["per_token"] for k, c in counts.items())
        out["fixed_per_sequence"] = sum(c * per_kind[k]["fixed"] for k, c in counts.items())
    return out
