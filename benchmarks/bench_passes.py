"""Eager PyTorch vs the raw ORT-CPU artifact vs the same artifact after the ort-cpu pass pipeline (issue [4]), side
by side in one run: decode-step latency at batch 1 and prefill tokens/s, `small` preset by default. Results go to
docs/PERF.md, section "Graph passes" (other sections are left as they are).

    .venv/bin/python benchmarks/bench_passes.py [--preset small] [--prefill 1024] [--decode-steps 16]
                                                [--quant-sim off on] [--workdir DIR]

Every side runs the same synthetic checkpoint with FP8/MXFP4 weights kept packed, fp32. quant_sim off is the
configuration whose MoE the pipeline lowers to com.microsoft.QMoE; with quant_sim on the FP8 activation simulation
inside the experts keeps the MoE function body (passes/lower_ort.py says why), so only fusion, cleanup and op
selection act. Both artifacts are written by export_artifact, the raw one without a transform (`--no-passes`),
the fused one with dsv4.passes.pipeline.run (what `dsv4 export` does). One side runs at a time; torch and ORT use
the same thread count, no spinning.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import add_common_args, decode_ms, machine, ratio, timed, update_section

SECTION = "## Graph passes: eager vs raw vs fused ORT-CPU (issue [4])"


def export_pair(ckpt: Path, work: Path, args, quant_sim: bool) -> dict[str, Path]:
    """The raw and the fused artifact of one configuration (reused when already in `work`)."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.pipeline import run

    arts = {}
    for kind, transform in (("raw", None), ("fused", lambda m, g, t: run(m, t.name))):
        art = work / f"art_{kind}_qs{int(quant_sim)}"
        if not (art / "manifest.json").is_file():
            t = time.perf_counter()
            export_artifact(art, checkpoint=ckpt, max_seq_len=args.max_seq_len, quant_sim=quant_sim, transform=transform,
                            overwrite=True, progress=False)
            print(f"exported {art.name} in {time.perf_counter() - t:.0f} s", flush=True)
        arts[kind] = art
    return arts


def measure(ckpt: Path, arts: dict[str, Path], args, quant_sim: bool, prefill: list[int], steps: int, repeat: int,
            threads: int) -> list[tuple]:
    from dsv4.models.checkpoint import load_model
    from dsv4.runtimes.ort import Generator

    model = load_model(ckpt, keep_quantized=True, quant_sim=quant_sim, max_seq_len=args.max_seq_len,
                       progress=False).eval()
    gens = {k: Generator(a, threads=threads, verify=False) for k, a in arts.items()}
    rng = torch.Generator().manual_seed(0)
    rows = []
    for n in prefill:
        ids = torch.randint(0, args.vocab_size, (1, n), generator=rng)
        with torch.no_grad():
            te = timed(lambda ids=ids: model(ids), repeat)
        to = {k: timed(lambda g=g, ids=ids: g.prefill(ids.numpy()), repeat) for k, g in gens.items()}
        rows.append((f"prefill {n} tokens (tokens/s)", n / te, n / to["raw"], n / to["fused"]))
        print(rows[-1], flush=True)
    # decode: batch 1 after the shortest prompt, one token at a time, each side in its own block
    ids = torch.randint(0, args.vocab_size, (1, min(prefill)), generator=rng)
    tok = torch.tensor([[1]])
    with torch.no_grad():
        _, st = model(ids)
        box = [st]

        def eager_step():
            box[0] = model(tok, box[0])[1]

        de = decode_ms(eager_step, steps)
    do = {}
    for k, g in gens.items():
        g.prefill(ids.numpy())
        do[k] = decode_ms(lambda g=g: g.step(tok.numpy()), steps)
    rows.append(("decode step, batch 1 (ms)", de, do["raw"], do["fused"]))
    print(rows[-1], flush=True)
    return rows


def graph_info(arts: dict[str, Path]) -> str:
    """Nodes ORT executes in the decode graph (bodies inlined), raw vs fused, and the MoE ops of the fused one."""
    import onnx_ir as ir

    from dsv4.passes.census import census, totals

    out = {}
    for k, art in arts.items():
        c = census(ir.load(art / "decode.onnx"))
        t = totals(c)
        ops = sorted({op for parts in c.values() for cnt in parts.values() for op in cnt if op.startswith("com.")})
        out[k] = (sum(v["total"] for v in t.values()), sum(v.get("moe", 0) for v in t.values()), ops)
    (rn, rm, _), (fn, fm, ops) = out["raw"], out["fused"]
    return (f"decode graph as executed (bodies inlined): {rn} -> {fn} nodes, MoE parts {rm} -> {fm}"
            + (f", fused MoE runs as {', '.join(ops)}" if ops else ", fused MoE runs as its inlined body"))


def render(a, args, results, threads) -> str:
    lines = [SECTION, "",
             f"`benchmarks/bench_passes.py`, preset `{a.preset}` ({args.n_layers} layers, dim {args.dim}, "
             f"{args.n_routed_experts} experts top-{args.n_activated_experts}, max_seq_len {args.max_seq_len}), "
             "synthetic checkpoint seed 0, FP8/MXFP4 packed, fp32, batch 1. "
             f"{machine(threads)}. Raw = the "
             "exported graph (`--no-passes`); fused = after the ort-cpu pipeline (what `dsv4 export` writes). Each "
             "number is a median; ORT runs with its default optimizations (ConstantFolding off for packed weights).",
             ""]
    for qs, (rows, info) in results.items():
        lines += [f"**quant_sim {'on' if qs else 'off'}**: {info}.", "",
                  "| measurement | eager PyTorch | raw ORT-CPU | fused ORT-CPU | fused vs eager | fused vs raw |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, e, r, f in rows:
            up = "tokens/s" in name
            lines.append(f"| {name} | {e:,.1f} | {r:,.1f} | {f:,.1f} | {ratio(f, e, up)} | {ratio(f, r, up)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant-sim", nargs="+", choices=("off", "on"), default=["off", "on"])
    add_common_args(p, [1024], 16, 2)
    a = p.parse_args(argv)

    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset

    args = preset(a.preset)
    threads = a.threads
    torch.set_num_threads(threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-passes-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "ckpt"
        if not (ckpt / "config.json").is_file():
            write_synthetic(args, ckpt, seed=0, progress=False, overwrite=True)
        for qs in (s == "on" for s in a.quant_sim):
            arts = export_pair(ckpt, work, args, qs)
            rows = measure(ckpt, arts, args, qs, a.prefill, a.decode_steps, a.repeat, threads)
            results[qs] = (rows, graph_info(arts))
    md = render(a, args, results, threads)
    print(md)
    if a.out != "-":
        update_section(Path(a.out), md, "bench_passes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
