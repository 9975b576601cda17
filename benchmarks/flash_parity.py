"""Benchmark: decode parity of an exported Flash-shaped slice vs the eager model (issue [9], acceptance), in bounded
memory: the eager side and the artifact side never share a process.

    .venv/bin/python benchmarks/flash_parity.py run --checkpoint CK --work /work/flash16 [--mode packed --mode float32]
    .venv/bin/python benchmarks/flash_parity.py report --work /work/flash16 [--out docs/PERF.md]

``CK`` is ``dsv4 checkpoint make --preset flash --layers 2`` (real data, Flash dimensions). Modes:

* ``packed``: the default export (packed FP8/MXFP4, the quantisation simulation on), judged by the calibrated verdict
  of runtimes/parity.py (TOLERANCES[("float32", True)]: noise twins, fp64-twin driving tokens).
* ``nosim``: the default packed weights with ``--no-quant-sim``, judged strictly (TOLERANCES[("float32", False)]):
  the graph dequantises the checkpoint's MXFP4/FP8 bytes exactly in fp32, as the eager model does; the whole slice.
* ``float32``: ``--weights float32 --no-quant-sim``, judged strictly (TOLERANCES[("float32", False)]). A float32
  Flash layer is ~26 GB of dequantised routed experts: ``--float-layers`` (default 1) slices the same checkpoint.
* ``cuda-packed``: ``--target ort-cuda`` with its defaults (packed, --experts packed, the simulation on), run by ORT's
  CPU EP (every op of the ort-cuda graphs has a CPU kernel; the CUDA kernels need tools/gpu_check.sh), judged as
  ``packed``; the eager side is the same as packed's (copy packed/twin.npz and reference.pkl to skip rerunning it).

Per mode, each a child process measured by ``_common.measure`` (peak RSS = ru_maxrss of that child):

1. ``dsv4 export CK --target ort-cpu --max-seq-len M`` (cuda-packed: ort-cuda; skipped when the artifact is there);
2. calibrated mode only, ``twin``: the eager model made float64 in place (what ``fp64_twin`` computes, without the
   deep copy that would hold both models: ~9 GB each at Flash dims) runs the prompt and the decode steps; its logits
   are saved;
3. ``eager``: the eager fp32 model computes ``eager_reference`` (prefill, teacher-forced steps, noise twins); the
   fp64 twin there replays the logits of step 2 (checked token by token against the ones it is fed); the Reference
   is pickled. In float32 mode the eager model keeps its MXFP4/FP8 weights packed and dequantises them on the fly
   (exactly the values of the float32 export's dequantised weights: an E2M1 code x an E8M0 scale is exact in fp32);
   the float model would hold 26 GB per layer;
4. ``artifact``: ``run_parity(ART, reference=..., providers=["CPUExecutionProvider"])``; the report (rows, agreement, times) is saved.

``--mutant NAME`` (norm, kv_norm, sinkhorn; repeatable): after a mode's verdict, that edit of its artifact
(tests/mutants.py ``make_linked``: graph files copied and edited, the weights file hard-linked, seconds and no disk)
is judged by a further artifact child against the same reference; it must FAIL (the check can fail at real size).

Results: --work/results.json; ``report`` (also run at the end of ``run`` unless --out -) writes the marked section
``flash_parity`` of docs/PERF.md (benchmarks/flash_parity_report.py). Child logs: --work/<mode>/<stage>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

from _common import measure
from flash_parity_report import load_results, report, save_results, say

HERE = Path(__file__).resolve()
CLI = [sys.executable, "-m", "dsv4.tools.cli"]
MODES = {"packed": [], "nosim": ["--no-quant-sim"], "float32": ["--weights", "float32", "--no-quant-sim"],
         "cuda-packed": ["--target", "ort-cuda"]}  # the ort-cuda default (--experts packed), run by the CPU EP


def log_to(path: str | None) -> None:
    """Send this child's stderr (the stage lines of runtimes/parity.py) to `path`."""
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        sys.stderr = os.fdopen(2, "w", buffering=1)


# ---- children -----------------------------------------------------------------------------------------------------
def load_eager(man: dict, ck: str, layers: int | None):
    """The eager model of the artifact's manifest: ``eager_model`` for a packed artifact of the whole checkpoint; a
    float artifact or a --layers slice: the same overrides, weights kept packed, the checkpoint cut to `layers`."""
    import torch

    from dsv4.runtimes.eager import eager_model

    if man["weights"] == "packed" and layers is None:
        return eager_model(man, ck)
    from dsv4.export.weights import first_layers
    from dsv4.models import checkpoint as ckmod
    from dsv4.models.config import SIM_SWITCHES

    cfg = man["config"]
    overrides = {"max_seq_len": cfg["max_seq_len"], "quant_sim": cfg["quant_sim"]}
    overrides |= {f: cfg[f] for f in SIM_SWITCHES.values() if cfg.get(f) is not None}
    if cfg.get("compact_state") is not None:
        overrides["compact_state"] = cfg["compact_state"]
    if layers is not None:
        base = ckmod.Checkpoint

        class Cut(base):  # load_model's Checkpoint, forgetting the layers >= `layers` (export's --layers)
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.first_layers(layers)

        overrides |= first_layers(json.loads((Path(ck) / "config.json").read_text()), layers)
        ckmod.Checkpoint = Cut
    try:
        return ckmod.load_model(ck, dtype=getattr(torch, man["dtype"]), keep_quantized=True, progress=False,
                                **overrides)
    finally:
        if layers is not None:
            ckmod.Checkpoint = base


def child_start(a):
    """Both eager children's start: stderr to a.log, a.threads, the artifact's manifest, the eager model (+ seconds)."""
    import torch

    from dsv4.export.artifact import load_manifest

    log_to(a.log)
    torch.set_num_threads(a.threads)
    man = load_manifest(a.art, verify=False)
    t = time.perf_counter()
    return man, load_eager(man, a.checkpoint, a.layers), time.perf_counter() - t


def child_twin(a) -> None:
    """The fp64 twin's prefill and greedy decode (eager_reference's calibrated token loop), logits saved."""
    import numpy as np
    import torch

    man, m, load_s = child_start(a)
    m.to(torch.float64)  # fp64_twin(m) without its deep copy: same conversion of the same weights
    m.dtype = torch.float64
    m.eval()
    cfg = man["config"]
    ids = torch.randint(0, cfg["vocab_size"], (1, a.prompt_len), generator=torch.Generator().manual_seed(a.seed))
    t = time.perf_counter()
    with torch.no_grad():
        l64, s64 = m(ids)
        pre = l64.numpy()
        sys.stderr.write(f"twin prefill {time.perf_counter() - t:.1f} s\n")
        tok = l64[:, -1:].argmax(-1)
        toks, steps = [], []
        for k in range(a.steps):
            toks.append(tok.numpy())
            l64, s64 = m(tok, s64)
            steps.append(l64.numpy())
            tok = l64[:, -1:].argmax(-1)
            sys.stderr.write(f"twin step {k + 1}/{a.steps} {time.perf_counter() - t:.1f} s\n")
    np.savez(a.result, ids=ids.numpy(), prefill=pre, steps=np.stack(steps), tokens=np.stack(toks),
             seconds=np.array([load_s, time.perf_counter() - t]))


class Replay:
    """Stands in for ``fp64_twin(model)`` inside ``eager_reference``: returns the logits the twin child computed,
    after checking that it is fed the same prompt and tokens."""

    def __init__(self, z):
        self.z, self.i = z, 0

    def __call__(self, x, state=None):
        import numpy as np
        import torch

        x = x.cpu().numpy()
        want = self.z["ids"] if self.i == 0 else self.z["tokens"][self.i - 1]
        if not np.array_equal(x, want):
            raise SystemExit(f"twin replay: call {self.i} fed {x.ravel()[:8]}, the twin child saw {want.ravel()[:8]}")
        out = self.z["prefill"] if self.i == 0 else self.z["steps"][self.i - 1]
        self.i += 1
        return torch.from_numpy(out), None


def child_eager(a) -> None:
    import numpy as np

    from dsv4.export.artifact import stage_printer
    from dsv4.runtimes import eager

    man, m, load_s = child_start(a)
    if a.twin:
        z = dict(np.load(a.twin))
        eager.fp64_twin = lambda model: Replay(z)
    with stage_printer(True) as stage:
        ref = eager.eager_reference(m, man, steps=a.steps, prompt_len=a.prompt_len, seed=a.seed, stage=stage)
    ref.seconds["eager load"] = load_s
    with open(a.result, "wb") as f:
        pickle.dump(ref, f, protocol=pickle.HIGHEST_PROTOCOL)


def rss_guard(limit_gb: float) -> None:
    """Exit (code 3) as soon as this process's anonymous resident memory passes `limit_gb`: the box is shared and
    has no swap; the kernel's OOM killer would otherwise pick this child only after squeezing everyone else."""
    import re
    import threading

    def watch():
        peak = 0
        while True:
            kb = int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
            peak = max(peak, kb)
            if kb > limit_gb * 1e6:
                sys.stderr.write(f"\nRSS GUARD: anonymous RSS {kb / 1e6:.1f} GB > {limit_gb} GB: stopped\n")
                sys.stderr.flush()
                os._exit(3)
            time.sleep(0.2)
    threading.Thread(target=watch, daemon=True).start()


def child_artifact(a) -> None:
    from dataclasses import asdict

    from dsv4.runtimes.parity import plain_lines, run_parity

    log_to(a.log)
    if a.rss_limit_gb:
        rss_guard(a.rss_limit_gb)
    with open(a.reference, "rb") as f:
        ref = pickle.load(f)
    rep = run_parity(a.art, reference=ref, threads=a.threads, verify=False, progress=True,
                     providers=["CPUExecutionProvider"])  # an ort-cuda artifact too: its ops have CPU kernels
    out = asdict(rep) | {"ok": rep.ok, "greedy": rep.greedy, "agreement_failures": rep.agreement_failures(),
                         "lines": plain_lines(rep)}
    Path(a.result).write_text(json.dumps(out, indent=1, default=float))
    sys.stderr.write("\n".join(out["lines"]) + "\n")


# ---- driver -------------------------------------------------------------------------------------------------------
def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def launch(a, res: dict, work: Path, mode: str, stage: str, cmd: list[str]) -> None:
    """Run one child (`stage` of `mode`) under nice, measured; its wall time and peak RSS go to results.json."""
    say(f"{mode}: {stage}: {' '.join(cmd[3:]) if cmd[:3] == CLI else 'child, log ' + str(work / mode / stage)}")
    r = res[mode]
    r[stage] = measure(["nice", "-n", str(a.nice), *cmd])
    say(f"{mode}: {stage} done: {r[stage]['wall_s']:.0f} s, peak RSS {r[stage]['rss_kb'] / 1e6:.2f} GB")
    save_results(work, res)


def run_mutant(a, res: dict, work: Path, mode: str, art: Path, refp: Path, name: str) -> None:
    """Mutant `name` of the mode's artifact (tests/mutants.py LINKABLE: graph files edited, the weights file
    hard-linked) judged against the same eager reference: it must FAIL; its verdict goes to results.json."""
    import shutil

    sys.path.insert(0, str(HERE.parent.parent / "tests"))
    from mutants import LINKABLE, make_linked

    d = work / mode / f"mutant-{name}"
    shutil.rmtree(d, ignore_errors=True)
    make_linked(art, d / "art", name)
    rep_path = d / "report.json"
    launch(a, res, work, mode, f"mutant-{name}", [
        sys.executable, str(HERE), "artifact", "--art", str(d / "art"), "--reference", str(refp), "--threads",
        str(a.threads), "--result", str(rep_path), "--log", str(d / "artifact.log"), "--rss-limit-gb",
        str(a.rss_limit_gb)])
    rep = json.loads(rep_path.read_text())
    r = res[mode]
    r.setdefault("mutants", {})[name] = {
        "edit": LINKABLE[name][0], "verdict": "PASS" if rep["ok"] else "FAIL", "summary": rep["lines"][-1],
        "problems": [x[len("problem: "):] for x in rep["lines"] if x.startswith("problem: ")]}
    shutil.rmtree(d / "art")  # graph copies and hard links: the report and the log stay
    save_results(work, res)
    say(f"{mode}: mutant {name}: {r['mutants'][name]['verdict']}" + (" -- A MUTANT PASSED" if rep["ok"] else ""))


def run(a) -> None:
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ck = str(Path(a.checkpoint).resolve())
    res = load_results(work)
    for mode in a.mode or ["packed", "float32"]:
        d = work / mode
        d.mkdir(exist_ok=True)
        r = res.setdefault(mode, {})
        layers = a.float_layers if mode == "float32" else None
        art = d / "art"
        r.update({"steps": a.steps, "prompt_len": a.prompt_len, "seed": a.seed, "threads": a.threads,
                  "layers": layers, "max_seq_len": a.max_seq_len})
        if not (art / "manifest.json").exists():
            launch(a, res, work, mode, "export", [
                *CLI, "export", ck, "--target", "ort-cpu", "--out", str(art), "--max-seq-len", str(a.max_seq_len),
                "--no-progress", "--force", *MODES[mode], *(["--layers", str(layers)] if layers else [])])  # a mode's
                # own --target comes later and wins (argparse keeps the last)
        r["artifact_bytes"] = dir_bytes(art)
        man = json.loads((art / "manifest.json").read_text())
        r["weights"] = man["weights"]
        from dsv4.runtimes.verdict import tolerance_for

        calibrated = tolerance_for(man)[1].noise_factor is not None  # the verdict's own rule: the fp64 twin needed
        common = ["--art", str(art), "--checkpoint", ck, "--steps", str(a.steps), "--prompt-len", str(a.prompt_len),
                  "--seed", str(a.seed), "--threads", str(a.threads), *(["--layers", str(layers)] if layers else [])]
        twin = d / "twin.npz"
        if calibrated and not twin.exists():
            launch(a, res, work, mode, "twin", [sys.executable, str(HERE), "twin", *common, "--result", str(twin),
                                                "--log", str(d / "twin.log")])
        refp = d / "reference.pkl"
        if not refp.exists():
            launch(a, res, work, mode, "eager", [sys.executable, str(HERE), "eager", *common, "--result", str(refp),
                                                 "--log", str(d / "eager.log"),
                                                 *(["--twin", str(twin)] if calibrated else [])])
        repp = d / "report.json"
        if not repp.exists():
            try:
                launch(a, res, work, mode, "artifact", [
                    sys.executable, str(HERE), "artifact", "--art", str(art), "--reference", str(refp), "--threads",
                    str(a.threads), "--result", str(repp), "--log", str(d / "artifact.log"), "--rss-limit-gb",
                    str(a.rss_limit_gb)])
            except SystemExit as e:  # the child failed (e.g. the RSS guard): recorded, the next mode still runs
                r["artifact_failed"] = {"error": str(e), "log_tail": (d / "artifact.log").read_text()[-600:]}
                save_results(work, res)
                say(f"{mode}: artifact child FAILED: {r['artifact_failed']['log_tail'].strip()[-300:]}")
                continue
            r.pop("artifact_failed", None)
        rep = json.loads(repp.read_text())
        r["verdict"] = "PASS" if rep["ok"] else "FAIL"
        r["weights"], r["tolerance_key"] = man["weights"], rep["tolerance_key"]
        save_results(work, res)
        say(f"{mode}: {r['verdict']}\n" + "\n".join(rep["lines"]))
        for name in a.mutant or []:
            run_mutant(a, res, work, mode, art, refp, name)
        if a.drop_artifact:
            import shutil

            shutil.rmtree(art)
            say(f"{mode}: removed {art}")
    if a.out != "-":
        report(a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--mode", action="append", choices=list(MODES))
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--prompt-len", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--max-seq-len", type=int, default=4096)
    r.add_argument("--float-layers", type=int, default=1)
    r.add_argument("--nice", type=int, default=5)
    r.add_argument("--rss-limit-gb", type=float, default=14.0,
                   help="the artifact child stops past this anonymous RSS (the box has no swap)")
    r.add_argument("--drop-artifact", action="store_true", help="delete each artifact after its parity run")
    r.add_argument("--mutant", action="append", choices=["norm", "kv_norm", "sinkhorn"],
                   help="also judge this edit of the artifact (tests/mutants.py LINKABLE; weights hard-linked) "
                        "against the same reference: it must FAIL")
    r.add_argument("--out", default="docs/PERF.md")
    r.set_defaults(fn=run)
    rp = sub.add_parser("report")
    rp.add_argument("--work", required=True)
    rp.add_argument("--out", default="docs/PERF.md")
    rp.add_argument("--note", nargs=2, action="append", metavar=("MODE", "TEXT"),
                    help="add a note under the tables (kept in results.json)")
    rp.set_defaults(fn=report)
    for name, fn in (("twin", child_twin), ("eager", child_eager)):
        c = sub.add_parser(name)
        for o in ("--art", "--checkpoint", "--result"):
            c.add_argument(o, required=True)
        c.add_argument("--steps", type=int, required=True)
        c.add_argument("--prompt-len", type=int, required=True)
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--threads", type=int, default=1)
        c.add_argument("--layers", type=int)
        c.add_argument("--twin")
        c.add_argument("--log")
        c.set_defaults(fn=fn)
    c = sub.add_parser("artifact")
    for o in ("--art", "--reference", "--result"):
        c.add_argument(o, required=True)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--log")
    c.add_argument("--rss-limit-gb", type=float, default=14.0, help="stop the child past this anonymous RSS (0: off)")
    c.set_defaults(fn=child_artifact)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
