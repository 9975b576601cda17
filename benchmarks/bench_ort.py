"""Eager PyTorch vs ONNX Runtime CPU, side by side in one run: decode-step latency at batch 1 and prefill
tokens/s (default: the `small` preset, prompts of 1K and 4K tokens). Results go to docs/PERF.md, section
"ONNX Runtime CPU vs eager" (other sections are left as they are).

    .venv/bin/python benchmarks/bench_ort.py [--preset small] [--prefill 1024 4096] [--decode-steps 32]

Both sides run the same synthetic checkpoint with FP8/MXFP4 weights kept packed (dequantised on the fly),
quant_sim on, fp32. The eager model uses torch's threads, ONNX Runtime its intra-op pool (same count, no
spinning); each measurement runs one side at a time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import add_common_args, decode_ms, machine, ratio, timed, update_section

SECTION = "## ONNX Runtime CPU vs eager (issue [3])"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, [1024, 4096], 32, 2)
    a = p.parse_args(argv)

    from dsv4.export.export import export_artifact
    from dsv4.models.checkpoint import load_model
    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset
    from dsv4.runtimes.ort import Generator

    args = preset(a.preset)
    threads = a.threads
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-") as tmp:
        work = Path(a.workdir or tmp)
        ckpt, art = work / "ckpt", work / "art"
        export_s = None
        if not (ckpt / "config.json").is_file():
            write_synthetic(args, ckpt, seed=0, progress=False, overwrite=True)
        if not (art / "manifest.json").is_file():
            t = time.perf_counter()
            export_artifact(art, checkpoint=ckpt, progress=True, max_seq_len=args.max_seq_len, overwrite=True)
            export_s = time.perf_counter() - t
        model = load_model(ckpt, keep_quantized=True, max_seq_len=args.max_seq_len, progress=False).eval()
        gen = Generator(art, threads=threads, verify=False)
        rows = []
        rng = torch.Generator().manual_seed(0)
        for n in a.prefill:
            ids = torch.randint(0, args.vocab_size, (1, n), generator=rng)
            with torch.no_grad():
                te = timed(lambda ids=ids: model(ids), a.repeat)
            to = timed(lambda ids=ids: gen.prefill(ids.numpy()), a.repeat)
            rows.append((f"prefill {n} tokens (tokens/s)", n / te, n / to))
            print(rows[-1], flush=True)
        # decode: batch 1 after a 1K-token prompt, one token at a time; each side in its own block (interleaving
        # two thread pools on 2 cores measures their fight, not the runtimes)
        ids = torch.randint(0, args.vocab_size, (1, min(a.prefill)), generator=rng)
        tok = torch.tensor([[1]])
        with torch.no_grad():
            box = [model(ids)[1]]

            def eager_step():
                box[0] = model(tok, box[0])[1]

            de = decode_ms(eager_step, a.decode_steps)
        gen.prefill(ids.numpy())
        do = decode_ms(lambda: gen.step(tok.numpy()), a.decode_steps)
        rows.append(("decode step, batch 1 (ms)", de, do))
        print(rows[-1], flush=True)
        info = artifact_info(art)
    md = render(a, args, rows, threads, export_s, info)
    print(md)
    if a.out != "-":
        update_section(Path(a.out), md, "bench_ort")
    return 0


def artifact_info(art: Path) -> str:
    from dsv4.export.artifact import inspect_artifact

    i = inspect_artifact(art)
    g = i["graphs"]["decode"]
    return f"decode graph {g['nodes']} nodes ({g['inlined_nodes']} with the dsv4 bodies inlined)"


def render(a, args, rows, threads, export_s, info) -> str:
    lines = [SECTION, "",
             f"`benchmarks/bench_ort.py`, preset `{a.preset}` ({args.n_layers} layers, dim {args.dim}, "
             f"{args.n_routed_experts} experts, max_seq_len {args.max_seq_len}), synthetic checkpoint seed 0, "
             "FP8/MXFP4 packed, quant_sim on, fp32. "
             f"{machine(threads)}"
             + (f"; export took {export_s:.0f} s" if export_s else "") + f"; {info}.", "",
             "| measurement | eager PyTorch | ONNX Runtime CPU | ORT / eager |", "|---|---:|---:|---:|"]
    for name, e, o in rows:
        lines.append(f"| {name} | {e:,.1f} | {o:,.1f} | {ratio(o, e, 'tokens/s' in name)} |")
    lines += ["", "ORT runs the raw exported graph (dsv4 function bodies inlined by ORT, MoE dense over all experts, "
              "weights dequantised in-graph on every call, ConstantFolding off to keep them packed); the "
              "graph passes of issue [4] (fused MoE, op selection) are not applied here.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
