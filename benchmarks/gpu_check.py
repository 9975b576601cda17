"""The GPU check (issue [7]), driven by ``tools/gpu_check.sh``: tiny and a Flash-shaped slice, exported in the
deployed configuration (packed FP8/MXFP4 weights, the quantisation simulation on, fp32) for ort-cuda and tvm-cuda,
then on the GPU: parity against the eager model (on the GPU too when torch has CUDA), decode ms per step at batch 1
and 8, prefill tokens/s at 1K and 8K, and decode against the HBM roofline (active bytes per step / measured device
bandwidth). Prints (and with --out, writes) the markdown section ``gpu_check`` of docs/PERF.md.

    python benchmarks/gpu_check.py [--dry-run] [--models tiny flash4] [--backends ort-cuda tvm-cuda] [--workdir W]
    python benchmarks/gpu_check.py --models flash4 --backends ort-cuda ort-cuda-int8   # --experts, side by side

Phases: plan (configs, active bytes) -> CPU (synthetic checkpoint, exports, lint, tvm-cuda compile to CUDA source
and PTX; jobs in parallel processes) -> GPU (bandwidth, eager reference, per backend: parity and timings).
``--dry-run`` runs everything before the first GPU call and renders the section with the GPU cells empty.
Everything under --workdir is reused when its configuration matches (a changed flag rebuilds only what it
changes). Backend ``ort-cuda-int8`` (not in the default set) is the ort-cuda export with ``--experts int8``: run next
to ``ort-cuda`` (``--experts packed``, the default) it measures the two expert encodings' decode speed on the GPU,
the measurement ``--experts``' default on ort-cuda waits for (docs/export.md "Real size").

The Flash slice keeps every per-token dimension of the released Flash (dim 4096, 64 heads of 512, q/o ranks,
window 128, index top-k 512, expert width 2048, 6 routed + 1 shared expert per token, vocab 129,280) and its first
--flash-layers layers (4: window, window, CSA, HCA; hash routing in the first three, learned in the fourth), with
--flash-experts routed experts per layer (default 64 of 256). Decode at batch 1 reads 6 experts per layer whatever
the count, so the count changes the weights on disk and the export time, not the work per token: at 256 the
checkpoint is 18.6 GiB and the two artifacts would not fit the check machine's disk next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import step_times, timed, update_section  # noqa: E402
from gpu_report import TAG, TITLE, active_bytes, gpu_name, render  # noqa: E402,F401 - TITLE: tests read it here

BACKENDS = ("ort-cuda", "tvm-cuda")  # the default set
# backend -> (target, --experts): what `dsv4 export` each backend's artifact is
EXPORTS = {"ort-cuda": ("ort-cuda", None), "ort-cuda-int8": ("ort-cuda", "int8"), "tvm-cuda": ("tvm-cuda", None)}
MODELS = ("tiny", "flash4")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- plan ---------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    name: str
    args: object  # ModelArgs
    work: Path
    export_s: dict = field(default_factory=dict)

    @property
    def ckpt(self) -> Path:
        return self.work / "ckpt"

    def art(self, backend: str) -> Path:
        return self.work / backend

    @property
    def lib(self) -> Path:
        return self.work / "tvm-cuda-lib"


def model_args(name: str, a):
    from dsv4.models.config import preset

    need = max(max(a.prefill), a.decode_context, a.parity_prompt) + max(a.decode_steps, a.parity_steps)
    if a.max_seq_len is not None and a.max_seq_len < need:
        raise SystemExit(f"--max-seq-len {a.max_seq_len}: the timings and parity need {need} positions")
    cap = a.max_seq_len or -(-need // 128) * 128
    if name == "tiny":
        return preset("tiny", max_seq_len=cap)
    if name == "flash4":
        return preset("flash", n_layers=a.flash_layers, n_routed_experts=a.flash_experts, max_seq_len=cap)
    raise ValueError(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")


# ---- CPU phase: checkpoint, exports, lint, compile ---------------------------------------------------------------
def _matches(art: Path, backend: str, args) -> bool:
    from dsv4.export.experts import expert_mode

    try:
        man = json.loads((art / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    cfg = man.get("config", {})
    target, experts = EXPORTS[backend]
    return (man.get("target") == target and man.get("weights") == "packed" and cfg.get("quant_sim") is True
            and man.get("experts") == expert_mode(target, "packed", experts)
            and cfg.get("max_seq_len") == args.max_seq_len and cfg.get("dim") == args.dim
            and cfg.get("n_layers") == args.n_layers and cfg.get("n_routed_experts") == args.n_routed_experts)


def checkpoint_job(args, ckpt: str) -> float:
    """The synthetic checkpoint (seed 0) unless `ckpt` holds one of this config; seconds spent (0: reused)."""
    from dsv4.models.checkpoint_write import write_synthetic

    try:
        if json.loads((Path(ckpt) / "config.json").read_text()) == args.to_hf_config():
            return 0.0
    except (OSError, ValueError):
        pass
    t = time.perf_counter()
    write_synthetic(args, ckpt, seed=0, overwrite=True, progress=False)
    return time.perf_counter() - t


def export_job(ckpt: str, art: str, backend: str, max_seq_len: int) -> float:
    """One `dsv4 export CKPT --target T [--experts E] --max-seq-len N` (a worker process; otherwise the default
    configuration)."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.pipeline import run

    target, experts = EXPORTS[backend]
    t = time.perf_counter()
    export_artifact(art, checkpoint=ckpt, target=target, experts=experts, max_seq_len=max_seq_len, overwrite=True,
                    progress=False, transform=lambda model, graph, tgt: run(model, tgt.name))
    return time.perf_counter() - t


def compile_job(art: str, lib: str, arch: str) -> float:
    from dsv4.runtimes.tvm import compile_artifact

    t = time.perf_counter()
    compile_artifact(art, lib, target="tvm-cuda", arch=arch, overwrite=True, progress=False)
    return time.perf_counter() - t


def _lib_matches(plan: Plan, arch: str) -> bool:
    from dsv4.export.artifact import sha256

    try:
        cm = json.loads((plan.lib / "manifest.json").read_text())
        art = sha256(plan.art("tvm-cuda") / "manifest.json")
    except (OSError, ValueError):
        return False
    return cm.get("arch") == arch and cm.get("artifact", {}).get("manifest_sha256") == art \
        and set(cm.get("graphs", {})) == {"prefill", "decode"}


def lint(plan: Plan, backend: str) -> list[str]:
    """`dsv4 lint` of the artifact against its target's profile (passes/lint.py), when the target has one."""
    from dsv4.passes.lint import PROFILES, lint_artifact

    target = EXPORTS[backend][0]
    if target not in PROFILES:
        return []
    return [v.line() for v in lint_artifact(plan.art(backend), target=target).violations]


def _then(pool, before: Future, fn, *args) -> Future:
    """A future of `fn(*args)` submitted to `pool` once `before` has succeeded (its failure passes through)."""
    out: Future = Future()

    def relay(f: Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(f.result())

    def go(f: Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            pool.submit(fn, *args).add_done_callback(relay)

    before.add_done_callback(go)
    return out


def _done(value=0.0) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def submit_cpu(pool, p: Plan, backends: list[str], arch: str) -> dict[str, Future]:
    """The CPU work of one model as futures (checkpoint -> exports -> tvm-cuda compile), skipping what the workdir
    already holds in the right configuration."""
    log(f"{p.name}: {p.args.n_layers} layers, {p.args.n_routed_experts} experts: checkpoint, exports "
        f"({', '.join(backends)}){', compile' if 'tvm-cuda' in backends else ''} (what the workdir lacks)")
    ck = pool.submit(checkpoint_job, p.args, str(p.ckpt))
    jobs = {"checkpoint": ck}
    for b in backends:
        jobs[f"export {b}"] = _done() if _matches(p.art(b), b, p.args) else \
            _then(pool, ck, export_job, str(p.ckpt), str(p.art(b)), b, p.args.max_seq_len)
    if "tvm-cuda" in backends:
        jobs["compile tvm-cuda"] = _done() if _lib_matches(p, arch) and jobs["export tvm-cuda"].done() else \
            _then(pool, jobs["export tvm-cuda"], compile_job, str(p.art("tvm-cuda")), str(p.lib), arch)
    return jobs


def finish_cpu(p: Plan, jobs: dict[str, Future], backends: list[str]) -> dict:
    """Wait for one model's CPU work, lint its ORT artifacts; {what: seconds it took when it was built}."""
    for what, f in jobs.items():
        f.result()
        log(f"{p.name}: {what} ready")
    secs = {"checkpoint": jobs["checkpoint"].result()} if jobs["checkpoint"].result() else {}
    for b in backends:
        secs[f"export {b}"] = json.loads((p.art(b) / "manifest.json").read_text())["export_seconds"]["total"]
        problems = lint(p, b)
        if problems:
            raise SystemExit(f"{p.name}: the {b} artifact fails its lint:\n" + "\n".join(problems))
    if "tvm-cuda" in backends:
        cm = json.loads((p.lib / "manifest.json").read_text())
        secs["compile tvm-cuda"] = sum(v for g in cm["graphs"].values() for v in g["seconds"].values())
        ptx = [g.get("ptx") for g in cm["graphs"].values()]
        log(f"{p.name}: tvm-cuda library ready ({'PTX ' + ', '.join(map(str, ptx)) if all(ptx) else 'CUDA source'})")
    return secs


# ---- GPU phase ------------------------------------------------------------------------------------------------------
def device_bandwidth(nbytes: int = 1 << 31, repeat: int = 10) -> float:
    """Device memory bandwidth in bytes/s: a device-to-device copy of `nbytes` (read + write), median of `repeat`."""
    import tvm

    dev = tvm.cuda(0)
    a = tvm.runtime.empty((nbytes // 4,), "float32", dev)
    b = tvm.runtime.empty((nbytes // 4,), "float32", dev)
    a.copyto(b)
    dev.sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        a.copyto(b)
        dev.sync()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def eager_on_gpu(plan: Plan):
    """The eager model of the artifacts (packed weights, the simulation on) on the GPU when torch has CUDA."""
    import torch

    from dsv4.models.checkpoint import load_model

    model = load_model(plan.ckpt, keep_quantized=True, max_seq_len=plan.args.max_seq_len, progress=False).eval()
    if torch.cuda.is_available():
        return model.to("cuda"), f"eager on {torch.cuda.get_device_name(0)}"
    return model, "eager on the CPU (this torch has no CUDA)"


def generator(plan: Plan, backend: str):
    if EXPORTS[backend][0] == "ort-cuda":
        from dsv4.runtimes.ort import Generator

        return Generator(plan.art(backend), providers=["CUDAExecutionProvider"], verify=False)
    from dsv4.runtimes.tvm import Generator

    return Generator(plan.art(backend), compiled=plan.lib, target="tvm-cuda", verify=False)


def time_backend(gen, a, args, bw: float, experts: str | None = None) -> dict:
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for n in a.prefill:
        ids = rng.integers(0, args.vocab_size, (1, n), dtype=np.int64)
        out[f"prefill {n} tokens (tokens/s)"] = n / timed(lambda ids=ids: gen.prefill(ids), a.repeat)
    for b in a.batches:
        gen.prefill(rng.integers(0, args.vocab_size, (b, a.decode_context), dtype=np.int64))
        tok = np.ones((b, 1), dtype=np.int64)
        ms = statistics.median(step_times(lambda tok=tok: gen.step(tok), a.decode_steps)[1:]) * 1e3
        roof = active_bytes(args, b, a.decode_context, experts)["total"] / bw * 1e3
        out[f"decode step, batch {b} (ms)"] = ms
        out[f"decode, batch {b} (tokens/s)"] = b / ms * 1e3
        out[f"decode batch {b}: roofline ms / measured ms"] = roof / ms
    return out


def gpu_model(p: Plan, backends: list[str], a, bw: float, results: dict, notes: dict) -> None:
    """One model on the GPU: the eager reference once, then per backend parity and timings (into `results`)."""
    import torch

    from dsv4.export.artifact import load_manifest
    from dsv4.runtimes.parity import eager_reference, run_parity

    model, where = eager_on_gpu(p)
    notes[f"{p.name} eager"] = where
    log(f"{p.name}: eager reference ({a.parity_prompt}-token prompt + {a.parity_steps} steps, {where})")
    man = load_manifest(p.art(backends[0]), verify=False)
    ref = eager_reference(model, man, steps=a.parity_steps, prompt_len=a.parity_prompt)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for b in backends:
        log(f"{p.name}: {b}")
        gen = generator(p, b)
        rep = run_parity(p.art(b), reference=ref, generator=gen, backend="ort" if b.startswith("ort") else "tvm",
                         verify=False)
        r = time_backend(gen, a, p.args, bw, EXPORTS[b][1])
        lg = next(x for x in rep.rows if x.name == "prefill.logits")
        r |= {"parity vs eager": "pass" if rep.ok else "FAIL", "max |Δ| prefill logits": lg.max_abs,
              "greedy vs eager": f"{rep.greedy_agree}/{rep.greedy_steps}"}
        results[f"{p.name} {b}"] = r
        log(f"{p.name} {b}: " + json.dumps(r, default=float))
        del gen


def environment(backends: list[str], dry_run: bool) -> list[str]:
    """What this environment lacks for the GPU phase (one problem per line); in a dry run these are reported, not
    fatal, except what the CPU phase needs."""
    import onnxruntime as ort
    import torch
    import tvm

    log(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.cuda.is_available()}), "
        f"onnxruntime {ort.__version__} {ort.get_available_providers()}, tvm {tvm.__version__}, "
        f"nvcc {shutil.which('nvcc') or 'absent'}")
    missing = []
    if any(EXPORTS[b][0] == "ort-cuda" for b in backends) and "CUDAExecutionProvider" not in ort.get_available_providers():
        missing.append("onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu==1.32.0)")
    if "tvm-cuda" in backends and not shutil.which("nvcc") and os.environ.get("TVM_CUDA_COMPILE_MODE") == "nvcc":
        missing.append("TVM_CUDA_COMPILE_MODE=nvcc but no nvcc on the PATH")
    return missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="stop before the first GPU call")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(EXPORTS))
    p.add_argument("--workdir", default="out/gpu_check/work", help="checkpoints, artifacts and libraries (reused)")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--max-seq-len", type=int, help="state capacity of the exports (default: what the runs need)")
    p.add_argument("--flash-layers", type=int, default=4)
    p.add_argument("--flash-experts", type=int, default=64)
    p.add_argument("--prefill", type=int, nargs="+", default=[1024, 8192], help="prefill lengths timed (batch 1)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes timed")
    p.add_argument("--decode-context", type=int, default=1024, help="prompt length before the timed decode steps")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--parity-prompt", type=int, default=300)
    p.add_argument("--parity-steps", type=int, default=32)
    p.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                   help="export / compile processes in parallel")
    p.add_argument("--json", help="also write the raw numbers here")
    p.add_argument("--md", help="also write the markdown section here")
    p.add_argument("--out", default="-", help="markdown file whose gpu_check section is replaced ('-': print only)")
    a = p.parse_args(argv)

    work = Path(a.workdir)
    plans = [Plan(m, model_args(m, a), work / m) for m in a.models]
    missing = environment(a.backends, a.dry_run)
    for m in missing:
        log(("dry run, would fail on the GPU: " if a.dry_run else "") + m)
    if missing and not a.dry_run:
        return 2
    import multiprocessing as mp

    results: dict[str, dict] = {}
    notes: dict = {}
    secs: dict[str, dict] = {}

    def report() -> None:  # after every model, so that a timeout later keeps what was measured
        md = render(plans, a.backends, a, results, notes, secs, gpu_name())
        if a.md:
            Path(a.md).write_text(md)
        if a.json:
            Path(a.json).write_text(json.dumps({"results": results, "notes": notes, "seconds": secs}, indent=2,
                                               default=float))
        if a.out != "-":
            update_section(Path(a.out), md, TAG)

    # every model's CPU work is queued at once (the first model's first); each model goes to the GPU as soon as
    # its own artifacts are ready, while the next one is still exporting
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn")) as pool:
        queued = [submit_cpu(pool, p, a.backends, a.arch) for p in plans]
        for p, jobs in zip(plans, queued):
            secs[p.name] = finish_cpu(p, jobs, a.backends)
            if not a.dry_run:
                if "bandwidth GB/s" not in notes:
                    notes["bandwidth GB/s"] = device_bandwidth() / 1e9
                    log(f"device bandwidth (device-to-device copy): {notes['bandwidth GB/s']:,.0f} GB/s")
                gpu_model(p, a.backends, a, notes["bandwidth GB/s"] * 1e9, results, notes)
            report()
    if a.dry_run:
        log("dry run: stopped before the first GPU call (bandwidth, eager reference, runtime sessions)")
    print(render(plans, a.backends, a, results, notes, secs, gpu_name()))
    if a.out != "-":
        log(f"updated the {TAG} section of {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
