"""TVM beside eager PyTorch and ONNX Runtime in one run: compile time, prefill tokens/s, decode-step latency at
batch 1, and parity with the eager model. Results go to docs/PERF.md (a marked section; others are kept).

Issue [5]: tvm-llvm beside eager and ORT-CPU for the `small` preset (the GPU benchmark is
benchmarks/gpu_check.py, run by tools/gpu_check.sh):

    .venv/bin/python benchmarks/bench_tvm.py [--preset small] [--prefill 256 1024] [--decode-steps 32]

Artifacts: one synthetic checkpoint (seed 0) and one export per runtime family, cached in --workdir: ORT runs
an ort-cpu export with its pass pipeline (QMoE etc.); TVM runs a tvm-llvm export (lowered dsv4 ops kept as nodes,
the fused MoE inlined to routing + the MoEExperts kernel). Each side is timed alone, with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from _common import add_common_args, machine, ratio, update_section

from dsv4.runtimes.bench import eager_side, export_family, generator, runtime_side, sweep, tvm_library

SECTIONS = {"cpu": ("bench_tvm", "## TVM (llvm) beside eager and ONNX Runtime CPU (issue [5])")}
BACKENDS = ("eager", "ort-cpu", "tvm-llvm")


def artifacts(a, args, work: Path, backends) -> tuple[Path, dict[str, Path], dict[str, float]]:
    """(checkpoint, {family: artifact}, export seconds); family "ort" = ort-cpu export, "tvm" = tvm-llvm export."""
    from dsv4.models.checkpoint_write import write_synthetic

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        write_synthetic(args, ckpt, seed=0, progress=False, overwrite=True)
    want = {"ort"} if "ort-cpu" in backends else set()
    want |= {"tvm"} if "tvm-llvm" in backends else set()
    arts, secs = {}, {}
    for fam in sorted(want):
        art = work / f"art-{fam}-{a.weights}-{'qs' if a.quant_sim else 'noqs'}"
        if not (art / "manifest.json").is_file():
            secs[fam] = export_family(ckpt, art, fam, weights=a.weights, quant_sim=a.quant_sim,
                                      max_seq_len=args.max_seq_len)
        arts[fam] = art
    return ckpt, arts, secs


def runtime(backend: str, arts: dict[str, Path], work: Path, threads: int):
    """(generator, compile seconds or None) for one backend."""
    if backend == "ort-cpu":
        return generator(backend, arts["ort"], threads), None
    out = work / f"compiled-{backend}-{arts['tvm'].name}"
    secs = tvm_library(arts["tvm"], out, backend)
    return generator(backend, arts["tvm"], threads, compiled=out), secs


def measure(side, prefills, steps: int, repeat: int, vocab: int) -> dict:
    """Prefill tokens/s at each length and the decode step after a prompt of the shortest (dsv4.runtimes.bench)."""
    r = sweep(*side, prefills, [min(prefills)], steps, repeat, vocab)
    out = {f"prefill {n} tokens (tokens/s)": v for n, v in zip(prefills, r["prefill_tokens_per_s"])}
    out["decode step, batch 1 (ms)"] = r["decode_ms"][0]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["eager", "ort-cpu", "tvm-llvm"], choices=BACKENDS)
    p.add_argument("--weights", default="packed", help="packed (as shipped) or float32")
    p.add_argument("--no-quant-sim", dest="quant_sim", action="store_false")
    p.add_argument("--parity-steps", type=int, default=16, help="greedy steps of the parity run (0: no parity)")
    p.add_argument("--parity-prompt", type=int, default=300)
    p.add_argument("--section", default="cpu", choices=tuple(SECTIONS))
    p.add_argument("--json", help="also write the raw numbers here")
    add_common_args(p, [256, 1024], 32, 3)
    a = p.parse_args(argv)

    import tempfile

    from dsv4.models.checkpoint import load_model
    from dsv4.models.config import preset
    from dsv4.runtimes.parity import run_parity

    args = preset(a.preset)
    threads = a.threads
    torch.set_num_threads(threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # read when TVM's thread pool starts (first run)
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-tvm-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt, arts, export_s = artifacts(a, args, work, a.backends)
        model = load_model(ckpt, keep_quantized=a.weights == "packed", quant_sim=a.quant_sim,
                           max_seq_len=args.max_seq_len, progress=False).eval()
        results: dict[str, dict] = {}
        for b in a.backends:
            if b == "eager":
                results[b] = measure(eager_side(model), a.prefill, a.decode_steps, a.repeat, args.vocab_size)
            else:
                gen, compile_s = runtime(b, arts, work, threads)
                results[b] = measure(runtime_side(gen), a.prefill, a.decode_steps, a.repeat, args.vocab_size)
                if compile_s is not None:
                    results[b]["compile both graphs (s)"] = compile_s
                if a.parity_steps:
                    fam = "ort" if b == "ort-cpu" else "tvm"
                    rep = run_parity(arts[fam], model=model, steps=a.parity_steps, prompt_len=a.parity_prompt,
                                     backend="tvm" if b.startswith("tvm") else "ort", threads=threads,
                                     # ORT: parity's own Generator, whose state has the eager model's capacity (the
                                     # bench's grows from the prompt: states would not compare row by row)
                                     generator=gen if b.startswith("tvm") else None)
                    lg = next(r for r in rep.rows if r.name == "prefill.logits")
                    results[b]["parity"] = {"max abs Δ prefill logits": lg.max_abs,
                                            "max abs Δ any output / state": max(r.max_abs for r in rep.rows),
                                            "top-1 vs eager": rep.top1,
                                            "greedy vs eager": f"{rep.greedy_agree}/{rep.greedy_steps}"}
                    v = rep.vs_fp64  # calibrated tolerances: both against the eager model's fp64 twin
                    if v:
                        results[b]["parity"] |= {"top-1 vs fp64 twin (eager / artifact)":
                                                 f"{v['eager top-1']:.2f} / {v['artifact top-1']:.2f}",
                                                 "greedy vs fp64 twin (eager / artifact)":
                                                 f"{v['eager greedy']:.2f} / {v['artifact greedy']:.2f}"}
                    results[b]["parity"]["ok"] = rep.ok
                del gen
            print(b, json.dumps(results[b], default=float), flush=True)
    md = render(a, args, results, threads, export_s)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "export_s": export_s}, indent=2, default=float))
    if a.out != "-":
        tag, _ = SECTIONS[a.section]
        update_section(Path(a.out), md, tag)
    return 0


def render(a, args, results: dict, threads: int, export_s: dict) -> str:
    tag, title = SECTIONS[a.section]
    where = machine(threads)
    cols = list(results)
    lines = [title, "",
             f"`benchmarks/bench_tvm.py --preset {a.preset}`: {args.n_layers} layers, dim {args.dim}, "
             f"{args.n_routed_experts} experts, max_seq_len {args.max_seq_len}; synthetic checkpoint seed 0, weights "
             f"{a.weights}, quant_sim {'on' if a.quant_sim else 'off'}, fp32. {where}"
             + ("; export " + ", ".join(f"{k} {v:.0f} s" for k, v in export_s.items()) if export_s else "") + ".",
             "", "| measurement | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    rows = [k for k in results[cols[0]] if k != "parity"]
    rows += [k for c in cols for k in results[c] if k not in rows and k != "parity"]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(_fmt(results[c].get(r)) for c in cols) + " |")
    for ref in (c for c in ("eager", "ort-cpu") if c in cols):  # ratio rows: each runtime against eager / ORT
        for r in (r for r in rows if r.endswith(("(tokens/s)", "(ms)"))):
            cells = ["–" if c in (ref, "eager") or not results[c].get(r) or not results[ref].get(r)
                     else ratio(results[c][r], results[ref][r], r.endswith("(tokens/s)")) for c in cols]
            if any(x != "–" for x in cells):
                lines.append(f"| {r.rsplit(' (', 1)[0]}, vs {ref} | " + " | ".join(cells) + " |")
    par = [c for c in cols if "parity" in results[c]]
    if par:
        keys = list(results[par[0]]["parity"])
        lines += ["", f"Parity with the eager model ({a.parity_prompt}-token prompt, {a.parity_steps} greedy steps; "
                  "tolerances: runtimes/parity.py):", "", "| | " + " | ".join(par) + " |", "|---|" + "---:|" * len(par)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(results[c]["parity"][k]) for c in par) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "pass" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


if __name__ == "__main__":
    raise SystemExit(main())
