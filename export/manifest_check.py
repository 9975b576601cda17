"""The manifest's schema, checked against the graphs it describes before anything runs (docs/usability.md).

``check_manifest(root, man)`` is called by ``load_manifest``: it reads no weights, only the manifest and each
graph's protobuf (external data not loaded), and raises one ArtifactError naming the file and the field:

- the manifest is a JSON object carrying every field a runtime reads, each of the right JSON type;
- ``config`` is a valid ModelArgs (the same checks as a config.json, under its keys);
- each graph's inputs/outputs in the manifest equal the .onnx file's (names, dtypes, dims);
- the state table and the graphs' I/O are what ``config`` gives (a manifest of another model, whose file
  hashes were made to fit, is refused here rather than by an ONNX Runtime traceback);
- each state entry's ``past`` is an input of the decode graph and its ``present`` an output of every graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

# field -> JSON type of the value; graphs[*] and files[*] are checked below
_FIELDS = {"target": str, "weights": str, "dtype": str, "config": dict, "graphs": dict, "state": list, "files": dict}
_GRAPH_FIELDS = {"file": str, "inputs": list, "outputs": list}


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def check_schema(where: Path, man: Any) -> None:
    """The manifest's JSON shape: an object with each field present and of its type."""
    from .artifact import ArtifactError

    if not isinstance(man, dict):
        raise ArtifactError(f"{where}: expected a JSON object, got {_json_type(man)}")
    for key, typ in _FIELDS.items():
        if key not in man:
            raise ArtifactError(f"{where}: field {key!r} is missing")
        if not isinstance(man[key], typ):
            raise ArtifactError(f"{where}: field {key!r} must be {_json_type(typ())}, got {_json_type(man[key])}")
    if not man["graphs"]:
        raise ArtifactError(f"{where}: field 'graphs' lists no graph")
    for rel, info in man["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise ArtifactError(f"{where}: files[{rel!r}] must be an object with 'bytes' (integer) and 'sha256' "
                                f"(string), got {info!r}")
    for g, info in man["graphs"].items():
        if not isinstance(info, dict):
            raise ArtifactError(f"{where}: graphs[{g!r}] must be an object, got {_json_type(info)}")
        for key, typ in _GRAPH_FIELDS.items():
            if not isinstance(info.get(key), typ):
                raise ArtifactError(f"{where}: graphs[{g!r}].{key} must be {_json_type(typ())}, got "
                                    f"{_json_type(info.get(key))}")
        for side in ("inputs", "outputs"):
            for i, s in enumerate(info[side]):
                if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("dtype"), str)
                        and isinstance(s.get("dims"), list)):
                    raise ArtifactError(f"{where}: graphs[{g!r}].{side}[{i}] must be an object with name, dtype "
                                        f"and dims, got {s!r}")
    for i, e in enumerate(man["state"]):
        if not (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("name", "past", "present", "dtype"))
                and isinstance(e.get("shape"), list)):
            raise ArtifactError(f"{where}: state[{i}] must be an object with name, past, present, dtype and shape, "
                                f"got {e!r}")


def _dtype(elem_type: int) -> str:
    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def graph_io(model: onnx.ModelProto) -> dict[str, dict[str, tuple[str, list]]]:
    """{"inputs"|"outputs": {name: (dtype, dims)}} of a graph as stored (dims: int, or the symbol's name)."""
    def one(vi) -> tuple[str, list]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        return _dtype(t.elem_type), dims

    from .signature import CAPACITY

    inits = {t.name for t in model.graph.initializer} - {CAPACITY}  # an input with a default (signature.py)
    return {"inputs": {vi.name: one(vi) for vi in model.graph.input if vi.name not in inits},
            "outputs": {vi.name: one(vi) for vi in model.graph.output}}


def _compare(want: dict[str, tuple[str, list]], have: dict[str, tuple[str, list]], what: str, file: str) -> str | None:
    """The first difference between two I/O tables, said as `what` vs `file`; None when equal."""
    for name, (dt, dims) in want.items():
        if name not in have:
            return f"{what} {name!r} is not in {file}"
        hdt, hdims = have[name]
        if dt != hdt:
            return f"{what} {name!r} is {dt}, {file} has {hdt}"
        if list(dims) != list(hdims):
            return f"{what} {name!r} has dims {list(dims)}, {file} has {list(hdims)}"
    extra = sorted(set(have) - set(want))
    return f"{file} has {what} {extra[0]!r}, which is not listed" if extra else None


def _io(specs: list[dict]) -> dict[str, tuple[str, list]]:
    return {s["name"]: (s["dtype"], list(s["dims"])) for s in specs}


def check_graphs(root: Path, where: Path, man: dict, models: dict[str, onnx.ModelProto]) -> None:
    """Manifest I/O vs the .onnx files, and config (via signature/state_layout) vs both."""
    import torch

    from dsv4.models.config import ConfigError, ModelArgs

    from .artifact import ArtifactError
    from .signature import signature, state_layout

    try:
        args = ModelArgs(**man["config"])
    except ConfigError as e:
        raise ArtifactError(f"{where}: config: {e}") from None
    except TypeError as e:
        raise ArtifactError(f"{where}: config: {e}".replace("ModelArgs.__init__()", "")) from None
    dtype = getattr(torch, man["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{where}: field 'dtype' {man['dtype']!r} is not a dtype")
    batch = (man.get("static") or {}).get("batch")
    grow = bool((man.get("capacity") or {}).get("growable"))  # artifacts before it: fixed rows
    for g, info in man["graphs"].items():
        file = info["file"]
        have = graph_io(models[g])
        try:
            ins, outs = signature(args, dtype, g, batch, man.get("logits", "all") == "all", bool(man.get("mtp")), grow)
        except ValueError as e:
            raise ArtifactError(f"{where}: graphs[{g!r}]: {e}") from None
        for side, specs in (("inputs", ins), ("outputs", outs)):
            problem = _compare(_io(info[side]), have[side], f"graphs[{g!r}].{side}:", file)
            if problem:
                raise ArtifactError(f"{where}: {problem}")
            problem = _compare(_io([s.to_json() for s in specs]), have[side], "the config gives", file)
            if problem:
                raise ArtifactError(f"{where}: config does not describe the graphs ({problem}; a manifest of "
                                    "another model?)")
    want = state_layout(args, dtype, batch, growable=grow)
    for i, (e, w) in enumerate(zip(man["state"], want)):
        for k in ("name", "past", "present", "dtype", "shape"):
            if e.get(k) != w[k]:
                raise ArtifactError(f"{where}: state[{i}].{k} is {e.get(k)!r}, the config gives {w[k]!r}")
    if len(man["state"]) != len(want):
        raise ArtifactError(f"{where}: state has {len(man['state'])} entries, the config gives {len(want)}")
    for g in man["graphs"]:
        if g == "mtp":  # its own state (manifest mtp_state), compared with the config by signature() above
            continue
        have = graph_io(models[g])
        for e in man["state"]:
            if g == "decode" and e["past"] not in have["inputs"]:
                raise ArtifactError(f"{where}: state entry {e['name']!r}: {e['past']!r} is not an input of "
                                    f"{man['graphs'][g]['file']}")
            if e["present"] not in have["outputs"]:
                raise ArtifactError(f"{where}: state entry {e['name']!r}: {e['present']!r} is not an output of "
                                    f"{man['graphs'][g]['file']}")
