"""Parity of an artifact against the eager model (the oracle), and THE tolerance table.

``run_parity(ART)`` runs both on the same seeded prompt: prefill logits at every position and every state
tensor, then N greedy decode steps (the eager model's token is fed to both, so each step compares like
with like; agreement counts the steps whose greedy token is the same). The report holds max abs / rel error
per output and state tensor, the share of elements out of tolerance, top-1 and greedy agreement, never a
bare bool. Tolerances live only in TOLERANCES, keyed by (activation dtype, quant_sim).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dsv4.export.artifact import load_manifest


@dataclass(frozen=True)
class Tolerance:
    logits_abs: float  # |artifact - eager| bound per logit
    state_abs: float  # ... per state element
    max_share_out: float  # share of elements allowed above the bound, per compared tensor
    min_top1: float  # prefill: share of positions whose argmax agrees
    min_greedy: float  # decode: share of steps whose greedy token agrees
    reason: str


TOLERANCES: dict[tuple[str, bool], Tolerance] = {
    # fp32 without the quantisation simulation: only accumulation order differs (MLAS vs MKL matmuls,
    # reductions, exp/sigmoid approximations, 1-few ulp). Measured on tiny (300-token prefill + 64 steps):
    # logits <= 5e-6, states <= 7e-6; 1e-4 leaves 15x headroom and is the acceptance bound of issue [3].
    ("float32", False): Tolerance(1e-4, 1e-4, 0.0, 1.0, 1.0, "fp32 accumulation-order noise only"),
    # fp64 with or without the simulation: every FP8/FP4 rounding decision of the graph equals the eager
    # model's (the ulp differences are 1e-16, far from any rounding boundary). Measured: logits <= 4e-14,
    # states <= 9e-14 over 6 prompts. 1e-9 would still catch a single flipped rounding decision (>= 1e-6).
    ("float64", False): Tolerance(1e-9, 1e-9, 0.0, 1.0, 1.0, "fp64: exact up to accumulation order"),
    ("float64", True): Tolerance(1e-9, 1e-9, 0.0, 1.0, 1.0, "fp64: every quantisation decision reproduced"),
    # fp32 WITH the simulation: the 1-ulp differences above flip FP8/FP4 rounding decisions (a value a few ulp
    # from a rounding boundary), each flip moves one activation by a whole FP8/FP4 step and the change
    # propagates (indexer top-k choices included). A property of the model in fp32, not of the artifact: on
    # tiny, eager fp32 vs eager fp64 differs by up to 1.7 in logits, with prefill top-1 agreement 93-100% and
    # 56-64/64 teacher-forced greedy tokens over 6 prompts. Artifact vs eager fp32 (packed, 300 + 64 tokens):
    # seed 0: prefill 0.048, decode 5.5e-5, 64/64; seeds 1, 2: prefill 1.4-1.6, 96-97% top-1, 58/64 greedy.
    # The elementwise bound is still reported; the verdict rests on agreement, with a margin below the eager
    # model's own fp32-vs-fp64 minimum (a wrong op agrees on almost nothing), while exactness of the
    # quantised path is established by the fp64 entry above.
    ("float32", True): Tolerance(1e-4, 1e-4, 1.0, 0.9, 0.8, "fp32 + quant_sim: rounding flips (see comment)"),
}


def tolerance_for(manifest: dict) -> tuple[tuple[str, bool], Tolerance]:
    key = (manifest["dtype"], bool(manifest["config"]["quant_sim"]))
    if key not in TOLERANCES:
        raise KeyError(f"parity: no tolerance for dtype={key[0]} quant_sim={key[1]} in runtimes/parity.py "
                       "TOLERANCES; measure one and add it with its reason")
    return key, TOLERANCES[key]


@dataclass
class Comparison:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    share_out: float  # share of elements with |diff| > bound (non-finite mismatches count as out)
    bound: float
    ok: bool


def compare(name: str, ref: np.ndarray, got: np.ndarray, bound: float, max_share: float) -> Comparison:
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return Comparison(name, list(ref.shape), float("inf"), float("inf"), 1.0, bound, False)
    same = (ref == got) | (np.isnan(ref) & np.isnan(got))  # equal infinities count as equal
    with np.errstate(invalid="ignore"):
        d = np.where(same, 0.0, np.abs(got - ref))
    d = np.where(np.isnan(d), np.inf, d)
    fin = np.abs(ref[np.isfinite(ref)])
    scale = float(fin.max()) if fin.size else 1.0
    out = float(np.mean(d > bound)) if d.size else 0.0
    mx = float(d.max()) if d.size else 0.0
    return Comparison(name, list(ref.shape), mx, mx / scale if scale else mx, out, bound,
                      out <= max_share and (max_share > 0 or mx <= bound))


@dataclass
class ParityReport:
    artifact: str
    tolerance_key: list
    tolerance: dict
    prompt: dict
    rows: list[Comparison] = field(default_factory=list)
    top1: float = 1.0
    greedy_steps: int = 0
    greedy_agree: int = 0
    first_mismatch: int | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def greedy(self) -> float:
        return self.greedy_agree / self.greedy_steps if self.greedy_steps else 1.0

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return (all(r.ok for r in self.rows) and self.top1 >= t["min_top1"] and self.greedy >= t["min_greedy"])

    def to_json(self) -> dict:
        return asdict(self) | {"ok": self.ok, "greedy": self.greedy}


def eager_model(manifest: dict, checkpoint: str | Path | None = None, workdir: Path | None = None):
    """The eager DeepseekV4 the artifact was exported from: `checkpoint` if given, else the manifest's source
    (a checkpoint path, or a synthetic preset + seed, rebuilt in `workdir`)."""
    from dsv4.models.checkpoint import load_model

    dtype = getattr(torch, manifest["dtype"])
    cfg = manifest["config"]
    overrides = {"max_seq_len": cfg["max_seq_len"], "quant_sim": cfg["quant_sim"]}
    src = manifest["source"]
    if checkpoint is None and src["kind"] == "checkpoint":
        checkpoint = src["path"]
    if checkpoint is None and src["kind"] == "synthetic":
        from dsv4.models.checkpoint_write import write_synthetic
        from dsv4.models.config import preset

        if workdir is None:
            raise ValueError("eager_model: a synthetic source needs a workdir")
        checkpoint = write_synthetic(preset(src["preset"], **overrides), workdir / "ckpt", seed=src["seed"],
                                     progress=False)
    if checkpoint is None:
        raise ValueError("parity: the artifact was exported from an in-memory model; pass --checkpoint DIR")
    return load_model(checkpoint, dtype=dtype, keep_quantized=manifest["weights"] == "packed", progress=False,
                      **overrides)


def run_parity(art: str | Path, *, model=None, checkpoint: str | Path | None = None, steps: int = 64,
               prompt_len: int = 300, batch: int = 1, seed: int = 0, providers: list[str] | None = None,
               optimization: str = "all", threads: int | None = None, verify: bool = True, backend: str = "ort",
               tvm_options: dict | None = None, generator=None) -> ParityReport:
    """Compare the artifact `art` (ONNX Runtime, or TVM with backend="tvm": `tvm_options` go to its Generator,
    e.g. target / compiled) with the eager model (`model`, else rebuilt from `checkpoint` or the manifest's
    source) on a prompt of `prompt_len` ids drawn with `seed`, then `steps` greedy steps. `generator`: an already
    built runtime Generator for `art` to use instead (benchmarks: a CUDA library is compiled once, when loaded)."""
    from dsv4.runtimes.ort import Generator

    man = load_manifest(art, verify=verify)
    key, tol = tolerance_for(man)
    cfg = man["config"]
    if prompt_len + steps > cfg["max_seq_len"]:
        raise ValueError(f"parity: prompt {prompt_len} + {steps} steps exceed max_seq_len={cfg['max_seq_len']}")
    with tempfile.TemporaryDirectory(prefix="dsv4-parity-") as tmp:
        m = model if model is not None else eager_model(man, checkpoint, Path(tmp))
    m = m.eval()
    if generator is not None:
        gen = generator
    elif backend == "tvm":
        from dsv4.runtimes.tvm import Generator as TVMGenerator

        gen = TVMGenerator(art, verify=False, **(tvm_options or {}))
    elif backend == "ort":
        gen = Generator(art, providers=providers, optimization=optimization, threads=threads, verify=False)
    else:
        raise ValueError(f"parity: backend {backend!r} is not one of ort, tvm")
    ids = torch.randint(0, cfg["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    rep = ParityReport(str(art), list(key), asdict(tol), {"batch": batch, "length": prompt_len, "seed": seed,
                                                           "steps": steps, "optimization": optimization,
                                                           "backend": backend})
    names = gen.names

    def check(prefix: str, ref_logits, logits, ref_state, state):
        rep.rows.append(compare(f"{prefix}.logits", ref_logits, logits, tol.logits_abs, tol.max_share_out))
        for n in names:
            rep.rows.append(compare(f"{prefix}.{n}", ref_state[n].numpy(), state[n], tol.state_abs,
                                    tol.max_share_out))

    t = time.perf_counter()
    with torch.no_grad():
        ref_logits, ref_state = m(ids)
    rep.seconds["eager prefill"] = time.perf_counter() - t
    t = time.perf_counter()
    logits = gen.prefill(ids.numpy())
    rep.seconds["artifact prefill"] = time.perf_counter() - t
    check("prefill", ref_logits.numpy(), logits, ref_state, gen.state)
    rep.top1 = float(np.mean(ref_logits.numpy().argmax(-1) == logits.argmax(-1)))
    worst_ref, worst = [], []
    tok = ref_logits[:, -1:].argmax(-1)
    te = ta = 0.0
    for k in range(steps):
        t = time.perf_counter()
        with torch.no_grad():
            ref_logits, ref_state = m(tok, ref_state)
        te += time.perf_counter() - t
        t = time.perf_counter()
        logits = gen.step(tok.numpy())
        ta += time.perf_counter() - t
        nxt = ref_logits[:, -1:].argmax(-1)
        agree = bool(np.array_equal(logits[:, -1].argmax(-1), nxt[:, 0].numpy()))
        rep.greedy_steps += 1
        rep.greedy_agree += agree
        if not agree and rep.first_mismatch is None:
            rep.first_mismatch = k
        worst_ref.append(ref_logits.numpy())
        worst.append(logits)
        tok = nxt
    if steps:
        rep.seconds["eager decode step"] = te / steps
        rep.seconds["artifact decode step"] = ta / steps
        check("decode", np.concatenate(worst_ref, 1), np.concatenate(worst, 1), ref_state, gen.state)
    return rep


def render(rep: ParityReport):
    """A rich Table of the report."""
    from rich.table import Table

    t = Table(title=f"parity {rep.artifact}  tolerance {tuple(rep.tolerance_key)}: {rep.tolerance['reason']}")
    for c in ("tensor", "shape", "max abs", "max rel", "share out", "bound", "ok"):
        t.add_column(c, justify="right" if c not in ("tensor", "shape") else "left")
    for r in rep.rows:
        t.add_row(r.name, "x".join(map(str, r.shape)), f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", f"{r.share_out:.2%}",
                  f"{r.bound:.0e}", "[green]ok[/]" if r.ok else "[red]OUT[/]")
    t.caption = (f"prefill top-1 agreement {rep.top1:.1%} (min {rep.tolerance['min_top1']:.0%}) · greedy "
                 f"{rep.greedy_agree}/{rep.greedy_steps} (min {rep.tolerance['min_greedy']:.0%})"
                 + (f", first mismatch at step {rep.first_mismatch}" if rep.first_mismatch is not None else "")
                 + f" · {'[green]PASS[/]' if rep.ok else '[red]FAIL[/]'}")
    return t
