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


def refresh_hashes(art: Path, only: set[str] | None = None) -> None:
    """Recompute the manifest's size and sha256 of every file (or of those in `only`), as a careful forger would."""
    mpath = art / MANIFEST
    man = json.loads(mpath.read_text())
    for rel in man["files"]:
        if only is None or rel in only:
            p = art / rel
            man["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    mpath.write_text(json.dumps(man, indent=2) + "\n")


GRAPH_FILES = ("prefill.onnx", "decode.onnx")


def edit_weight(art: Path, name: str, fn, inline: bool = False) -> None:
    """Replace weight `name` by fn(values): in the weights file when it is stored there (both graphs read it), else
    in every graph file that holds it inline (derived weights of a pass pipeline run outside export). inline=True:
    always as an initializer stored in each graph file that reads it, the weights file left as it is (a real-size
    artifact's weights file can be hard-linked, not copied, into the mutant)."""
    done = False
    for g in GRAPH_FILES:
        m = onnx.load(str(art / g), load_external_data=False)
        t = next((t for t in m.graph.initializer if t.name == name), None)
        if t is None:
            continue
        np_dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            path, off, n = art / info["location"], int(info.get("offset", 0)), int(info["length"])
            with open(path, "rb") as f:
                f.seek(off)
                old = np.frombuffer(f.read(n), dtype=np_dt).reshape(tuple(t.dims))
        else:
            old = numpy_helper.to_array(t)
        new = np.asarray(fn(old.copy()), dtype=old.dtype)
        assert new.shape == old.shape and not np.array_equal(new, old), f"{name}: the edit changed nothing"
        if t.data_location == onnx.TensorProto.EXTERNAL and not inline:
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(new.tobytes())
            return
        t.CopyFrom(numpy_helper.from_array(new, name))
        onnx.save(m, str(art / g))
        done = True
    assert done, f"{name}: no initializer of that name in {art}"


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


def set_attribute(art: Path, graph: str, pred, attr: str, value) -> str:
    """In `graph`.onnx only: attribute `attr` of the first node matching pred(node, metadata, constants) := value."""
    path = art / f"{graph}.onnx"
    m = onnx.load(str(path), load_external_data=False)
    consts = _inits(m)
    node = next(n for n in m.graph.node if pred(n, {p.key: p.value for p in n.metadata_props}, consts))
    a = next(a for a in node.attribute if a.name == attr)
    assert onnx.helper.get_attribute_value(a) != value, f"{node.name}.{attr}: the edit changed nothing"
    a.CopyFrom(onnx.helper.make_attribute(attr, value))
    onnx.save(m, str(path))
    return node.name


def expert_scale_stack(art: Path, layer: int) -> str:
    """The name of a layer's w1 expert scales as this artifact stores them: the checkpoint's E8M0 bytes (raw graph)
    or ort-cpu's lossless re-encoding 2^(e-128) as float32 (lower_ort), where byte + 1 is x2."""
    m = onnx.load(str(art / "prefill.onnx"), load_external_data=False)
    names = {t.name for t in m.graph.initializer}
    for n in (f"layers.{layer}.ffn.experts.w1.scale.q8_scale", f"layers.{layer}.ffn.experts.w1.scale"):
        if n in names:
            return n
    raise KeyError(f"layer {layer}: no w1 expert scales in {art}")


def e8m0_plus_one(values: np.ndarray) -> np.ndarray:
    """One expert's first E8M0 scale + 1 (a byte; a float32 power of two doubles)."""
    out = values.copy()
    flat = out.reshape(-1)
    flat[0] = flat[0] + 1 if out.dtype == np.uint8 else flat[0] * 2
    return out


# name -> (what it edits, the edit); each keeps hashes valid (refresh_hashes) so that only parity can catch it
MUTANTS = {
    "norm": ("final norm.weight x 1.01", lambda a: scale_weight(a, "norm.weight", 1.01)),
    "kv_norm": ("layers.1.attn.kv_norm.weight x 1.01", lambda a: scale_weight(a, "layers.1.attn.kv_norm.weight", 1.01)),
    "route_scale": ("decode.onnx only: layer 2's routed-expert scale 1.5 -> 1.515",
                    lambda a: replace_input(a, "decode", in_layer(2, "Mul", "MoE", const=1.5), lambda v: v * 1.01)),
    "sinkhorn": ("decode.onnx only: layer 1's Sinkhorn with 5 iterations instead of 20",
                 lambda a: sinkhorn_iterations(a, layer=1, iters=5)),
    "rope": ("layers.1 RoPE frequencies sign-flipped", lambda a: scale_weight(a, "layers.1.attn.inv_freq", -1.0)),
    "indexer_topk": ("decode.onnx only: layer 3's indexer top-k 16 -> 15",
                     lambda a: replace_input(a, "decode", in_layer(3, "TopK", "IndexerTopK"), lambda v: v - 1, index=1)),
    "e8m0": ("layers.2 expert 0's first w1 E8M0 scale byte + 1",
             lambda a: edit_weight(a, expert_scale_stack(a, 2), e8m0_plus_one)),
}


def sinkhorn_iterations(art: Path, layer: int, iters: int) -> str:
    """decode.onnx only: the first Sinkhorn of `layer` runs `iters` sweeps: the dsv4.HcSplitSinkhorn node's
    attribute (raw graph) or the trip count of its inlined Loop (iters - 1 after the first normalisation)."""
    m = onnx.load(str(art / "decode.onnx"), load_external_data=False)
    if any(n.op_type == "HcSplitSinkhorn" for n in m.graph.node):
        return set_attribute(art, "decode", in_layer(layer, "HcSplitSinkhorn"), "iters", iters)
    return replace_input(art, "decode", in_layer(layer, "Loop", "HcSplitSinkhorn"), lambda v: v * 0 + iters - 1,
                         index=0)


def make(src: Path, dst: Path, name: str) -> Path:
    """A copy of artifact `src` at `dst` with mutant `name` applied and the manifest's hashes refreshed."""
    copy(src, dst)
    MUTANTS[name][1](dst)
    refresh_hashes(dst)
    return dst


# mutants that edit graph files only (weights stored inline): applicable to a hard-linked real-size copy
LINKABLE = {
    "norm": ("final norm.weight x 1.01", lambda a: edit_weight(a, "norm.weight", lambda w: w * 1.01, inline=True)),
    "kv_norm": ("layers.1.attn.kv_norm.weight x 1.01",
                lambda a: edit_weight(a, "layers.1.attn.kv_norm.weight", lambda w: w * 1.01, inline=True)),
    "sinkhorn": MUTANTS["sinkhorn"],
}


def make_linked(src: Path, dst: Path, name: str) -> Path:
    """Mutant `name` of LINKABLE at `dst`: graph files and manifest copied, every other file hard-linked (a 9 GB
    weights file costs nothing), hashes of the copied files refreshed (the linked ones are unchanged)."""
    dst.mkdir(parents=True)
    copied = {MANIFEST, *GRAPH_FILES, "config.json"}
    for f in src.iterdir():
        if f.is_file():
            if f.name in copied:
                shutil.copy2(f, dst / f.name)
            else:
                (dst / f.name).hardlink_to(f)
    LINKABLE[name][1](dst)
    refresh_hashes(dst, only=copied)
    return dst
