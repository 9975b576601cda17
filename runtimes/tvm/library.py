"""``dsv4 compile``: an artifact's two graphs -> TVM libraries in a directory with its own manifest.

Layout of a compiled directory (written into a temporary sibling and renamed into place when complete):

    manifest.json        format "dsv4-tvm" v1: target, arch, the source artifact (path + sha256 of its
                         manifest.json), per graph: library, inputs, outputs, params (name, dtype, shape, location,
                         offset, length in the artifact's weights file), lowered / inlined dsv4 ops, kernel names,
                         seconds, the schedule census ("schedules": {schedule: count}, "schedule_of":
                         {PrimFunc: schedule}, schedules.py); tool versions
    prefill.so decode.so the Relax VM executables (export_library; for tvm-cuda the CUDA source is embedded and
                         compiled for the device when the library is loaded)
    prefill.cu decode.cu tvm-cuda only: the CUDA C source of every kernel
    prefill.ptx ...      tvm-cuda only, where nvcc is on the PATH: ``nvcc -ptx -arch=<arch>`` of that source,
                         assembled by ``ptxas -arch=<arch>`` where ptxas is (manifest: "ptxas": "ok")
    tvm.log              TVM's native (C++) log of the compile, e.g. its "Fast mode segfaults..." warnings, which
                         would otherwise be written to the terminal under the progress display (native_log)

The weights are not copied: a compiled directory runs against its artifact (checked by the manifest hash).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import tvm

from dsv4.export.artifact import MANIFEST, load_manifest, sha256, stage_printer, versions, writing
from dsv4.export.signature import GRAPHS

from . import backend, frontend, schedules
from .frontend import Param

FORMAT, FORMAT_VERSION = "dsv4-tvm", 1
KERNEL = re.compile(r"\b(\w+_kernel\w*)\(")
LOG = "tvm.log"


class CompiledError(ValueError):
    """A compiled directory is incomplete or does not belong to the artifact / target it is used with."""


def export_command(man: dict, target: str) -> str:
    """The ``dsv4 export`` command line that re-exports the artifact described by `man` for `target`."""
    src, cfg = man.get("source", {}), man.get("config", {})
    if src.get("kind") == "synthetic":
        source = f"--preset {src['preset']} --seed {src.get('seed', 0)}"
    else:
        source = str(src.get("path", "CHECKPOINT"))
    flags = [f"--weights {man['weights']}"] if man.get("weights") else []
    flags += ["--no-quant-sim"] if cfg.get("quant_sim") is False else []
    flags += [f"--no-{p}-sim" for p in ("act", "kv", "index") if cfg.get(f"{p}_quant_sim") is False]
    flags += [f"--max-seq-len {cfg['max_seq_len']}"] if cfg.get("max_seq_len") else []
    return f"dsv4 export {source} --target {target} {' '.join(flags)} --out OUT".replace("  ", " ")


def check_artifact(man: dict, art: Path, target: str = "tvm-llvm") -> None:
    """Artifacts exported for ONNX Runtime targets with their pass pipeline hold com.microsoft contrib ops
    (MoE / QMoE, ...) TVM cannot import: refused in one line naming the export to run instead."""
    from dsv4.export.targets import get_target

    tgt = get_target(man["target"])
    if tgt.runtime != "tvm" and any(man["graphs"][g].get("pass_counts") for g in GRAPHS):
        raise CompiledError(f"{art}: exported for {tgt.name} (ONNX Runtime contrib ops, which TVM cannot import); "
                            f"re-export for TVM: {export_command(man, target)}")


@contextlib.contextmanager
def native_log(path: Path):
    """Send what native code writes to file descriptor 2 (TVM's C++ LOG(WARNING) lines) to `path` (appended)
    while Python's own stderr (the progress display, warnings, tracebacks) keeps the real one: fd 2 is pointed at
    the log and sys.stderr, where it writes to fd 2, is swapped for a stream on a duplicate of the old fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # pytest's capsys, a StringIO: not fd 2, left alone
        python_on_fd2 = False
    before = sys.stderr
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        if python_on_fd2:
            sys.stderr = open(saved, "w", buffering=1, encoding=before.encoding, errors="backslashreplace",
                              closefd=False)
        yield path
    finally:
        if python_on_fd2:
            sys.stderr.flush()
            sys.stderr = before
        os.dup2(saved, 2)
        os.close(saved)


def compile_graph(art: Path, graph: str, target: tvm.target.Target):
    """(executable, Prepared, seconds, census {PrimFunc: schedule}) of one graph of the artifact `art`."""
    t = time.perf_counter()
    mod, prep = frontend.import_model(art / f"{graph}.onnx")
    t_import = time.perf_counter() - t
    t = time.perf_counter()
    census: dict[str, str] = {}
    ex = backend.build(mod, target, census)
    return ex, prep, {"import": round(t_import, 2), "build": round(time.perf_counter() - t, 2)}, census


def compile_artifact(art: str | Path, out: str | Path, target: str = "tvm-llvm", arch: str = backend.DEFAULT_ARCH,
                     overwrite: bool = False, progress: bool | None = None, verify: bool = True,
                     graphs: tuple[str, ...] = GRAPHS) -> dict:
    """Compile the graphs of `art` (default both) for `target` into the directory `out`; returns the compiled
    manifest. A directory holding only some graphs is for inspection (CUDA source, PTX); a Generator needs both.
    TVM's native log goes to `out`/tvm.log (on failure: `out`.tvm.log beside it, as the directory is not kept)."""
    art, out = Path(art), Path(out)
    bad = [g for g in graphs if g not in GRAPHS]
    if bad or not graphs:
        raise ValueError(f"--graphs: {bad or 'none'}; choose from {', '.join(GRAPHS)}")
    man = load_manifest(art, verify=verify)
    check_artifact(man, art, target)
    tgt = backend.make_target(target, arch)
    cuda = backend.is_cuda(tgt)
    done: dict[str, dict] = {}
    with writing(out, overwrite) as tmp, kept_on_failure(tmp / LOG, out.with_name(f"{out.name}.{LOG}")) as log, \
            native_log(log), stage_printer(progress) as stage:
        for g in graphs:
            with stage(f"import + build {g} ({target})"):
                ex, prep, secs, census = compile_graph(art, g, tgt)
            with stage(f"save {g}"):
                ex.export_library(str(tmp / f"{g}.so"))
                info = {"library": f"{g}.so", "inputs": prep.inputs, "outputs": prep.outputs,
                        "params": [asdict(p) for p in prep.params], "lowered": prep.lowered,
                        "inlined": prep.inlined, "seconds": secs,
                        "schedules": schedules.census_counts(census), "schedule_of": dict(sorted(census.items()))}
                if cuda:
                    src = backend.cuda_source(ex)
                    (tmp / f"{g}.cu").write_text(src)
                    info["cuda_source"] = f"{g}.cu"
                    info["kernels"] = sorted(set(KERNEL.findall(src)))
            if cuda and shutil.which("nvcc"):
                with stage(f"nvcc -ptx -arch={arch} {g}"):
                    t = time.perf_counter()
                    backend.ptx(src, arch, tmp / f"{g}.ptx")
                    info["ptx"] = f"{g}.ptx"
                    secs["ptx"] = round(time.perf_counter() - t, 2)
                if shutil.which("ptxas"):
                    with stage(f"ptxas -arch={arch} {g}"):
                        t = time.perf_counter()
                        backend.ptxas(tmp / f"{g}.ptx", arch)
                        info["ptxas"] = "ok"
                        secs["ptxas"] = round(time.perf_counter() - t, 2)
            done[g] = info
        cm = {"format": FORMAT, "format_version": FORMAT_VERSION, "target": target,
              "arch": arch if cuda else None, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "artifact": {"path": str(art.resolve()), "manifest_sha256": sha256(art / MANIFEST),
                           "target": man["target"], "dtype": man["dtype"]},
              "graphs": done, "log": LOG, "versions": versions() | {"tvm": tvm.__version__}}
        (tmp / MANIFEST).write_text(json.dumps(cm, indent=2) + "\n")
    return cm


@contextlib.contextmanager
def kept_on_failure(path: Path, keep: Path):
    """Yield `path`; when the block raises, move the file to `keep` first (`path` is inside a directory that
    ``writing`` removes on failure) and name it on stderr."""
    try:
        yield path
    except BaseException:
        if path.is_file() and path.stat().st_size:
            shutil.move(path, keep)
            print(f"TVM log: {keep}", file=sys.stderr)
        raise


def load_compiled(path: str | Path, art: str | Path | None = None, target: str | None = None) -> tuple[dict, Path]:
    """(compiled manifest, artifact directory): checks the format, the files, the target and that the artifact
    (default: the one it was compiled from) is the same one, by its manifest hash."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CompiledError(f"{path}: not a compiled TVM directory (no {MANIFEST}); run dsv4 compile")
    cm = json.loads(mpath.read_text())
    if cm.get("format") != FORMAT or cm.get("format_version") != FORMAT_VERSION:
        raise CompiledError(f"{mpath}: format {cm.get('format')!r} v{cm.get('format_version')}, expected "
                            f"{FORMAT!r} v{FORMAT_VERSION}")
    if target is not None and cm["target"] != target:
        raise CompiledError(f"{path}: compiled for {cm['target']}, not {target}")
    art = Path(art) if art is not None else Path(cm["artifact"]["path"])
    if sha256(art / MANIFEST) != cm["artifact"]["manifest_sha256"]:
        raise CompiledError(f"{path}: compiled from a different artifact than {art} (manifest hash differs)")
    for g in GRAPHS:
        if g not in cm["graphs"]:
            raise CompiledError(f"{path}: compiled without the {g} graph (dsv4 compile --graphs); recompile both")
        lib = path / cm["graphs"][g]["library"]
        if not lib.is_file():
            raise CompiledError(f"{lib}: missing (listed in {mpath})")
    return cm, art


def graph_info(cm: dict, graph: str) -> tuple[list[str], list[str], list[Param]]:
    info = cm["graphs"][graph]
    return info["inputs"], info["outputs"], [Param(**{**p, "shape": tuple(p["shape"])}) for p in info["params"]]
