"""Long-context cost (issue [10]/13, "prefill cost near-linear in length"): prefill tokens/s at 2K, 8K and 16K and
decode ms/token at 1K, 8K and 16K of context, eager PyTorch vs the ORT-CPU artifact, `small` preset, one run of
each. Results go to docs/PERF.md, section "Long context" (other sections are left as they are).

    .venv/bin/python benchmarks/bench_long.py [--prefill 2048 8192 16384] [--context 1024 8192 16384]
        [--decode-steps 6] [--sides eager ort] [--max-seq-len 16640] [--workdir DIR] [--profile 2048 8192]

The checkpoint (synthetic, seed 0, FP8/MXFP4 packed, quant_sim as the preset) and the artifact (what
`dsv4 export` writes: the ort-cpu pass pipeline, last-position logits) are made once in --workdir and reused.
The capacity is --max-seq-len on both sides (16640: 16K of prompt plus room to decode). Each prefill runs once
after a 256-token warm-up (--repeat for more); a context length's decode steps follow its own prefill (the first
step is dropped, the median of the rest is reported). Peak RSS per measurement is sampled from /proc (the
process's high-water mark only ever grows, so a sampler thread records each phase's own peak).

--profile N...: ORT prefill at these lengths with enable_profiling, the per-op-type totals of the profile
printed and written to WORKDIR/profile_N.json (what grows with length; docs/PERF.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _common import add_common_args, machine, update_section

SECTION = "## Long context: prefill and decode cost against length (issue [10])"
WARMUP = 256


class PeakRss:
    """Peak resident set of this process (MB) while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def export(ckpt: Path, art: Path, max_seq_len: int) -> float:
    """The artifact `dsv4 export` writes (ort-cpu passes), once; returns the export's seconds (0 when reused)."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.pipeline import run

    if (art / "manifest.json").is_file():
        return 0.0
    t = time.perf_counter()
    export_artifact(art, checkpoint=ckpt, max_seq_len=max_seq_len, transform=lambda m, g, tg: run(m, tg.name),
                    overwrite=True, progress=False)
    return time.perf_counter() - t


def lengths(a) -> list[int]:
    return sorted(set(a.prefill) | set(a.context))


def run_side(side: str, ckpt: Path, art: Path, a, vocab: int) -> dict:
    """{length: {"prefill_s", "prefill_rss_mb", "decode_ms"?}} of one side."""
    rng = np.random.default_rng(0)
    tok = np.array([[1]], dtype=np.int64)
    if side == "eager":
        from dsv4.models.checkpoint import load_model
        from dsv4.models.state import init_state

        model = load_model(ckpt, keep_quantized=True, max_seq_len=a.max_seq_len, progress=False).eval()
        box = {}

        def prefill(ids):
            with torch.no_grad():
                st = init_state(model.args, 1, model.dtype)
                box["st"] = model.step(torch.from_numpy(ids), st, last_only=True)[1]

        def step():
            with torch.no_grad():
                box["st"] = model.step(torch.from_numpy(tok), box["st"])[1]
    else:
        from dsv4.runtimes.ort import Generator

        g = Generator(art, threads=a.threads, verify=False)
        prefill, step = g.prefill, (lambda: g.step(tok))
    prefill(rng.integers(0, vocab, (1, WARMUP), dtype=np.int64))
    out = {}
    for n in lengths(a):
        ids = rng.integers(0, vocab, (1, n), dtype=np.int64)
        times = []
        with PeakRss() as r:
            for _ in range(a.repeat):
                t = time.perf_counter()
                prefill(ids)
                times.append(time.perf_counter() - t)
        row = out[n] = {"prefill_s": statistics.median(times), "prefill_rss_mb": r.peak}
        if n in a.context:
            st = []
            for _ in range(a.decode_steps):
                t = time.perf_counter()
                step()
                st.append(time.perf_counter() - t)
            row["decode_ms"] = statistics.median(st[1:]) * 1e3
        print(side, n, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    return out


def profile(art: Path, n: int, threads: int, vocab: int, work: Path) -> dict[str, float]:
    """ms per op type of one ORT prefill of n tokens (enable_profiling; node events summed by op type)."""
    import onnxruntime as ort

    from dsv4.runtimes.ort.session import session_options

    manifest = json.loads((art / "manifest.json").read_text())
    so, disabled = session_options(manifest, threads=threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(work / f"ortprof_{n}")
    sess = ort.InferenceSession(str(art / "prefill.onnx"), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)
    ids = np.random.default_rng(0).integers(0, vocab, (1, n), dtype=np.int64)
    sess.run(None, {sess.get_inputs()[0].name: ids})
    path = sess.end_profiling()
    per = defaultdict(float)
    for e in json.loads(Path(path).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"] / 1e3
    Path(path).unlink()
    per = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    (work / f"profile_{n}.json").write_text(json.dumps(per, indent=1))
    return per


def render(a, args, res: dict, export_s: float) -> str:
    lines = [SECTION, "",
             f"`benchmarks/bench_long.py`, preset `{a.preset}` ({args.n_layers} layers, dim {args.dim}, window "
             f"{args.window_size}, compress ratios {list(args.compress_ratios[:args.n_layers])}, indexer "
             f"{args.index_n_heads} heads x {args.index_head_dim} top-{args.index_topk}), capacity (max_seq_len) "
             f"{a.max_seq_len} on both sides, synthetic checkpoint seed 0, FP8/MXFP4 packed, quant_sim on, fp32, "
             f"batch 1; ORT = the artifact `dsv4 export` writes (ort-cpu passes, last-position logits)"
             + (f", export {export_s:.0f} s" if export_s else "") + f". {machine(a.threads)}. One prefill per "
             f"length (median of {a.repeat}), after a {WARMUP}-token warm-up; decode: median of "
             f"{a.decode_steps - 1} steps after the prefill of that context. RSS: the process's peak during the "
             "prefill (weights included).", "",
             "| measurement | " + " | ".join(res) + " |", "|---|" + "---:|" * len(res)]
    for n in a.prefill:
        lines.append(f"| prefill {n} tokens (tokens/s) | "
                     + " | ".join(f"{n / r[n]['prefill_s']:,.1f}" for r in res.values()) + " |")
    for n in a.prefill:
        lines.append(f"| prefill {n} tokens, peak RSS (MB) | "
                     + " | ".join(f"{r[n]['prefill_rss_mb']:,.0f}" for r in res.values()) + " |")
    lo, hi = min(a.prefill), max(a.prefill)
    lines.append(f"| time({hi}) / time({lo}) (linear: {hi / lo:.0f}) | "
                 + " | ".join(f"{r[hi]['prefill_s'] / r[lo]['prefill_s']:.2f}" for r in res.values()) + " |")
    for n in a.context:
        lines.append(f"| decode at {n} of context (ms/token) | "
                     + " | ".join(f"{r[n]['decode_ms']:,.1f}" for r in res.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, [2048, 8192, 16384], 6, 1)
    p.add_argument("--context", type=int, nargs="+", default=[1024, 8192, 16384],
                   help="context lengths of the decode timings")
    p.add_argument("--max-seq-len", type=int, default=16640, help="capacity of both sides (the export's)")
    p.add_argument("--sides", nargs="+", choices=("eager", "ort"), default=["eager", "ort"])
    p.add_argument("--profile", type=int, nargs="*", default=[],
                   help="only profile ORT prefill at these lengths (per-op-type ms), no timings table")
    a = p.parse_args(argv)

    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset

    args = preset(a.preset)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="dsv4-bench-long-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt, art = work / "ckpt", work / f"art_{a.max_seq_len}"
        if not (ckpt / "config.json").is_file():
            write_synthetic(args, ckpt, seed=0, progress=False, overwrite=True)
        export_s = export(ckpt, art, a.max_seq_len)
        if a.profile:
            for n in a.profile:
                per = profile(art, n, a.threads, args.vocab_size, work)
                tot = sum(per.values())
                print(f"prefill {n}: {tot:,.0f} ms in nodes; top: "
                      + ", ".join(f"{k} {v:,.0f}" for k, v in list(per.items())[:8]), flush=True)
            return 0
        res = {("eager PyTorch" if s == "eager" else "ORT-CPU"): run_side(s, ckpt, art, a, args.vocab_size)
               for s in a.sides}
    md = render(a, args, res, export_s)
    print(md)
    if a.out != "-":
        update_section(Path(a.out), md, "bench_long")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
