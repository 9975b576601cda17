"""Parity of an artifact against the eager model (the oracle), and THE tolerance table.

``run_parity(ART)`` runs both on the same seeded prompt: prefill logits at every position and every state
tensor, then N greedy decode steps (the eager model's token is fed to both, so each step compares like
with like; agreement counts the steps whose greedy token is the same). The report holds max abs / rel error
per output and state tensor, the share of elements out of tolerance, top-1 and greedy agreement, never a
bare bool. Tolerances live only in TOLERANCES, keyed by (activation dtype, quant_sim).

Where fp32 rounding noise alone moves argmaxes (fp32 with the quantisation simulation: a 1-ulp difference flips an
FP8/FP4 rounding decision), a fixed agreement threshold would judge the random test model rather than the
artifact. Those entries are *calibrated*: the eager model also runs as its fp64 twin (the same weights, every
rounding decision taken on exact values), the fp64 twin's greedy tokens drive all three, and the artifact must
agree with the fp64 twin nearly as often as the eager fp32 model itself does (`top1_slack`, `greedy_slack`).
"""

from __future__ import annotations

import copy
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
    # calibrated entries: the artifact's agreement with the eager model's fp64 twin may fall short of the eager
    # fp32 model's own agreement with that twin by at most this much (None: no fp64 twin is run)
    top1_slack: float | None = None
    greedy_slack: float | None = None


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
    # propagates (indexer top-k choices included). A property of the model in fp32, not of the artifact: eager
    # fp32 vs its fp64 twin, 300-token prompt, seeds 0/1: tiny 93-100% prefill top-1, 56-64/64 greedy; small
    # (random weights, median top-1/top-2 logit margin 0.18) 83-84% top-1, 11/16 greedy, max |Δlogits| 1.6-1.8.
    # ORT artifact vs eager fp32 on small: 85% top-1, 15/16 greedy, 1.76 — the same noise. So the elementwise
    # bound is reported but not judged (max_share_out 1.0); the verdict is calibrated against the fp64 twin
    # (slacks: 300 prefill positions give a binomial std of ~0.02 per agreement share, 64 steps ~0.06; a
    # wrong op agrees on almost nothing, hence also the absolute floors). Exactness of the quantised path
    # itself is established by the fp64 entry above (every rounding decision reproduced).
    ("float32", True): Tolerance(1e-4, 1e-4, 1.0, 0.5, 0.5, "fp32 + quant_sim: rounding flips, judged against "
                                 "the eager model's own fp32-vs-fp64 agreement", top1_slack=0.08, greedy_slack=0.2),
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
    # calibrated tolerances: agreement (prefill top-1, greedy) of the eager fp32 model and of the artifact with
    # the eager model's fp64 twin, whose greedy tokens then drive the decode steps
    vs_fp64: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def greedy(self) -> float:
        return self.greedy_agree / self.greedy_steps if self.greedy_steps else 1.0

    @property
    def ok(self) -> bool:
        t = self.tolerance
        ok = all(r.ok for r in self.rows) and self.top1 >= t["min_top1"] and self.greedy >= t["min_greedy"]
        if t.get("top1_slack") is not None and self.vs_fp64:
            v = self.vs_fp64
            ok = ok and v["artifact top-1"] >= v["eager top-1"] - t["top1_slack"]
            ok = ok and v["artifact greedy"] >= v["eager greedy"] - t["greedy_slack"]
        return ok

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


def fp64_twin(model):
    """A float64 copy of an eager model: same weights (packed bytes stay bytes), every computation in fp64."""
    twin = copy.deepcopy(model).to(torch.float64)
    twin.dtype = torch.float64
    return twin.eval()


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

    twin = fp64_twin(m) if tol.top1_slack is not None else None
    t = time.perf_counter()
    with torch.no_grad():
        ref_logits, ref_state = m(ids)
        if twin is not None:
            l64, s64 = twin(ids)
    rep.seconds["eager prefill"] = time.perf_counter() - t
    t = time.perf_counter()
    logits = gen.prefill(ids.numpy())
    rep.seconds["artifact prefill"] = time.perf_counter() - t
    check("prefill", ref_logits.numpy(), logits, ref_state, gen.state)
    rep.top1 = float(np.mean(ref_logits.numpy().argmax(-1) == logits.argmax(-1)))
    if twin is not None:
        top64 = l64.argmax(-1).numpy()
        rep.vs_fp64 = {"eager top-1": float(np.mean(ref_logits.argmax(-1).numpy() == top64)),
                       "artifact top-1": float(np.mean(logits.argmax(-1) == top64)), "eager greedy": 0.0,
                       "artifact greedy": 0.0}
    worst_ref, worst = [], []
    tok = (l64 if twin is not None else ref_logits)[:, -1:].argmax(-1)
    te = ta = 0.0
    agree64 = {"eager greedy": 0, "artifact greedy": 0}
    for k in range(steps):
        t = time.perf_counter()
        with torch.no_grad():
            ref_logits, ref_state = m(tok, ref_state)
            if twin is not None:
                l64, s64 = twin(tok, s64)
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
        if twin is not None:  # the fp64 twin's token drives all three; agreement is counted against it
            nxt = l64[:, -1:].argmax(-1)
            agree64["eager greedy"] += bool(torch.equal(ref_logits[:, -1].argmax(-1), nxt[:, 0]))
            agree64["artifact greedy"] += bool(np.array_equal(logits[:, -1].argmax(-1), nxt[:, 0].numpy()))
        tok = nxt
    if twin is not None and steps:
        rep.vs_fp64.update({k: v / steps for k, v in agree64.items()})
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
                 + (" · vs the fp64 twin: top-1 eager {eager top-1:.1%} / artifact {artifact top-1:.1%} (slack "
                    "{s1:.0%}), greedy eager {eager greedy:.1%} / artifact {artifact greedy:.1%} (slack {s2:.0%})"
                    .format(**rep.vs_fp64, s1=rep.tolerance["top1_slack"], s2=rep.tolerance["greedy_slack"])
                    if rep.vs_fp64 else "")
                 + f" · {'[green]PASS[/]' if rep.ok else '[red]FAIL[/]'}")
    return t
