"""``dsv4 bench [CHECKPOINT | --preset tiny]``: eager PyTorch, ONNX Runtime CPU and TVM llvm side by side, in one run on
one machine: prefill tokens/s against prompt length and decode ms/token against context length (batch 1).

Writes OUT/bench.json (numbers, settings, machine, load average, versions), OUT/decode_latency.png and
OUT/prefill_throughput.png (tools/plots.py), and prints the table with each runtime's ratio to eager. The
checkpoint (a synthetic preset's, seed 0), the ort-cpu and tvm-llvm exports (with their pass pipelines, as
``dsv4 export`` writes them) and the TVM library are made in OUT and reused by the next run. The measuring code is
dsv4.runtimes.bench, shared with benchmarks/*.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

SIDES = ("eager", "ort", "tvm")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="eager vs ONNX Runtime CPU vs TVM llvm: prefill tokens/s and decode ms/token "
                                     "against length, JSON + PNG plots")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (official format); default: --preset tiny")
    p.add_argument("--preset", help="a synthetic checkpoint of this preset (seed 0), made in --out (default tiny)")
    p.add_argument("--artifact", help="an ort-cpu artifact of the checkpoint to measure on the ort side (default: "
                                      "exported into --out)")
    p.add_argument("--sides", default="eager,ort,tvm", help="comma-separated, of eager, ort, tvm (default all; tvm "
                                                            "compiles the graphs first: 1-1.5 minutes for tiny)")
    p.add_argument("--prefill-lengths", default="128,256,512", help="prompt lengths of the prefill timings (default 128,256,512)")
    p.add_argument("--contexts", default="128,256,512", help="context lengths of the decode timings (default 128,256,512)")
    p.add_argument("--steps", type=int, default=16, help="decode steps per context (the first one is dropped)")
    p.add_argument("--repeat", type=int, default=3, help="prefills per length (median, after a warm-up)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of each side (default 1: a shared 2-core box; benchmarks/_common.py)")
    p.add_argument("--out", default="out/bench", help="directory of bench.json, the plots and the reused exports")
    p.set_defaults(func=run)


def _ints(a: argparse.Namespace, flag: str) -> list[int]:
    text = getattr(a, flag.lstrip("-").replace("-", "_"))
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bench: {flag}: expected comma-separated positive integers, got {text!r}") from None
    bad = [v for v in vals if v <= 0]
    if not vals or bad:
        raise ValueError(f"bench: {flag}: lengths must be positive integers, got {text!r}")
    return sorted(set(vals))


def check_args(a: argparse.Namespace) -> dict:
    """Every argument checked before any work: one line naming the argument (exit 2)."""
    from dsv4.models.config import ModelArgs, preset

    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise ValueError(f"bench: --sides: {', '.join(map(repr, bad)) or 'empty'} is not one of {', '.join(SIDES)}")
    if a.checkpoint and a.preset:
        raise ValueError("bench: give either CHECKPOINT or --preset, not both")
    for flag, v, lo in (("--steps", a.steps, 2), ("--repeat", a.repeat, 1), ("--threads", a.threads, 1)):
        if v < lo:
            raise ValueError(f"bench: {flag}: must be at least {lo}, got {v}"
                             + (" (the first decode step is dropped)" if flag == "--steps" else ""))
    lengths, contexts = _ints(a, "--prefill-lengths"), _ints(a, "--contexts")
    if a.artifact and "ort" not in sides:
        raise ValueError("bench: --artifact is measured on the ort side, which --sides leaves out")
    man = _manifest(a.artifact) if a.artifact else None
    if a.checkpoint:
        args, source = ModelArgs.from_hf_config(a.checkpoint), {"checkpoint": str(a.checkpoint)}
        if man:  # the eager side must be the model the artifact was exported from
            from dsv4.runtimes.eager import check_identity

            try:
                check_identity(Path(a.checkpoint), (man.get("source") or {}).get("identity") or {})
            except ValueError as e:
                raise ValueError(f"bench: --artifact: {str(e).removeprefix('parity: ')}") from None
    else:
        args, source = preset(a.preset or "tiny"), {"preset": a.preset or "tiny", "seed": 0}
    cap = int(man["config"]["max_seq_len"]) if man else args.max_seq_len
    if max(lengths) > cap:
        raise ValueError(f"bench: --prefill-lengths: {max(lengths)} exceeds max_seq_len {cap}")
    if max(contexts) + a.steps > cap:
        raise ValueError(f"bench: --contexts: {max(contexts)} + {a.steps} steps exceed max_seq_len {cap}")
    return {"sides": [s for s in SIDES if s in sides], "prefill_lengths": lengths, "contexts": contexts,
            "args": args, "source": source, "max_seq_len": cap}


def _manifest(art: str) -> dict:
    try:
        man = json.loads((Path(art) / "manifest.json").read_text())
        int(man["config"]["max_seq_len"])
        return man
    except FileNotFoundError:
        raise ValueError(f"bench: --artifact: {art} is not an artifact directory (no manifest.json)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"bench: --artifact: {art}/manifest.json is not an artifact manifest ({e!r})") from None


def run(a: argparse.Namespace) -> int:
    cfg = check_args(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))  # read when TVM's thread pool starts
    import torch

    from dsv4.export.artifact import stage_printer
    from dsv4.runtimes import bench

    torch.set_num_threads(a.threads)
    load0, t0 = bench.loadavg(), time.perf_counter()
    seconds: dict[str, float] = {}
    with stage_printer(None) as stage:
        @contextlib.contextmanager
        def step(name: str):  # a stage on the progress display (name + elapsed), its seconds kept for the JSON
            t = time.perf_counter()
            with stage(name) as st:
                yield st
            seconds[name] = round(time.perf_counter() - t, 2)

        ckpt, arts, lib, export_s = _prepare(a, cfg, out, step)
        model = None
        res: dict[str, dict] = {}
        for side in cfg["sides"]:
            if side == "eager":
                with step("load the eager model"):
                    model = _eager(arts, ckpt, cfg)
                pair = bench.eager_side(model)
            else:
                with step(f"load {bench.SIDES[side]}"):
                    gen = bench.generator(side, arts[side], a.threads, compiled=lib if side == "tvm" else None)
                pair = bench.runtime_side(gen)
            with step(f"measure {bench.SIDES[side]}") as st:
                res[side] = {"label": bench.SIDES[side]} | bench.sweep(
                    *pair, cfg["prefill_lengths"], cfg["contexts"], a.steps, a.repeat, cfg["args"].vocab_size,
                    on=st.update)
            if side == "tvm":  # import + build seconds, as recorded when the library was compiled
                res[side]["compile_s"] = round(bench.tvm_library(arts["tvm"], lib), 2)
            pair = gen = model = None  # one side in memory at a time
    result = _result(a, cfg, res, arts, export_s, seconds, load0, time.perf_counter() - t0)
    from .plots import bench_plots

    result["plots"] = {k: p.name for k, p in bench_plots(result, out).items()}
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print_result(result)
    print(f"wrote {out / 'bench.json'}, " + ", ".join(str(out / p) for p in result["plots"].values()))
    return 0


def _prepare(a, cfg: dict, out: Path, step):
    """(checkpoint, {side: artifact}, TVM library dir, export seconds): made in `out` unless already there (an
    export is reused when its manifest names this checkpoint, by identity, and the same capacity)."""
    from dsv4.export.package import checkpoint_identity
    from dsv4.runtimes import bench

    if a.checkpoint:
        ckpt = Path(a.checkpoint)
    else:
        ckpt = out / f"checkpoint-{cfg['source']['preset']}"
        if not (ckpt / "config.json").is_file():
            from dsv4.models.checkpoint_write import write_synthetic

            with step(f"synthetic {cfg['source']['preset']} checkpoint"):
                write_synthetic(cfg["args"], ckpt, seed=0, progress=False, overwrite=True)
    ident = checkpoint_identity(ckpt)["sha256"]
    arts, export_s = {}, {}
    if a.artifact:
        arts["ort"] = Path(a.artifact)
    for side in (s for s in cfg["sides"] if s != "eager" and s not in arts):
        art = out / f"art-{side}"
        if not _reusable(art, ident, cfg["max_seq_len"]):
            with step(f"export {bench.FAMILY_TARGET[side]}"):
                export_s[side] = round(bench.export_family(ckpt, art, side, max_seq_len=cfg["max_seq_len"]), 2)
            if side == "tvm":
                shutil.rmtree(out / "lib-tvm", ignore_errors=True)  # compiled from the replaced export
        arts[side] = art
    lib = out / "lib-tvm"
    if "tvm" in arts and not (lib / "manifest.json").is_file():
        with step("compile tvm-llvm"):
            bench.tvm_library(arts["tvm"], lib)
    return ckpt, arts, lib, export_s


def _reusable(art: Path, ident: str, cap: int) -> bool:
    try:
        man = json.loads((art / "manifest.json").read_text())
        return man["source"]["identity"]["sha256"] == ident and int(man["config"]["max_seq_len"]) == cap
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _eager(arts: dict, ckpt: Path, cfg: dict):
    """The eager model as the artifacts run it (weights, quant_sim, dtype from a manifest; packed without one)."""
    from dsv4.export.artifact import load_manifest
    from dsv4.models.checkpoint import load_model
    from dsv4.runtimes.eager import eager_model

    if arts:
        return eager_model(load_manifest(next(iter(arts.values())), verify=False), ckpt).eval()
    return load_model(ckpt, keep_quantized=True, max_seq_len=cfg["max_seq_len"], progress=False).eval()


def _result(a, cfg: dict, res: dict, arts: dict, export_s: dict, seconds: dict, load0, wall: float) -> dict:
    from dsv4.runtimes import bench

    args = cfg["args"]
    man = json.loads((next(iter(arts.values())) / "manifest.json").read_text()) if arts else None
    model = {"name": cfg["source"].get("preset") or Path(cfg["source"]["checkpoint"]).name,
             "n_layers": args.n_layers, "dim": args.dim, "n_routed_experts": args.n_routed_experts,
             "vocab_size": args.vocab_size, "max_seq_len": cfg["max_seq_len"]}
    settings = {"source": cfg["source"], "model": model,
                "weights": man["weights"] if man else "packed", "dtype": man["dtype"] if man else "float32",
                "quant_sim": bool(man["config"]["quant_sim"]) if man else bool(args.quant_sim),
                "sides": cfg["sides"], "prefill_lengths": cfg["prefill_lengths"], "contexts": cfg["contexts"],
                "steps": a.steps, "repeat": a.repeat, "threads": a.threads, "batch": 1,
                "artifacts": {k: str(v) for k, v in arts.items()},
                "state": "every side allocated at max_seq_len (the ORT Generator's growth off: the same work)"}
    ratios = {s: {"prefill": [v / e for v, e in zip(r["prefill_tokens_per_s"], res["eager"]["prefill_tokens_per_s"])],
                  "decode": [e / v for v, e in zip(r["decode_ms"], res["eager"]["decode_ms"])]}
              for s, r in res.items() if s != "eager" and "eager" in res}
    m = bench.machine_info(a.threads) | {"loadavg_at_start": load0}
    return {"command": "dsv4 bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "dsv4 bench",
            "machine": m, "settings": settings, "sides": res, "speedup_vs_eager": ratios, "export_s": export_s,
            "seconds": seconds | {"total": round(wall, 2)}}


def print_result(result: dict) -> None:
    """The table (rich on a terminal, plain lines otherwise): one row per length, one column per side, then each
    runtime against eager."""
    from rich.table import Table

    from dsv4.fmt import print_table
    from dsv4.runtimes.bench import ratio

    s, res, m = result["settings"], result["sides"], result["machine"]
    t = Table(title=f"dsv4 bench {s['model']['name']}: {s['weights']} weights, quant_sim "
              f"{'on' if s['quant_sim'] else 'off'}, batch 1, {s['threads']} thread(s) per side; {m['cores']} cores, "
              f"load {'/'.join(f'{x:.1f}' for x in m['loadavg_1_5_15'])}")
    t.add_column("measurement")
    for side in res:
        t.add_column(res[side]["label"], justify="right")
    others = [x for x in res if x != "eager"] if "eager" in res else []
    for side in others:
        t.add_column(f"{side} vs eager", justify="right")
    for key, xs, what, hib in (("prefill_tokens_per_s", s["prefill_lengths"], "prefill {} tokens (tokens/s)", True),
                               ("decode_ms", s["contexts"], "decode at {} of context (ms/token)", False)):
        for i, x in enumerate(xs):
            t.add_row(what.format(x), *(f"{res[side][key][i]:,.1f}" for side in res),
                      *(ratio(res[side][key][i], res["eager"][key][i], hib) for side in others))
    if "tvm" in res:
        t.caption = f"TVM compile (both graphs): {res['tvm']['compile_s']:.0f} s"
    print_table(t)
