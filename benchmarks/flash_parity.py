"""Benchmark: decode parity of an exported Flash-shaped slice vs the eager model (issue [9], acceptance), in bounded
memory: the eager side and the artifact side never share a process.

    .venv/bin/python benchmarks/flash_parity.py run --checkpoint CK --work /work/flash16 [--mode packed --mode float32]
    .venv/bin/python benchmarks/flash_parity.py report --work /work/flash16 [--out docs/PERF.md]

``CK`` is ``dsv4 checkpoint make --preset flash --layers 2`` (real data, Flash dimensions). Modes:

* ``packed``: the default export (packed FP8/MXFP4, the quantisation simulation on), judged by the calibrated verdict
  of runtimes/parity.py (TOLERANCES[("float32", True)]: noise twins, fp64-twin driving tokens).
* ``float32``: ``--weights float32 --no-quant-sim``, judged strictly (TOLERANCES[("float32", False)]). A float32
  Flash layer is ~26 GB of dequantised routed experts: ``--float-layers`` (default 1) slices the same checkpoint.

Per mode, each a child process measured by ``_common.measure`` (peak RSS = ru_maxrss of that child):

1. ``dsv4 export CK --target ort-cpu --max-seq-len M`` (skipped when the artifact is there);
2. calibrated mode only, ``twin``: the eager model made float64 in place (what ``fp64_twin`` computes, without the
   deep copy that would hold both models: ~9 GB each at Flash dims) runs the prompt and the decode steps; its logits
   are saved;
3. ``eager``: the eager fp32 model computes ``eager_reference`` (prefill, teacher-forced steps, noise twins); the
   fp64 twin there replays the logits of step 2 (checked token by token against the ones it is fed); the Reference
   is pickled. In float32 mode the eager model keeps its MXFP4/FP8 weights packed and dequantises them on the fly
   (exactly the values of the float32 export's dequantised weights: an E2M1 code x an E8M0 scale is exact in fp32);
   the float model would hold 26 GB per layer;
4. ``artifact``: ``run_parity(ART, reference=...)`` on ORT CPU; the report (rows, agreement, times) is saved.

Results: --work/results.json; ``report`` (also run at the end of ``run`` unless --out -) writes the marked section
``flash_parity`` of docs/PERF.md. Child logs: --work/<mode>/<stage>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

from _common import measure, update_section

HERE = Path(__file__).resolve()
CLI = [sys.executable, "-m", "dsv4.tools.cli"]
GB = 1e9
MODES = {"packed": [], "float32": ["--weights", "float32", "--no-quant-sim"]}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def child_twin(a) -> None:
    """The fp64 twin's prefill and greedy decode (eager_reference's calibrated token loop), logits saved."""
    import numpy as np
    import torch

    from dsv4.export.artifact import load_manifest

    log_to(a.log)
    torch.set_num_threads(a.threads)
    man = load_manifest(a.art, verify=False)
    t = time.perf_counter()
    m = load_eager(man, a.checkpoint, a.layers)
    load_s = time.perf_counter() - t
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
    import torch

    from dsv4.export.artifact import load_manifest, stage_printer
    from dsv4.runtimes import eager

    log_to(a.log)
    torch.set_num_threads(a.threads)
    man = load_manifest(a.art, verify=False)
    t = time.perf_counter()
    m = load_eager(man, a.checkpoint, a.layers)
    load_s = time.perf_counter() - t
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
    rep = run_parity(a.art, reference=ref, threads=a.threads, verify=False, progress=True)
    out = asdict(rep) | {"ok": rep.ok, "greedy": rep.greedy, "agreement_failures": rep.agreement_failures(),
                         "lines": plain_lines(rep)}
    Path(a.result).write_text(json.dumps(out, indent=1, default=float))
    sys.stderr.write("\n".join(out["lines"]) + "\n")


# ---- driver -------------------------------------------------------------------------------------------------------
def load_results(work: Path) -> dict:
    p = work / "results.json"
    return json.loads(p.read_text()) if p.exists() else {}


def save_results(work: Path, res: dict) -> None:
    (work / "results.json").write_text(json.dumps(res, indent=1))


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


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
            cmd = [*CLI, "export", ck, "--target", "ort-cpu", "--out", str(art), "--max-seq-len", str(a.max_seq_len),
                   "--no-progress", "--force", *MODES[mode], *(["--layers", str(layers)] if layers else [])]
            say(f"{mode}: export: {' '.join(cmd[3:])}")
            r["export"] = measure(["nice", "-n", str(a.nice), *cmd])
            say(f"{mode}: export done: {r['export']['wall_s']:.0f} s, peak RSS {r['export']['rss_kb'] / 1e6:.2f} GB")
            save_results(work, res)
        r["artifact_bytes"] = dir_bytes(art)
        man = json.loads((art / "manifest.json").read_text())
        r["weights"] = man["weights"]
        calibrated = not (mode == "float32")
        common = ["--art", str(art), "--checkpoint", ck, "--steps", str(a.steps), "--prompt-len", str(a.prompt_len),
                  "--seed", str(a.seed), "--threads", str(a.threads), *(["--layers", str(layers)] if layers else [])]
        twin = d / "twin.npz"
        if calibrated and not twin.exists():
            say(f"{mode}: fp64 twin child (log {d / 'twin.log'})")
            r["twin"] = measure(["nice", "-n", str(a.nice), sys.executable, str(HERE), "twin", *common,
                                 "--result", str(twin), "--log", str(d / "twin.log")])
            say(f"{mode}: twin done: {r['twin']['wall_s']:.0f} s, peak RSS {r['twin']['rss_kb'] / 1e6:.2f} GB")
            save_results(work, res)
        refp = d / "reference.pkl"
        if not refp.exists():
            say(f"{mode}: eager reference child (log {d / 'eager.log'})")
            r["eager"] = measure(["nice", "-n", str(a.nice), sys.executable, str(HERE), "eager", *common,
                                  "--result", str(refp), "--log", str(d / "eager.log"),
                                  *(["--twin", str(twin)] if calibrated else [])])
            say(f"{mode}: eager done: {r['eager']['wall_s']:.0f} s, peak RSS {r['eager']['rss_kb'] / 1e6:.2f} GB")
            save_results(work, res)
        repp = d / "report.json"
        if not repp.exists():
            say(f"{mode}: artifact child (log {d / 'artifact.log'})")
            try:
                r["artifact"] = measure(["nice", "-n", str(a.nice), sys.executable, str(HERE), "artifact", "--art",
                                         str(art), "--reference", str(refp), "--threads", str(a.threads), "--result",
                                         str(repp), "--log", str(d / "artifact.log"), "--rss-limit-gb",
                                         str(a.rss_limit_gb)])
            except SystemExit as e:  # the child failed (e.g. the RSS guard): recorded, the next mode still runs
                r["artifact_failed"] = {"error": str(e), "log_tail": (d / "artifact.log").read_text()[-600:]}
                save_results(work, res)
                say(f"{mode}: artifact child FAILED: {r['artifact_failed']['log_tail'].strip()[-300:]}")
                continue
            r.pop("artifact_failed", None)
            say(f"{mode}: artifact done: {r['artifact']['wall_s']:.0f} s, "
                f"peak RSS {r['artifact']['rss_kb'] / 1e6:.2f} GB")
        rep = json.loads(repp.read_text())
        r["verdict"] = "PASS" if rep["ok"] else "FAIL"
        r["weights"], r["tolerance_key"] = man["weights"], rep["tolerance_key"]
        save_results(work, res)
        say(f"{mode}: {r['verdict']}\n" + "\n".join(rep["lines"]))
        if a.drop_artifact:
            import shutil

            shutil.rmtree(art)
            say(f"{mode}: removed {art}")
    if a.out != "-":
        report(a)


def _row(rep: dict, name: str) -> dict | None:
    return next((r for r in rep["rows"] if r["name"] == name), None)


def _q(row: dict | None, part: str) -> float | None:
    """p50 of a calibrated row's artifact quantiles (part="quantiles") or of its noise twins' (part="floor")."""
    return row[part].get("p50") if row and row[part] else None


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2g}"


def _timing(mode: str, r: dict, s: dict) -> str:
    def wr(k):
        x = r.get(k)
        return f"{x['wall_s']:.0f} s / {x['rss_kb'] / 1e6:.2f} GB" if x else "–"

    def sec(k, f):
        return f"{s[k]:{f}} s" if k in s else "–"
    return (f"| {mode} | {wr('export')} | {r.get('artifact_bytes', 0) / GB:.2f} GB | {wr('twin')} | {wr('eager')} | "
            f"{wr('artifact')} | {sec('artifact prefill', '.0f')} | {sec('artifact decode step', '.1f')} | "
            f"{sec('eager decode step', '.1f')} |")


def section(work: Path) -> str:
    res = load_results(work)
    lines = ["## Flash-slice decode parity (`benchmarks/flash_parity.py`, issue [9])", ""]
    lines.append(
        f"{time.strftime('%Y-%m-%d')}, x86_64, {os.cpu_count()} cores shared with other engineers' jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the report), CPU only. Checkpoint: `dsv4 checkpoint make --preset flash --layers "
        "2` (real data, Flash dimensions: dim 4096, 256 MXFP4 experts, vocab 129280). The eager side and the artifact "
        "side run in separate child processes (they do not fit in RAM together); the eager reference is pickled and "
        "handed to `run_parity(ART, reference=...)`; the verdict's criteria are runtimes/verdict.py's, unchanged. "
        "RSS = the child's peak resident set.")
    lines.append("")
    lines.append("| mode | layers | tolerance | prompt + steps | verdict | prefill logits max / p50 | decode logits max "
                 "/ p50 (noise p50) | worst state row | greedy (free running) | top-1 | vs fp64 twin (eager / "
                 "artifact greedy) |")
    lines.append("|---|---:|---|---|---|---:|---:|---|---:|---:|---:|")
    timing = ["", "| mode | export wall / RSS | artifact | fp64 twin wall / RSS | eager reference wall / RSS | "
              "artifact side wall / RSS | ORT prefill | ORT decode step | eager decode step |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in res.items():
        p = work / mode / "report.json"
        if not p.exists():
            why = "not run"
            if r.get("artifact_failed"):
                tail = r["artifact_failed"]["log_tail"]
                why = ("artifact side stopped: " + tail[tail.find("RSS GUARD"):].strip().splitlines()[0]
                       if "RSS GUARD" in tail else "artifact side failed: " + r["artifact_failed"]["error"][:80])
            lines.append(f"| {mode} ({r.get('weights')}) | {r.get('layers') or 2} | – | "
                         f"{r.get('prompt_len')} + {r.get('steps')} | **{why}** | | | | | | |")
            timing.append(_timing(mode, r, {}))
            continue
        rep = json.loads(p.read_text())
        pl, dl = _row(rep, "prefill.logits"), _row(rep, "decode.logits")
        states = [x for x in rep["rows"] if x["name"] not in ("prefill.logits", "decode.logits", "decode.free-running"
                                                                                                    " logits")]
        worst = max(states, key=lambda x: x["max_abs"], default=None)
        vs = rep.get("vs_fp64") or {}
        lines.append(
            f"| {mode} ({r.get('weights')}) | {r.get('layers') or 2} | {tuple(rep['tolerance_key'])} | "
            f"{rep['prompt']['length']} + {rep['prompt']['steps']} | **{'PASS' if rep['ok'] else 'FAIL'}** | "
            f"{_fmt(pl and pl['max_abs'])} / {_fmt(_q(pl, 'quantiles'))} | {_fmt(dl and dl['max_abs'])} / {_fmt(_q(dl, 'quantiles'))} "
            f"({_fmt(_q(dl, 'floor'))}) | {worst['name'] + ' ' + _fmt(worst['max_abs']) if worst else '–'} | "
            f"{rep['greedy_agree']}/{rep['greedy_steps']} | {rep['top1']:.0%} | "
            + (f"{vs.get('eager greedy', 0):.0%} / {vs.get('artifact greedy', 0):.0%}" if vs else "–") + " |")
        timing.append(_timing(mode, r, rep.get("seconds", {})))
    lines += timing
    lines.append("")
    lines += [f"- {mode}: {n}" for mode, r in res.items() for n in r.get("notes", [])]
    lines.append("")
    lines.append("Rows: max = the largest |artifact − eager| of any element; p50 = the median over positions of the "
                 "per-position max (calibrated mode; strict mode shows no quantiles); noise p50 = the noise twins'. "
                 "Every compared row with its criterion is in --work/<mode>/report.json (`lines`).")
    return "\n".join(lines)


def report(a) -> None:
    work = Path(a.work).resolve()
    if getattr(a, "note", None):
        res = load_results(work)
        for mode, text in a.note:
            res.setdefault(mode, {}).setdefault("notes", []).append(text)
        save_results(work, res)
    md = section(work)
    if a.out == "-":
        print(md)
    else:
        update_section(Path(a.out), md, "flash_parity")
        say(f"updated the flash_parity section of {a.out}")


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
