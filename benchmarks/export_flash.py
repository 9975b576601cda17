"""Benchmark: real-size export (issue [9]): Flash/Pro-shaped slices exported in bounded memory, and decode speed of
the two MXFP4 expert encodings.

    .venv/bin/python benchmarks/export_flash.py slices --slice flash:2 --slice flash:4:sparse ... [--perf docs/PERF.md]
    .venv/bin/python benchmarks/export_flash.py decode [--experts 16] [--steps 8] [--perf docs/PERF.md]
    .venv/bin/python benchmarks/export_flash.py tiny [--perf docs/PERF.md]

``slices``: for each PRESET:LAYERS[:sparse], ``dsv4 checkpoint make --preset P --layers N [--sparse]`` (kept under
--work and reused), then ``dsv4 export CK --target ort-cpu`` in a child process: peak RSS (ru_maxrss), user and
system CPU, wall, the manifest's stage times, the weights writer's rate over checkpoint bytes and the artifact /
checkpoint bytes. The checkpoint's pages are dropped from the page cache before the export (cold reads). Sparse
slices (zero data in file holes) measure memory and trace time, not disk rates.
``decode``: Flash dimensions, 1 layer, 8 routed experts (a decode step touches top-6 of them whatever E is):
each ``--experts`` mode exported and timed over greedy decode steps on ORT CPU. ``tiny``: the tiny export's CPU.
Each command's results replace its part of the section in PERF.md (results kept in --work/results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import measure

CLI = [sys.executable, "-m", "dsv4.tools.cli"]
GB = 1e9



def ckpt_bytes(ck: Path) -> int:
    return sum(f.stat().st_size for f in ck.glob("*.safetensors"))


def evict(ck: Path) -> None:
    """Drop the checkpoint's pages from the page cache (flushed first; POSIX_FADV_DONTNEED drops clean pages, no
    root needed), so the export reads the shards from the disk as a user's first export does."""
    os.sync()
    for f in ck.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_rate(ck: Path, n: int = 1 << 30) -> float:
    """MB/s of a plain kernel copy (copy_file_range + fsync) of up to 1 GB of the largest shard, read cold: what
    the disk gives right now, the ceiling of the weights writer."""
    src = max(ck.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    n = min(n, src.stat().st_size)
    evict(ck)
    out = ck.parent / ".disk-rate.tmp"
    fd, od = os.open(src, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        t, done = time.perf_counter(), 0
        while done < n:
            done += os.copy_file_range(fd, od, n - done, done)
        os.fsync(od)
        return n / (time.perf_counter() - t) / 1e6
    finally:
        os.close(fd)
        os.close(od)
        out.unlink()


def run_slice(work: Path, spec: str, experts: str) -> dict:
    name, layers, *rest = spec.split(":")
    sparse = "sparse" in rest
    ck = work / f"{name}{layers}{'-sparse' if sparse else ''}"
    if not (ck / "model.safetensors.index.json").exists():
        measure([*CLI, "checkpoint", "make", "--preset", name, "--layers", layers, "--out", str(ck), "--force",
                 "--no-progress", *(["--sparse"] if sparse else [])])
    art = work / f"art-{ck.name}-{experts}{'-mtp' if 'mtp' in rest else ''}"
    evict(ck)
    res = measure([*CLI, "export", str(ck), "--target", "ort-cpu", "--out", str(art), "--force", "--no-progress",
                   "--experts", experts, *(["--mtp"] if "mtp" in rest else [])])
    man = json.loads((art / "manifest.json").read_text())
    art_bytes = sum(v["bytes"] for v in man["files"].values())
    w = man["weights_written"]
    out = {"slice": spec, "preset": name, "layers": int(layers), "sparse": sparse, "experts": experts, "mtp": "mtp" in rest,
           "ckpt_bytes": ckpt_bytes(ck), "artifact_bytes": art_bytes, "weights_bytes": w["bytes"],
           "source_bytes": w["source_bytes"], "weights_s": w["seconds"], "stages": man["export_seconds"],
           "export": res, "artifact_blocks": sum((art / f).stat().st_blocks * 512 for f in man["files"])}
    out["ratio"] = art_bytes / out["ckpt_bytes"]
    if not sparse:
        out["disk_mb_s"] = disk_rate(ck)
    out["mb_s"] = w["source_bytes"] / max(w["seconds"], 1e-9) / 1e6
    out["trace_s"] = sum(v for k, v in man["export_seconds"].items() if k.startswith("trace"))
    if "keep" not in rest:
        import shutil

        shutil.rmtree(art, ignore_errors=True)
    return out


DECODE = r"""
import json, sys, time, numpy as np
from dsv4.runtimes.ort import Generator
g = Generator(sys.argv[1], verify=False)
ids = np.arange(1, 9, dtype=np.int64)[None]
t = time.perf_counter(); logits = g.prefill(ids); pre = time.perf_counter() - t
times = []
for _ in range(int(sys.argv[2])):
    nxt = np.asarray(logits)[:, -1].argmax(-1)[:, None].astype(np.int64)
    t = time.perf_counter(); logits = g.step(nxt); times.append(time.perf_counter() - t)
print("@@" + json.dumps({"prefill_s": pre, "step_s": times}))
"""


def run_decode(work: Path, experts: int, layers: int, steps: int) -> dict:
    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset

    ck = work / f"flash{layers}-e{experts}"
    if not (ck / "model.safetensors.index.json").exists():
        write_synthetic(preset("flash", n_layers=layers, n_routed_experts=experts), ck, seed=0, progress=False)
    out = {"experts": experts, "layers": layers, "ckpt_bytes": ckpt_bytes(ck), "modes": {}}
    for mode in ("packed", "int8"):
        art = work / f"art-{ck.name}-{mode}"
        if not (art / "manifest.json").exists():
            measure([*CLI, "export", str(ck), "--target", "ort-cpu", "--out", str(art), "--force", "--no-progress",
                     "--no-quant-sim", "--experts", mode, "--max-seq-len", "4096"])  # not the config's 1M
        man = json.loads((art / "manifest.json").read_text())
        p = subprocess.run([sys.executable, "-c", DECODE, str(art), str(steps)], capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("@@")), None)
        if line is None:
            raise SystemExit(p.stderr[-4000:])
        r = json.loads(line[2:])
        w = man["files"]["weights.data"]["bytes"]
        out["modes"][mode] = {"weights_bytes": w, "ratio": w / out["ckpt_bytes"], "prefill_s": r["prefill_s"],
                              "step_s": sorted(r["step_s"])[len(r["step_s"]) // 2], "steps": r["step_s"]}
    return out


def run_tiny(work: Path) -> dict:
    return measure([*CLI, "export", "--preset", "tiny", "--out", str(work / "art-tiny"), "--force", "--no-progress"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("slices", "decode", "tiny"))
    ap.add_argument("--slice", action="append", default=[], help="PRESET:LAYERS[:sparse][:mtp][:keep], e.g. flash:2")
    ap.add_argument("--experts-mode", default="packed", choices=("packed", "int8"))
    ap.add_argument("--experts", type=int, default=8, help="decode: routed experts of the Flash-shaped model")
    ap.add_argument("--layers", type=int, default=1, help="decode: layers of the Flash-shaped model")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", default="/tmp/dsv4-export-flash")
    ap.add_argument("--perf", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rpath = work / "results.json"
    results = json.loads(rpath.read_text()) if rpath.exists() else {}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    results["date"] = time.strftime("%Y-%m-%d")
    if a.what == "slices":
        got = {s: run_slice(work, s, a.experts_mode) for s in a.slice}
        results.setdefault("slices", {}).update({f"{k}/{a.experts_mode}": v for k, v in got.items()})
    elif a.what == "decode":
        results["decode"] = run_decode(work, a.experts, a.layers, a.steps)
    else:
        results["tiny"] = run_tiny(work)
    rpath.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    if a.perf:
        from export_flash_report import write_perf

        write_perf(Path(a.perf), results)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
