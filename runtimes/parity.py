"""Parity of an artifact against the eager model (the oracle), and THE tolerance table.

``run_parity(ART)`` runs both on the same seeded prompt and judges *values*, never only argmaxes:

* **prefill**: logits at every position and every state tensor (the rows the prompt wrote), from a fresh state.
* **decode, step by step**: every one of the N decode steps starts from the *eager model's* state of that step
  (teacher forcing), so each step is compared like with like: one step of the artifact vs one step of the eager
  model on the same inputs; its logits and the state rows it wrote are compared. A bug confined to the decode
  graph cannot hide behind state drift accumulated since the prefill.
* **free running**: the artifact also decodes on its own state (as an application runs it); the share of steps
  whose greedy token agrees is reported and judged.
* ``per_layer=True``: the hidden streams after every decoder layer too (ORT: a copy of each shipped graph with
  the layer outputs added as graph outputs; the artifact is not changed), so a failure names the first layer
  that diverges.

Each compared tensor is a row of the report that shows the criterion that judged it. Tolerances live only in
TOLERANCES, keyed by (activation dtype, quant_sim):

* *strict* entries (fp32 without the quantisation simulation, fp64): every element within a bound.
* the *calibrated* entry (fp32 with the simulation, the configuration users deploy): a 1-ulp difference can
  flip an FP8/FP4 rounding decision, which moves a few positions by a quantum while the rest agree to fp32
  noise. The noise floor of this mode is measured in the same run: the eager model is run again as *noise
  twins* (the output of every linear layer, RMSNorm and decoder layer moved by +-1 ulp at random: where
  another fp32 implementation's accumulation order differs) and the per-position error of the artifact must
  stay within ``noise_factor`` x the twins' (or the fp32 accumulation bound, whichever is larger): the median
  in prefill (where flips propagate to later positions), the median and p90 and the share of positions above
  the bound in the teacher-forced decode steps (where they cannot). A wrong artifact moves many decode steps
  (a 1% weight edit: median 3e-2 where the honest median is 1.2e-6). The eager model's fp64 twin still
  drives the decode tokens, and the artifact's top-1 / greedy agreement with it may fall short of the eager fp32
  model's own by at most the slacks. docs/parity.md has the measurements behind the factors.
The table and the comparisons are in runtimes/verdict.py, the eager side in runtimes/eager.py.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dsv4.export.artifact import load_manifest, stage_printer

from .eager import Reference, Trace, eager_model, eager_reference, fp64_twin
from .verdict import (
    TOLERANCES,
    Comparison,
    ParityReport,
    Tolerance,
    _scale,
    changed_rows,
    compare,
    judge_rows,
    plain_lines,
    position_errors,
    render,
    row_errors,
    tolerance_for,
)

__all__ = ["TOLERANCES", "Comparison", "ParityReport", "Reference", "Tolerance", "Trace", "changed_rows", "compare",
           "eager_model", "eager_reference", "fp64_twin", "judge_rows", "plain_lines", "render", "row_errors",
           "run_parity", "tolerance_for"]


# ---- the artifact side ------------------------------------------------------------------------------------------
def artifact_layout(man: dict) -> Callable[[dict], dict]:
    """numpy state of either layout -> the artifact's (models/state.as_layout): the eager model that drives the
    teacher-forced steps may hold its state compact while the artifact keeps floats (ascend), or the reverse."""
    import torch

    from dsv4.models.config import ModelArgs
    from dsv4.models.state import as_layout

    args, dtype = ModelArgs(**man["config"]), getattr(torch, man["dtype"])
    names = [e["name"] for e in man["state"]]

    def convert(st: dict) -> dict:
        if list(st) == names:
            return st
        t = as_layout({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in st.items()}, args, dtype)
        return {k: t[k].numpy() for k in names}
    return convert


def state_view(man: dict) -> Callable[[dict], dict]:
    """numpy state -> the state compared: compact caches (FP8 / MXFP4 codes, models/kvstore.py) decoded to their
    float values under the plain names, so a code that one fp32 ulp flipped is judged by the value it stands for,
    like a float state's (docs/state_layout.md); a float-layout state passes through (the eager model's state may
    be of either layout: the view reads it from the entries)."""
    import torch

    from dsv4.models.config import ModelArgs
    from dsv4.models.state import float_view

    args, dtype = ModelArgs(**man["config"]), getattr(torch, man["dtype"])
    return lambda st: {k: v.numpy() for k, v in float_view({k: torch.from_numpy(np.ascontiguousarray(v))
                                                             for k, v in st.items()}, args, dtype).items()}


def _layer_sort_key(name: str):
    m = re.match(r"(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _rows(rep: ParityReport, tol: Tolerance, prefix: str, ref, got, noise: list, names: list[str],
          written: Callable | None = None):
    """Append the comparisons of one phase: logits, every state tensor (rows the phase wrote), layer streams.
    ref/got/noise items: (logits, state, layers) lists over the phase's calls (prefill: one; decode: per step)."""
    calibrated = tol.noise_factor is not None

    def collect(get, ref_part, bound, what):
        errs, floors = [], [[] for _ in noise]
        refs, gots = [], []
        for k in range(len(ref)):
            r, g = get(ref[k]), get(got[k])
            if r is None or g is None:
                continue
            if calibrated:
                rows = None if written is None or what != "state" else written(k, ref_part, r, g, noise)
                e = row_errors(r, g)
                errs.append(e if rows is None else e[rows])
                for j, nz in enumerate(noise):
                    f = row_errors(r, get(nz[k]))
                    floors[j].append(f if rows is None else f[rows])
            refs.append(r)
            gots.append(g)
        if not refs:
            return
        name = f"{prefix}.{ref_part}"
        shape = [len(refs), *refs[0].shape] if len(refs) > 1 else list(refs[0].shape)
        if calibrated and refs[0].dtype.kind == "f":
            err = np.concatenate(errs) if errs else np.zeros(0)
            rep.rows.append(judge_rows(name, shape, err, [np.concatenate(f) for f in floors], bound, tol,
                                       max(_scale(r) for r in refs), propagating=prefix == "prefill"))
        elif calibrated:  # integers (pos): exact
            rep.rows.append(compare(name, np.stack(refs), np.stack(gots), 0.0, 0.0))
        else:
            rep.rows.append(compare(name, np.stack(refs), np.stack(gots), bound, tol.max_share_out))

    collect(lambda x: x[0], "logits", tol.logits_abs, "logits")
    for n in sorted(names, key=_layer_sort_key):
        collect(lambda x, n=n: x[1][n], n, tol.state_abs, "state")
    if ref and ref[0][2]:
        for lname in sorted(ref[0][2], key=lambda s: int(s[5:])):
            collect(lambda x, lname=lname: x[2].get(lname) if x[2] else None, lname, tol.state_abs, "layer")


def _positions(phase: str, ref: list, got: list, noise: list) -> dict[str, list[float]]:
    """The report's ``positions`` of one phase (items as in _rows): max |Δ logits| per position, the calls' positions
    in order, and the noise twins' largest at each; with layer taps, the last layer's streams per position too."""
    def per(other, part=lambda x: x[0]):
        return [e for r, g in zip(ref, other) for e in position_errors(part(r), part(g))]

    out = {phase: per(got), f"{phase} noise": np.max([per(nz) for nz in noise], 0).tolist() if noise else []}
    if ref and ref[0][2] and all(g[2] for g in got):
        last = max(ref[0][2], key=lambda s: int(s[5:]))  # "layer{i}"
        out[f"{phase} {last}"] = per(got, lambda x: x[2][last])
    return out


def _logits_cut(got: np.ndarray, ref: np.ndarray):
    """The eager prefill logits as the artifact returns them: every position, or (manifest ``"logits": "last"``)
    the last one; the state rows still cover every position of the prompt."""
    if got.shape[1] == ref.shape[1]:
        return lambda x: x
    if got.shape[1] != 1:
        raise ValueError(f"parity: the artifact's prefill logits cover {got.shape[1]} positions of {ref.shape[1]}")
    return lambda x: x[:, -1:]


def run_parity(art: str | Path, *, model=None, checkpoint: str | Path | None = None, steps: int = 64,
               prompt_len: int = 300, batch: int = 1, seed: int = 0, providers: list[str] | None = None,
               optimization: str = "all", threads: int | None = None, verify: bool = True, backend: str = "ort",
               tvm_options: dict | None = None, generator=None, reference: Reference | None = None,
               per_layer: bool = False, progress: bool | None = False, identity: bool = True) -> ParityReport:
    """Compare the artifact `art` (ONNX Runtime, or TVM with backend="tvm": `tvm_options` go to its Generator,
    e.g. target / compiled) with the eager model (`model`, else rebuilt from `checkpoint` or the manifest's
    source) on a prompt of `prompt_len` ids drawn with `seed`, then `steps` decode steps. `generator`: an
    already built runtime Generator for `art` (benchmarks: a CUDA library is compiled once, when loaded).
    `reference`: an ``eager_reference`` computed before (same model, prompt and steps) instead of running the
    eager side again. `per_layer`: also compare every decoder layer's output streams (ORT only). `progress`:
    show stages on stderr (None: when stderr is a terminal). identity=False: do not require `checkpoint` to be the
    one the artifact was exported from (runtimes/eager.py check_identity)."""
    man = load_manifest(art, verify=verify)
    key, tol = tolerance_for(man)
    static = man.get("static")
    if static and reference is None and (prompt_len > static["prefill_lengths"][-1] or batch != static["batch"]):
        raise ValueError(f"parity: the artifact's graphs are static (batch {static['batch']}, prefill buckets "
                         f"{static['prefill_lengths']}); got --batch {batch} --prompt-len {prompt_len}")
    if per_layer and backend != "ort":
        raise ValueError("parity: --per-layer taps the shipped ONNX graphs' layer outputs, with the ort backend only")
    with stage_printer(progress) as stage:
        if reference is None:
            if model is None:
                with tempfile.TemporaryDirectory(prefix="dsv4-parity-") as tmp, stage("load the eager model"):
                    model = eager_model(man, checkpoint, Path(tmp), identity, near=art)
            reference = eager_reference(model, man, steps=steps, prompt_len=prompt_len, batch=batch, seed=seed,
                                        per_layer=per_layer, stage=stage)
        ref = reference
        if tuple(ref.key) != tuple(key):
            raise ValueError(f"parity: the reference was computed for {ref.key}, the artifact is {key}")
        if per_layer and not ref.per_layer:
            raise ValueError("parity: per_layer needs a reference computed with per_layer=True")
        steps, (batch, prompt_len) = ref.steps, ref.ids.shape
        with stage("load the artifact's runtime"):
            t = time.perf_counter()
            if generator is not None:
                gen = generator
            elif backend == "tvm":
                from dsv4.runtimes.tvm import Generator as TVMGenerator

                gen = TVMGenerator(art, verify=False, **(tvm_options or {}))
            elif backend == "ort":
                from dsv4.runtimes.ort import Generator

                gen = Generator(art, providers=providers, optimization=optimization, threads=threads, verify=False,
                                layer_taps=per_layer)
            else:
                raise ValueError(f"parity: backend {backend!r} is not one of ort, tvm")
        rep = ParityReport(str(art), list(key), asdict(tol), {"batch": batch, "length": prompt_len, "seed": seed,
                                                               "steps": steps, "optimization": optimization,
                                                               "backend": backend}, per_layer=per_layer)
        rep.seconds = dict(ref.seconds) | {"artifact load": time.perf_counter() - t}
        # the eager state's capacity, whatever generator runs the artifact (a given one too, e.g. a rank's under
        # --ranks): the states are compared row by row
        full = int(man["config"]["max_seq_len"])
        view = state_view(man)
        fresh = view(ref.fresh)
        names = list(fresh)  # the compared state: compact caches as their float values

        def taps():
            return dict(getattr(gen, "layer_outputs", {}) or {}) if per_layer else {}

        # prefill from a fresh state: logits at every position, the state rows the prompt wrote, layer streams
        with stage(f"artifact prefill ({prompt_len} tokens)"):
            t = time.perf_counter()
            logits = gen.prefill(ref.ids, capacity=full)
            rep.seconds["artifact prefill"] = time.perf_counter() - t
            got_pre = (logits, view({n: np.asarray(gen.state[n]) for n in gen.names}), taps())
        eag = ref.eager

        def written_prefill(k, n, r, g, noise):
            f = fresh[n]
            return changed_rows(f, r) | changed_rows(f, g) | np.any(
                [changed_rows(f, nz[k][1][n]) for nz in noise], axis=0) if noise else \
                changed_rows(f, r) | changed_rows(f, g)

        cut = _logits_cut(logits, eag.prefill_logits)  # a last-position artifact: judge the positions it returns
        noise_pre = [[(cut(nz.prefill_logits), view(nz.prefill_state), nz.prefill_layers)] for nz in ref.noise]
        ref_pre = [(cut(eag.prefill_logits), view(eag.prefill_state), eag.prefill_layers)]
        _rows(rep, tol, "prefill", ref_pre, [got_pre], noise_pre, names, written_prefill)
        rep.positions |= _positions("prefill", ref_pre, [got_pre], noise_pre)
        rep.top1 = float(np.mean(cut(eag.prefill_logits).argmax(-1) == logits.argmax(-1)))

        # decode, step by step from the eager state of each step
        got_steps = []
        inputs = ref.inputs
        to_artifact = artifact_layout(man)
        with stage(f"artifact decode: {steps} steps from the eager state") as st:
            t = time.perf_counter()
            for k in range(steps):
                st.update(f"step {k + 1}/{steps}")
                lk, sk = gen.run_step(ref.tokens[k], to_artifact(inputs[k]))
                got_steps.append((lk, view({n: np.asarray(sk[n]) for n in gen.names}), taps()))
            rep.seconds["artifact decode step"] = (time.perf_counter() - t) / max(steps, 1)

        inputs_v = [view(s) for s in inputs]

        def written_step(k, n, r, g, noise):
            before = inputs_v[k][n]
            w = changed_rows(before, r) | changed_rows(before, g)
            for nz in noise:
                w |= changed_rows(before, nz[k][1][n])
            return w

        ref_steps = list(zip(eag.step_logits, map(view, eag.step_states), eag.step_layers))
        noise_steps = [list(zip(nz.step_logits, map(view, nz.step_states), nz.step_layers)) for nz in ref.noise]
        _rows(rep, tol, "decode", ref_steps, got_steps, noise_steps, names, written_step)
        rep.positions |= _positions("decode", ref_steps, got_steps, noise_steps)

        # free running: the artifact on its own state, fed the driving tokens; greedy agreement
        agree64 = 0
        free = []
        with stage(f"artifact decode: {steps} steps free running") as st:
            gen.prefill(ref.ids, capacity=full)
            for k in range(steps):
                st.update(f"step {k + 1}/{steps}")
                lk = gen.step(ref.tokens[k])
                free.append(lk)
                a = lk[:, -1].argmax(-1)
                same = bool(np.array_equal(a, ref.eager_greedy_steps[k]))
                rep.greedy_steps += 1
                rep.greedy_agree += same
                if not same and rep.first_mismatch is None:
                    rep.first_mismatch = k
                if ref.twin_step_tops:
                    agree64 += bool(np.array_equal(a, ref.twin_step_tops[k]))
        if tol.noise_factor is None and steps:  # strict: the free-running logits within the bound too
            rep.rows.append(compare("decode.free-running logits", np.concatenate(eag.step_logits, 1),
                                    np.concatenate(free, 1), tol.logits_abs, tol.max_share_out))
        if ref.vs_fp64:
            rep.vs_fp64 = dict(ref.vs_fp64) | {
                "artifact top-1": float(np.mean(logits.argmax(-1) == cut(ref.twin_prefill_top[..., None])[..., 0])),
                "artifact greedy": agree64 / steps if steps else 1.0}
    return rep
