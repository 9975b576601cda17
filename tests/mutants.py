"""Edits of an artifact for the mutation tests of ``dsv4 parity`` (tests/test_mutants.py).

Each edit changes one number the way a subtle bug would (a weight off by 1%, a constant of one node changed) and
then refreshes the manifest's sizes and hashes, so that only the numerical check can catch it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dsv4.export.artifact import MANIFEST, sha256


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def refresh_hashes(art: Path) -> None:
    """Recompute every file's size and sha256 in the manifest, as a careful forger would."""
    mpath = art / MANIFEST
    man = json.loads(mpath.read_text())
    for rel in man["files"]:
        p = art / rel
        man["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    mpath.write_text(json.dumps(man, indent=2) + "\n")


def _external(art: Path, name: str) -> tuple[Path, int, int, int]:
    """(file, offset, length, onnx dtype) of the external initializer `name` (looked up in prefill.onnx)."""
    m = onnx.load(str(art / "prefill.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        if t.name == name:
            info = {e.key: e.value for e in t.external_data}
            return art / info["location"], int(info.get("offset", 0)), int(info["length"]), t.data_type
    raise KeyError(f"{name}: no external initializer of that name in {art / 'prefill.onnx'}")


def edit_weight(art: Path, name: str, fn) -> None:
    """Replace the bytes of weight `name` in the weights file by fn(values) (both graphs read them)."""
    path, off, n, dt = _external(art, name)
    np_dt = onnx.helper.tensor_dtype_to_np_dtype(dt)
    buf = bytearray(path.read_bytes())
    old = np.frombuffer(bytes(buf[off:off + n]), dtype=np_dt)
    new = np.asarray(fn(old.copy()), dtype=np_dt)
    assert new.shape == old.shape and not np.array_equal(new, old), f"{name}: the edit changed nothing"
    buf[off:off + n] = new.tobytes()
    path.write_bytes(bytes(buf))


def scale_weight(art: Path, name: str, factor: float) -> None:
    edit_weight(art, name, lambda w: w * factor)


def _inits(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The small constants stored in the graph file: initializers and Constant nodes' tensors, by value name."""
    out = {t.name: t for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    for n in m.graph.node:
        a = n.attribute[0] if n.op_type == "Constant" and n.attribute else None
        if a is not None and a.name in ("value", "value_float", "value_int"):
            v = onnx.helper.get_attribute_value(a)
            out[n.output[0]] = v if a.name == "value" else numpy_helper.from_array(
                np.array(v, np.float32 if a.name == "value_float" else np.int64))
    return out


def replace_input(art: Path, graph: str, pred, fn, index=None) -> str:
    """In `graph`.onnx only: the first node matching pred(node, metadata, constants) reads a new constant fn(old)
    at input `index` (default: its first input that is a small stored constant) -- a fresh initializer, so that
    other nodes sharing the old one keep it. Returns the node's name."""
    path = art / f"{graph}.onnx"
    m = onnx.load(str(path), load_external_data=False)
    consts = _inits(m)
    hits = [n for n in m.graph.node if pred(n, {p.key: p.value for p in n.metadata_props}, consts)]
    assert hits, f"{path}: no node matches the mutation's predicate"
    node = hits[0]
    if index is None:
        index = next(i for i, v in enumerate(node.input) if v in consts)
    old_name = node.input[index]
    init = consts[old_name]
    old = numpy_helper.to_array(init)
    new = np.asarray(fn(old.copy()), dtype=old.dtype).reshape(old.shape)
    assert not np.array_equal(new, old), f"{node.name}: the edit changed nothing"
    name = f"{old_name}__mutant"
    m.graph.initializer.append(numpy_helper.from_array(new, name))
    node.input[index] = name
    onnx.save(m, str(path))
    return node.name


def in_layer(layer: int, op: str, dsv4_op: str | None = None, const=None):
    """A node predicate: op type `op` in model.layers.<layer> (implementing `dsv4_op`, if given; reading a stored
    constant equal to `const`, if given)."""
    def pred(n, md, consts):
        scopes = md.get("pkg.torch.onnx.name_scopes", "")
        if n.op_type != op or f"'model.layers.{layer}'" not in scopes or (dsv4_op and md.get("dsv4.op") != dsv4_op):
            return False
        return const is None or any(v in consts and numpy_helper.to_array(consts[v]).size == 1
                                    and float(numpy_helper.to_array(consts[v]).reshape(-1)[0]) == const
                                    for v in n.input)
    return pred
