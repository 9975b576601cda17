"""The report of benchmarks/flash_parity.py: its results (--work/results.json) as the marked section
``flash_parity`` of docs/PERF.md (a verdict table and a timing table per mode)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from _common import update_section

GB = 1e9


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_results(work: Path) -> dict:
    p = work / "results.json"
    return json.loads(p.read_text()) if p.exists() else {}


def save_results(work: Path, res: dict) -> None:
    (work / "results.json").write_text(json.dumps(res, indent=1))


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
        "handed to `run_parity(ART, reference=...)`; the verdict's criteria are runtimes/verdict.py's (the benchmark changes none). "
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
    for mode, r in res.items():  # flash_parity.py --mutant: edits of the artifact, judged against the same reference
        for name, m in r.get("mutants", {}).items():
            why = "; ".join(m["problems"][:3]) if m["verdict"] == "FAIL" else "**it passed: the verdict missed it**"
            lines.append(f"- {mode}: mutant `{name}` ({m['edit']}, weights hard-linked, the same reference): "
                         f"**{m['verdict']}** ({why})")
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
