"""Measuring the runtimes side by side (``dsv4 bench`` and benchmarks/*.py): medians after a warm-up, the machine a
number was measured on, and each side (the eager model, an ONNX Runtime or a TVM Generator) as one pair of calls:
``prefill(ids)`` and ``decode(ids, steps)`` (the seconds of each of `steps` steps after a prefill of `ids`, so a
decode at context C runs from a state that holds C positions). Every side allocates its state at max_seq_len, so
the sides do the same work: the ORT Generator's default start-small-and-grow (docs/capacity.md) is off here,
since a smaller state is cheaper to prefill and to step and growing it costs one slow step."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SIDES = {"eager": "eager PyTorch", "ort": "ONNX Runtime CPU", "tvm": "TVM llvm"}  # side -> label
FAMILY_TARGET = {"ort": "ort-cpu", "tvm": "tvm-llvm"}  # the export each runtime side runs


# ---- timing ------------------------------------------------------------------------------------------------------
def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def step_times(step, steps: int) -> list[float]:
    """Seconds of each of `steps` consecutive calls (decode steps: each call advances the state)."""
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def decode_ms(step, steps: int) -> float:
    """Median milliseconds of one decode step over `steps` steps, the first (warm-up) one dropped."""
    return statistics.median(step_times(step, steps)[1:]) * 1e3


def ratio(x: float, ref: float, higher_is_better: bool) -> str:
    """'2.00x faster' / '1.50x slower' of x against ref."""
    v = x / ref if higher_is_better else ref / x
    return f"{v:.2f}x faster" if v >= 1 else f"{1 / v:.2f}x slower"


# ---- the machine -------------------------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def machine(threads: int) -> str:
    """Date, CPU, cores, threads per side and the load average now (benchmarks on a shared box say so)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{threads} thread{'s' if threads != 1 else ''} each side, load average {load:.1f} at the end")


def machine_info(threads: int) -> dict:
    """The machine and software of a measurement, for its JSON: CPU, cores, threads, load average, versions."""
    from dsv4.export.artifact import versions

    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "system": platform.system(),
            "cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(), "cores": os.cpu_count(),
            "threads_per_side": threads, "loadavg_1_5_15": loadavg(), "versions": versions()}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        return None


# ---- artifacts ---------------------------------------------------------------------------------------------------
def export_family(ckpt: Path, art: Path, family: str, *, weights: str = "packed", quant_sim: bool | None = None,
                  max_seq_len: int | None = None) -> float:
    """Export `ckpt` for the side `family` ("ort": ort-cpu, "tvm": tvm-llvm) with the target's pass pipeline, as
    `dsv4 export` does, into `art` (replaced); returns the seconds it took."""
    from dsv4.export.export import export_artifact
    from dsv4.passes.pipeline import run

    t = time.perf_counter()
    export_artifact(art, checkpoint=ckpt, target=FAMILY_TARGET[family], weights=weights, quant_sim=quant_sim,
                    max_seq_len=max_seq_len, overwrite=True, progress=False,
                    transform=lambda model, graph, target: run(model, target.name))
    return time.perf_counter() - t


def tvm_library(art: Path, out: Path, target: str = "tvm-llvm") -> float:
    """`dsv4 compile art --target target --out out` unless `out` already holds it; returns the import + build
    seconds recorded when the library was compiled (also when this call reused it)."""
    from dsv4.runtimes.tvm import compile_artifact

    if not (out / "manifest.json").is_file():
        compile_artifact(art, out, target=target, progress=False, overwrite=True)
    graphs = json.loads((out / "manifest.json").read_text())["graphs"]
    return sum(v for g in graphs.values() for v in g["seconds"].values())


def generator(side: str, art: Path, threads: int, compiled: Path | None = None):
    """The runtime Generator of a side ("ort" / "ort-cpu", or "tvm" / "tvm-llvm" with a compiled library)."""
    if side in ("ort", "ort-cpu"):
        from dsv4.runtimes.ort import Generator

        gen = Generator(art, threads=threads, verify=False)
        gen.start_capacity = gen.max_seq_len  # the state the eager and TVM sides allocate (module docstring)
        return gen
    from dsv4.runtimes.tvm import Generator

    return Generator(art, compiled=compiled, target="tvm-llvm" if side == "tvm" else side, verify=False)


# ---- the sides -----------------------------------------------------------------------------------------------------
def eager_side(model, last_only: bool = True):
    """(prefill, decode) of the eager model; last_only: prefill logits of the last position only, as the exported
    prefill graphs return them (the head's cost does not grow with the prompt)."""
    import torch

    from dsv4.models.state import init_state

    def run(ids, state):
        with torch.no_grad():
            return model.step(torch.as_tensor(ids), state, last_only=last_only)[1]

    def prefill(ids):
        run(ids, init_state(model.args, ids.shape[0], model.dtype))

    def decode(ids, steps):
        tok = np.array([[1]], dtype=np.int64)
        box = [run(ids, init_state(model.args, ids.shape[0], model.dtype))]

        def one():
            box[0] = run(tok, box[0])

        return step_times(one, steps)

    return prefill, decode


def runtime_side(gen):
    """(prefill, decode) of a runtime Generator (ORT or TVM)."""
    def prefill(ids):
        gen.prefill(np.asarray(ids))

    def decode(ids, steps):
        gen.prefill(np.asarray(ids))
        tok = np.array([[1]], dtype=np.int64)
        return step_times(lambda: gen.step(tok), steps)

    return prefill, decode


def sweep(prefill, decode, prefill_lengths, contexts, steps: int, repeat: int, vocab: int,
          on: Callable[[str], None] | None = None) -> dict:
    """Prefill tokens/s at each prompt length (median of `repeat` after a warm-up) and decode ms/token at each context
    length (median of `steps` - 1 steps after a prefill of that many tokens, the first step dropped), batch 1.
    `on(text)` is told what is being measured."""
    rng = np.random.default_rng(0)
    out = {"prefill_tokens_per_s": [], "decode_ms": []}
    for n in prefill_lengths:
        on and on(f"prefill {n} tokens")
        ids = rng.integers(0, vocab, (1, n), dtype=np.int64)
        out["prefill_tokens_per_s"].append(n / timed(lambda ids=ids: prefill(ids), repeat))
    for c in contexts:
        on and on(f"decode at {c} of context")
        ids = rng.integers(0, vocab, (1, c), dtype=np.int64)
        out["decode_ms"].append(statistics.median(decode(ids, steps)[1:]) * 1e3)
    return out
