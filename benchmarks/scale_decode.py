"""Expert-parallel decode on CPU (issue [11]): ms/token of the `small` preset at 1, 2 and 4 Gloo ranks beside the
single-process artifact, and what the collective itself costs per token.

    .venv/bin/python benchmarks/scale_decode.py --single ART --template TEMPLATE [--preset small] [--out docs/PERF.md]

ART: an ordinary export of the preset; TEMPLATE: its rank template (export_artifact(transform=
passes.shard_experts.rank_transform)); the ranks artifacts are cut from it here. Each configuration prefills the same
32-token prompt, then decodes `--steps` greedy tokens; the figure is the mean decode step over `--repeats` runs (min
and max shown). Every rank gets cores / ranks ONNX Runtime threads; the single process gets all cores. The tokens of
every configuration are checked equal to the single process's at the same thread count (ONNX Runtime's
reductions depend on it: 1 and 2 threads give different greedy tokens on small with the simulations on). The collective's own cost is measured apart:
the Dsv4AllReduce PyOp on one [1, dim] fp32 row inside an ORT session, per call, at 1, 2 and 4 ranks.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

MARK = "scale_decode"


def _collective(gen, rank: int, dim: int, calls: int) -> tuple[float, float]:
    """A launch() function: seconds per call of torch.distributed.all_reduce alone and of a one-node Dsv4AllReduce
    ORT session (the PyOp kernel around it), on [1, dim] fp32."""
    import onnxruntime as ort
    import torch
    import torch.distributed as dist
    from onnx import TensorProto, helper
    from onnxruntime_extensions import get_library_path

    node = helper.make_node("Dsv4AllReduce", ["x"], ["y"], domain="ai.onnx.contrib")
    g = helper.make_graph([node], "ar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dim])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    s = ort.InferenceSession(m.SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    x = np.ones((1, dim), np.float32)
    tx = torch.ones(1, dim)
    for _ in range(20):
        s.run(None, {"x": x})
        dist.all_reduce(tx)
    t = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(tx)
    gloo = (time.perf_counter() - t) / calls
    t = time.perf_counter()
    for _ in range(calls):
        s.run(None, {"x": x})
    return gloo, (time.perf_counter() - t) / calls


def measure(single: Path, template: Path, ranks: tuple[int, ...], steps: int, repeats: int, work: Path) -> dict:
    from dsv4.export.ranks import shard
    from dsv4.runtimes.ort import Generator
    from dsv4.runtimes.ort.launch import greedy, launch

    cores = os.cpu_count() or 1
    vocab = int(Generator(single, threads=1).vocab_size)
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, 32))
    rows, ref = [], {}
    for threads in sorted({cores, 1}, reverse=True):  # ORT's sums depend on its thread count: tokens per count
        runs = []
        gen = Generator(single, threads=threads)
        for _ in range(repeats):
            _, ref[threads], per = greedy(gen, 0, ids, steps)
            runs.append(per)
        del gen
        rows.append({"config": f"single process ({threads} thread{'s' if threads > 1 else ''})", "ranks": 0,
                     "ms": [r * 1e3 for r in runs], "same_tokens": True})
    layers = None
    for n in ranks:
        art = work / f"r{n}"
        man = shard(template, n, art, progress=False)
        layers = man["collective"]["per_step"]
        runs, same = [], True
        for _ in range(repeats):
            _, tok, per = launch(art, n, greedy, (ids, steps))
            runs.append(per)
            same &= bool(np.array_equal(tok, ref[max(1, cores // n)]))  # vs the single process at the same threads
        rows.append({"config": f"{n} rank{'s' if n > 1 else ''} ({max(1, cores // n)} threads each)", "ranks": n,
                     "ms": [r * 1e3 for r in runs], "same_tokens": same})
        dim = int(man["config"]["dim"])
        gloo, pyop = launch(art, n, _collective, (dim, 1000))
        rows[-1]["gloo_us"], rows[-1]["allreduce_us"] = gloo * 1e6, pyop * 1e6
    return {"rows": rows, "layers": layers, "cores": cores, "steps": steps, "repeats": repeats,
            "load": os.getloadavg()}


def report(res: dict, preset: str) -> str:
    base = statistics.mean(res["rows"][0]["ms"])
    lines = [f"<!-- {MARK}:begin (benchmarks/scale_decode.py) -->",
             f"`{preset}`, 32-token prompt then {res['steps']} greedy decode steps, mean over {res['repeats']} runs "
             f"(min-max); {res['cores']} cores; load average at the end {res['load'][0]:.1f} / {res['load'][1]:.1f} "
             f"(1 / 5 min). {res['layers']} all-reduces per step.", "",
             "| configuration | decode ms/token | vs single | all-reduce per call ([1, dim] fp32): Gloo alone / "
             "in the ORT PyOp | collective per token | same tokens |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ms = statistics.mean(r["ms"])
        ar = r.get("allreduce_us")
        per_call = "-" if ar is None else f"{r['gloo_us']:.0f} / {ar:.0f} µs"
        per_token = "-" if ar is None else f"{ar * res['layers'] / 1e3:.2f} ms"
        same = "yes" if r["same_tokens"] else "NO"
        lines.append(f"| {r['config']} | {ms:.1f} ({min(r['ms']):.1f}-{max(r['ms']):.1f}) | {ms / base:.2f}x | "
                     f"{per_call} | {per_token} | {same} |")
    lines.append(f"<!-- {MARK}:end -->")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--single", required=True, type=Path)
    p.add_argument("--template", required=True, type=Path)
    p.add_argument("--preset", default="small")
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, help="replace the marked section of this file (docs/PERF.md)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsv4-scale-") as tmp:
        res = measure(a.single, a.template, tuple(int(x) for x in a.ranks.split(",")), a.steps, a.repeats, Path(tmp))
    text = report(res, a.preset)
    print(text)
    if a.out:
        doc = a.out.read_text()
        pat = re.compile(rf"<!-- {MARK}:begin.*?<!-- {MARK}:end -->", re.S)
        a.out.write_text(pat.sub(lambda _: text, doc) if pat.search(doc) else doc.rstrip("\n") + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
