"""The artifact directory: manifest.json, atomic write, sha256 of every file, verification on load.

An artifact is written into a temporary sibling directory and renamed into place only when complete, so an
interrupted export never leaves a half artifact under the requested name. Loading verifies every file's
hash (skippable for speed) and refuses external-data locations that could leave the directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path, PurePosixPath

import onnx
import onnx_ir as ir

from dsv4.models.files import writing_dir

from . import custom_ops
from .manifest_check import check_graphs, check_schema
from .package import package
from .signature import CAPACITY, growable, signature, state_layout
from .state_bytes import state_bytes
from .static import device_section
from .targets import Target

MANIFEST = "manifest.json"
FORMAT = "dsv4-artifact"
FORMAT_VERSION = 1
_DEPENDENCIES = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "apache-tvm", "safetensors", "numpy")


class ArtifactError(ValueError):
    """An artifact directory is incomplete, tampered with, or unsafe. The message names the file."""


# ---- writing -------------------------------------------------------------------------------------------------
OWNER = ".dsv4-writer"  # in a temporary directory while it is written: {"pid", "host"} of the writer


@contextlib.contextmanager
def writing(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success move it to `out` (replacing an old one only now). The
    temporaries that an interrupted (e.g. SIGKILLed) writer left in the same parent are removed first."""
    out = Path(out)
    clean_stale(out.parent)
    with writing_dir(out, overwrite) as tmp:
        mark_owner(tmp)
        yield tmp
        (tmp / OWNER).unlink(missing_ok=True)


def mark_owner(d: Path) -> None:
    """Say in `d` (a ``.NAME.tmp-*`` temporary) which process writes it, for clean_stale after a SIGKILL."""
    (d / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def clean_stale(parent: Path) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` directories in `parent` whose writer (its OWNER file: pid on this host) is gone;
    a directory without that file, or whose writer still runs, is left alone. Returns what was removed."""
    import shutil

    gone = []
    for d in parent.glob(".*.tmp-*") if parent.is_dir() else ():
        try:
            owner = json.loads((d / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") != socket.gethostname() or _alive(int(owner.get("pid", 0))):
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_table(root: Path, hashed: dict[str, str] | None = None) -> dict[str, dict]:
    """The manifest's "files": every file under `root` but the manifest and the owner mark, with its size and
    sha256 (taken from `hashed` by relative path when the writer already computed it)."""
    hashed = hashed or {}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, OWNER):
            rel = p.relative_to(root).as_posix()
            out[rel] = {"bytes": p.stat().st_size, "sha256": hashed.get(rel) or sha256(p)}
    return out


def versions() -> dict[str, str | None]:
    import dsv4

    out: dict[str, str | None] = {"dsv4": dsv4.__version__, "python": sys.version.split()[0]}
    for dist in _DEPENDENCIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def build_manifest(root: Path, args, target: Target, weights: str, graphs: dict[str, ir.Model], source: dict,
                   counts: dict, seconds: dict, weights_file: str, shapes: dict | None = None,
                   all_logits: bool = True, checkpoint: Path | None = None, mtp: bool = False,
                   hashed: dict[str, str] | None = None) -> dict:
    """`hashed`: sha256 of files already known (the weights writer hashes what it writes), not read again."""
    import torch

    dtype = torch.float32 if weights == "packed" else getattr(torch, weights)
    # config.json, tokenizer and generation files copied in, graphs stamped; before the files are hashed
    pkg = package(root, args, source, weights, target.name, [f"{name}.onnx" for name in graphs], checkpoint)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()}
    grow = growable(args, target)
    graph_info = {}
    for name, m in graphs.items():
        ins, outs = signature(args, dtype, name, shapes and shapes["batch"], all_logits, mtp, grow)
        graph_info[name] = {
            "file": f"{name}.onnx",
            "inputs": [s.to_json() for s in ins],
            "outputs": [s.to_json() for s in outs],
            "nodes": sum(1 for _ in m.graph),
            "dsv4_nodes": dict(sorted(custom_ops.dsv4_nodes(m).items())),
            "functions": sorted(f"{d}.{n}" for d, n, _ in m.functions),
            "opset_imports": dict(sorted(m.opset_imports.items())),
            "pass_counts": counts.get(name, {}),
        }
    files = file_table(root, hashed)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "logits": "all" if all_logits else "last",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target.name, "opset": target.opset, "domain": {"dsv4": custom_ops.DOMAIN_VERSION},
        "weights": weights, "dtype": str(dtype).removeprefix("torch."), "weights_file": weights_file,
        "source": pkg.pop("source"), "config": config, "graphs": graph_info,
        "state": state_layout(args, dtype, shapes and shapes["batch"], growable=grow),
        # growable: the per-token caches have rows{m} rows, the prefill's `capacity` input sizes them (docs/capacity.md)
        "capacity": {"max_seq_len": args.max_seq_len, "growable": grow, **({"input": CAPACITY} if grow else {})},
        "state_bytes": state_bytes(config, state_layout(args, dtype)),  # per token / per sequence (export/state_bytes.py)
        "static": shapes,
        **({"mtp": True, "mtp_state": state_layout(args, dtype, mtp=True)} if mtp else {}),
        **({"ascend": device_section(graph_info, shapes)} if target.name == "ascend" else {}),
        "dsv4_ops": sorted({op for g in graph_info.values() for op in g["dsv4_nodes"]}),
        **pkg,  # tokenizer, config_json, shipped, generation, onnxruntime (export/package.py)
        "export_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "files": files, "versions": versions(),
    }


def write_manifest(root: Path, manifest: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


# ---- reading -------------------------------------------------------------------------------------------------
def load_manifest(art: str | Path, verify: bool = True, schema: bool = True) -> dict:
    """Read and check an artifact: required files present, hashes equal (unless verify=False), external-data
    locations inside the directory. Raises ArtifactError naming the offending file. schema=False (``dsv4 lint``,
    which reads only the graph files): the manifest's fields and its I/O tables are not checked against the graphs,
    so a linter can report what is wrong inside a graph that no longer matches its manifest."""
    root = Path(art)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: not an artifact (no {MANIFEST})")
    try:
        man = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from e
    if isinstance(man, dict) and (man.get("format") != FORMAT or man.get("format_version") != FORMAT_VERSION):
        raise ArtifactError(f"{mpath}: format {man.get('format')!r} v{man.get('format_version')}, "
                            f"expected {FORMAT!r} v{FORMAT_VERSION}")
    if isinstance(man, dict) and isinstance(man.get("config"), dict):  # written before the compact state existed:
        man["config"].setdefault("compact_state", False)  # its state holds floats (docs/state_layout.md)
    if schema:
        check_schema(mpath, man)
    elif not (isinstance(man, dict) and isinstance(man.get("files"), dict) and isinstance(man.get("graphs"), dict)):
        raise ArtifactError(f"{mpath}: expected an object with 'files' and 'graphs'")
    for rel, info in man["files"].items():
        p = _inside(root, rel, MANIFEST)
        if not p.is_file():
            raise ArtifactError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != info["bytes"]:
            raise ArtifactError(f"{p}: {p.stat().st_size} bytes, the manifest says {info['bytes']} (hash mismatch)")
        if verify and sha256(p) != info["sha256"]:
            raise ArtifactError(f"{p}: sha256 hash mismatch with {MANIFEST}; the file was modified or corrupted")
    models = {}
    for g, info in man["graphs"].items():
        if info["file"] not in man["files"]:
            raise ArtifactError(f"{mpath}: graphs[{g!r}].file {info['file']!r} is not listed in 'files'")
        models[g] = check_external_data(root, info["file"], set(man["files"]))
    if schema:
        check_graphs(root, mpath, man, models)
    return man


def _inside(root: Path, rel: str, where: str) -> Path:
    """`root/rel` for a relative POSIX path with no '..', or ArtifactError."""
    pp = PurePosixPath(rel)
    if pp.is_absolute() or ".." in pp.parts or "\\" in rel or not rel:
        raise ArtifactError(f"{root / where}: path {rel!r} escapes the artifact directory; refused")
    return root / pp


def check_external_data(root: Path, graph_file: str, listed: set[str]) -> onnx.ModelProto:
    """Every external-data location of `graph_file` must be a listed file inside the artifact (no '..'); returns the
    graph (its weights not loaded)."""
    try:
        m = onnx.load(str(_inside(root, graph_file, MANIFEST)), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, OSError, ...: one line naming the file
        raise ArtifactError(f"{root / graph_file}: not a readable ONNX model ({e})") from None
    tensors = list(m.graph.initializer)
    for node in m.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        _inside(root, loc, graph_file)
        if loc not in listed:
            raise ArtifactError(f"{root / graph_file}: initializer {t.name} points at {loc!r}, which is not a "
                                f"file of the artifact")
    return m


# ---- progress --------------------------------------------------------------------------------------------------
class _NoStatus:
    def update(self, *_a, **_k) -> None:
        pass


@contextlib.contextmanager
def stage_printer(show: bool | None):
    """``with stage_printer(None) as stage: with stage("trace decode") as st: st.update("step 3/64")``: a spinner
    per stage (its text updatable, e.g. with a step count) and a line with its time when done (shown when `show`,
    or when stderr is a terminal if None). show=None off a terminal (a log): plain lines on stderr, one when a
    stage starts and one with its time when it ends (no spinner, no updates); DSV4_NO_PROGRESS=1 or show=False:
    nothing."""
    if show is None and not os.environ.get("DSV4_NO_PROGRESS") and not sys.stderr.isatty():
        @contextlib.contextmanager
        def plain(name: str):
            t = time.perf_counter()
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
            yield _NoStatus()
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr,
                  flush=True)

        yield plain
        return
    if show is None:
        show = sys.stderr.isatty() and not os.environ.get("DSV4_NO_PROGRESS")
    if not show:
        @contextlib.contextmanager
        def quiet(name: str):
            yield _NoStatus()

        yield quiet
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)

    @contextlib.contextmanager
    def stage(name: str):
        t = time.perf_counter()
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console,
                      transient=True) as prog:  # the elapsed time ticks while the stage runs
            task = prog.add_task(escape(name), total=None)
            yield _Status(prog, task, name)
        console.print(f"[green]✓[/] {escape(name)} [dim]({time.perf_counter() - t:.1f} s)[/]")

    yield stage


class _Status:
    def __init__(self, prog, task, name: str):
        self.prog, self.task, self.name = prog, task, name

    def update(self, text: str) -> None:
        from rich.markup import escape

        self.prog.update(self.task, description=f"{escape(self.name)} {escape(text)}")


# ---- inspection ----------------------------------------------------------------------------------------------
def inspect_artifact(art: str | Path, verify: bool = False) -> dict:
    """What ``dsv4 inspect`` shows: per graph the op histogram (as stored, and with the dsv4 function bodies
    inlined = what ONNX Runtime executes), dsv4 ops, state bytes per token and weights by dtype."""
    import onnx.inliner

    root = Path(art)
    man = load_manifest(root, verify=verify)
    out: dict = {"target": man["target"], "weights": man["weights"], "graphs": {}}
    weights: dict[str, dict[str, int]] = {}
    seen: set[str] = set()
    for g, info in man["graphs"].items():
        m = onnx.load(str(root / info["file"]), load_external_data=False)
        hist = _histogram(m.graph.node)
        inl = _histogram(onnx.inliner.inline_local_functions(m).graph.node)
        out["graphs"][g] = {"nodes": sum(hist.values()), "ops": hist, "inlined_nodes": sum(inl.values()),
                            "inlined_ops": inl, "dsv4": {k[5:]: v for k, v in hist.items() if k.startswith("dsv4.")}}
        for t in m.graph.initializer:
            if t.name in seen or t.data_location != onnx.TensorProto.EXTERNAL:
                continue  # constants stored inside the graph file are not weights
            seen.add(t.name)
            dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
            n = 1
            for d in t.dims:
                n *= d
            w = weights.setdefault(dt, {"tensors": 0, "elements": 0, "bytes": 0})
            w["tensors"] += 1
            w["elements"] += n
            w["bytes"] += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    out["weights_by_dtype"] = dict(sorted(weights.items()))
    for k in ("static", "ascend"):  # static shapes, and what runs the artifact on the device (export/static.py)
        if man.get(k):
            out[k] = man[k]
    sb = state_bytes(man["config"], man["state"])  # recomputed: manifests before state_bytes existed have none
    out["state"] = {"bytes_per_token": sb["per_token"], "fixed_bytes_per_sequence": sb["fixed_per_sequence"],
                    "bytes_per_sequence": sb["per_sequence"], "max_seq_len": sb["max_seq_len"],
                    "entries": len(man["state"]), "layout": state_layout_name(man["state"]),
                    "per_layer_kind": sb["per_layer_kind"], **({"release": sb["release"]} if "release" in sb else {})}
    return out


def state_layout_name(state: list[dict]) -> str:
    """"compact" when the state holds codes (uint8 entries: models/kvstore.py), else "float"."""
    return "compact" if any(e["dtype"] == "uint8" for e in state) else "float"


def _histogram(nodes) -> dict[str, int]:
    from collections import Counter

    c = Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in nodes)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
