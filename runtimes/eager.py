"""The eager side of a parity run: the eager model (and its fp64 twin and noise twins) on the parity prompt,
recorded once as a ``Reference`` that any artifact exported from the same model can be judged against."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dsv4.export.artifact import stage_printer
from dsv4.models.config import SIM_SWITCHES

from .verdict import ULP_REL, tolerance_for


# ---- the eager side ---------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """What one run computed: prefill logits and state, and per decode step its logits and state (by step)."""

    prefill_logits: np.ndarray | None = None
    prefill_state: dict = field(default_factory=dict)
    prefill_layers: dict = field(default_factory=dict)  # "layer{i}" -> [B,T,hc,D]
    step_logits: list = field(default_factory=list)  # [B,1,V] per step
    step_states: list = field(default_factory=list)  # output state of each step
    step_layers: list = field(default_factory=list)


@dataclass
class Reference:
    """The eager side of a parity run, reusable for every artifact exported from the same model and config (the
    mutation tests judge several artifacts against one). ``tokens[k]`` drives decode step k; ``inputs[k]`` is
    the eager state step k starts from (inputs[0] is the prefill's output)."""

    key: tuple
    ids: np.ndarray
    tokens: list
    eager: Trace
    noise: list  # Trace per noise twin (teacher-forced from the eager states)
    per_layer: bool
    fresh: dict  # the initial state (prefill's input)
    vs_fp64: dict = field(default_factory=dict)  # eager fp32 vs its fp64 twin: top-1, greedy
    twin_prefill_top: np.ndarray | None = None
    twin_step_tops: list = field(default_factory=list)  # the fp64 twin's greedy token per step
    eager_greedy_steps: list = field(default_factory=list)  # eager fp32 free-running token per step
    seconds: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.tokens)

    @property
    def inputs(self) -> list:
        return [self.eager.prefill_state, *self.eager.step_states[:-1]]


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor on the host as numpy (the eager model may run on a GPU; the comparisons run on the host)."""
    return t.detach().cpu().numpy()


def _np(state: dict) -> dict:
    return {k: _host(v) for k, v in state.items()}


def model_device(model) -> torch.device:
    """Where the eager model's tensors live (its first parameter or buffer; the CPU for an empty module)."""
    return next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device


NOISE_SITES = ("Linear", "RMSNorm", "MoE")  # module classes whose outputs a noise twin moves (+ the layer outputs)


def accumulation_spread(k: int) -> float:
    """The spread of an fp32 dot product of length `k` between two summation orders, in units of 2^-23 x the rms of
    the outputs: min(3, 0.15 sqrt(k)). Measured (docs/parity.md, 64 x k @ k x 512 Gaussian): torch vs fp64 1.2
    (k 64), 2.4 (256, 1024), 2.9-3.1 (4096-16384); ORT's MLAS vs torch 0 (k <= 256: same order), 2.7-3.3 (k >=
    2048). One fp32 ulp of each output, what the twins moved before, is ~1 of these units: at k = 4096 MLAS and
    torch differ by 4 ulps at the median, 25 at p90."""
    return min(3.0, 0.15 * k ** 0.5)


def _reduction(mod) -> int:
    """The length of the fp32 dot products behind a noise site's output (0: none, only its own rounding)."""
    name = type(mod).__name__
    return mod.in_features if name == "Linear" else mod.args.moe_inter_dim if name == "MoE" else 0


@contextlib.contextmanager
def _hooks(model, perturb_seed: int | None, capture: dict | None):
    """Forward hooks: with `perturb_seed`, move the outputs of every linear layer, RMSNorm, MoE and decoder layer
    (a noise twin: where another fp32 implementation's accumulation order and rounding differ): each element by
    +-1 ulp of its own type at random, and the outputs of a length-k reduction (linear: k = in_features; MoE: the
    expert GEMMs' moe_inter_dim) also by a Gaussian of standard deviation accumulation_spread(k) x 2^-23 x the rms of
    the output row (fp32 accumulation, whatever the output type); with `capture`, record every decoder layer's
    output streams ("layer{i}" -> numpy)."""
    gen = torch.Generator().manual_seed(perturb_seed) if perturb_seed is not None else None
    handles = []

    def jitter(t, k: int = 0):
        r = torch.randint(0, 3, t.shape, generator=gen).to(device=t.device, dtype=t.dtype) - 1
        out = t * (1 + torch.finfo(t.dtype).eps * r)  # 1 ulp of the tensor's own type (ULP_REL for fp32)
        if k:
            rms = t.float().square().mean(-1, keepdim=True).sqrt()
            g = torch.randn(t.shape, generator=gen).to(t.device)
            out = (out.float() + ULP_REL * accumulation_spread(k) * rms * g).to(t.dtype)
        return out

    def layer_hook(i):
        def hook(mod, inp, out):
            X, st = out
            if gen is not None:
                X = jitter(X)
            if capture is not None:
                capture[f"layer{i}"] = _host(X).copy()
            return X, st
        return hook

    def module_hook(mod, inp, out):
        return jitter(out, _reduction(mod)) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    if gen is not None:
        handles += [mod.register_forward_hook(module_hook) for mod in model.modules()
                    if type(mod).__name__ in NOISE_SITES]
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_hook(layer_hook(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def eager_model(manifest: dict, checkpoint: str | Path | None = None, workdir: Path | None = None,
                identity: bool = True, near: str | Path | None = None):
    """The eager DeepseekV4 the artifact was exported from: `checkpoint` if given, else the manifest's source (a
    checkpoint found by its identity, ``find_checkpoint``, or a synthetic preset + seed, rebuilt in `workdir`).
    near: the artifact's directory (its siblings are searched). identity=False: accept a checkpoint whose
    index/config differ from the source's (a converted or deliberately different one)."""
    from dsv4.models.checkpoint import load_model

    dtype = getattr(torch, manifest["dtype"])
    cfg = manifest["config"]
    overrides = {"max_seq_len": cfg["max_seq_len"], "quant_sim": cfg["quant_sim"]}
    overrides |= {f: cfg[f] for f in SIM_SWITCHES.values() if cfg.get(f) is not None}  # the three switches
    if cfg.get("compact_state") is not None:  # the state layout of the artifact (docs/state_layout.md)
        overrides["compact_state"] = cfg["compact_state"]
    src = manifest["source"]
    if checkpoint is None and src["kind"] == "checkpoint":
        roots = _search_roots(near)
        checkpoint = find_checkpoint(src.get("identity") or {}, roots)
        if checkpoint is None:
            raise ValueError(f"parity: the checkpoint the artifact was exported from (identity "
                             f"{(src.get('identity') or {}).get('sha256', '?')[:16]}…) is not in "
                             f"{', '.join(map(str, roots))} or ${SEARCH_ENV}; pass --checkpoint DIR")
    if checkpoint is not None and src.get("identity") and identity:
        check_identity(Path(checkpoint), src["identity"])
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


SEARCH_ENV = "DSV4_CHECKPOINTS"  # more directories (os.pathsep-separated) where parity looks for a source checkpoint


def _search_roots(near: str | Path | None) -> list[Path]:
    roots = [Path.cwd()] + ([Path(near).resolve().parent] if near is not None else [])
    roots += [Path(p) for p in os.environ.get(SEARCH_ENV, "").split(os.pathsep) if p]
    return list(dict.fromkeys(r.resolve() for r in roots))


def find_checkpoint(want: dict, roots: list[Path]) -> Path | None:
    """The checkpoint whose identity (sha256 of its index and config.json, export/package.py) is `want`, among
    each root and its immediate subdirectories that hold a config.json: artifacts record the identity, not the
    host path, so an artifact moved to another machine finds its checkpoint wherever it lies there."""
    from dsv4.export.package import checkpoint_identity

    if not want.get("sha256"):
        return None
    for root in roots:
        cands = [root, *sorted(d for d in root.iterdir() if d.is_dir())] if root.is_dir() else []
        for d in cands:
            if (d / "config.json").is_file() and checkpoint_identity(d)["sha256"] == want["sha256"]:
                return d
    return None


def check_identity(ck: Path, want: dict) -> None:
    """Refuse a checkpoint that is not the one the artifact was exported from: the sha256 over its index and
    config.json (export/package.py checkpoint_identity) must equal the manifest's ``source.identity``."""
    from dsv4.export.package import checkpoint_identity

    got = checkpoint_identity(ck)
    if got["sha256"] != want.get("sha256"):
        raise ValueError(f"parity: {ck} is not the checkpoint this artifact was exported from (identity over "
                         f"{', '.join(got['of']) or 'no index or config'}: {got['sha256'][:16]}…, the manifest's: "
                         f"{str(want.get('sha256'))[:16]}…)")


def fp64_twin(model):
    """A float64 copy of an eager model: same weights (packed bytes stay bytes), every computation in fp64."""
    twin = copy.deepcopy(model).to(torch.float64)
    twin.dtype = torch.float64
    return twin.eval()


def eager_reference(model, manifest: dict, *, steps: int = 64, prompt_len: int = 300, batch: int = 1, seed: int = 0,
                    per_layer: bool = False, stage: Callable | None = None) -> Reference:
    """Run the eager model (and, for calibrated tolerances, its fp64 twin and noise twins) on the parity prompt, on
    the device the model is on (the GPU check runs it on the GPU); everything recorded is host numpy."""
    from dsv4.models.state import init_state

    if stage is None:
        with stage_printer(False) as quiet:
            return eager_reference(model, manifest, steps=steps, prompt_len=prompt_len, batch=batch, seed=seed,
                                   per_layer=per_layer, stage=quiet)
    key, tol = tolerance_for(manifest)
    cfg = manifest["config"]
    if prompt_len + steps > cfg["max_seq_len"]:
        raise ValueError(f"parity: prompt {prompt_len} + {steps} steps exceed max_seq_len={cfg['max_seq_len']}")
    m = model.eval()
    ids = torch.randint(0, cfg["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    dev = model_device(m)

    def on_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(dev)
    calibrated = tol.noise_factor is not None
    ref = Reference(key, ids.numpy(), [], Trace(), [], per_layer, _np(init_state(m.args, batch, m.dtype)))
    cap: dict = {}
    t = time.perf_counter()
    with stage(f"eager prefill ({prompt_len} tokens)"), torch.no_grad(), _hooks(m, None, cap if per_layer else None):
        logits, state = m(ids.to(dev))
    ref.eager.prefill_logits, ref.eager.prefill_state, ref.eager.prefill_layers = _host(logits), _np(state), dict(cap)
    ref.seconds["eager prefill"] = time.perf_counter() - t

    # the driving tokens: the fp64 twin's greedy tokens (calibrated) or the eager model's own
    calibrated_tokens = tol.top1_slack is not None
    if calibrated_tokens:
        twin = fp64_twin(m)
        with stage(f"fp64 twin: prefill + {steps} steps") as st, torch.no_grad():
            l64, s64 = twin(ids.to(dev))
            ref.twin_prefill_top = _host(l64.argmax(-1))
            tok = l64[:, -1:].argmax(-1)
            for k in range(steps):
                st.update(f"step {k + 1}/{steps}")
                ref.tokens.append(_host(tok))
                l64, s64 = twin(tok, s64)
                tok = l64[:, -1:].argmax(-1)
                ref.twin_step_tops.append(_host(tok[:, 0]))
        del twin
    t = time.perf_counter()
    with stage(f"eager decode ({steps} steps)") as progress, torch.no_grad():
        tok = logits[:, -1:].argmax(-1)
        st = state
        for k in range(steps):
            progress.update(f"step {k + 1}/{steps}")
            if not calibrated_tokens:
                ref.tokens.append(_host(tok))
            cap = {}
            with _hooks(m, None, cap if per_layer else None):
                lk, st = m(on_dev(ref.tokens[k]), st)
            ref.eager.step_logits.append(_host(lk))
            ref.eager.step_states.append(_np(st))
            ref.eager.step_layers.append(dict(cap))
            ref.eager_greedy_steps.append(_host(lk[:, -1].argmax(-1)))
            tok = lk[:, -1:].argmax(-1)
    ref.seconds["eager decode step"] = (time.perf_counter() - t) / max(steps, 1)
    if tol.top1_slack is not None:
        ref.vs_fp64 = {"eager top-1": float(np.mean(ref.eager.prefill_logits.argmax(-1) == ref.twin_prefill_top)),
                       "eager greedy": float(np.mean([np.array_equal(a, b) for a, b in
                                                      zip(ref.eager_greedy_steps, ref.twin_step_tops)]))
                       if steps else 1.0}
    if calibrated:
        for j in range(tol.noise_twins):
            tr = Trace()
            with stage(f"noise twin {j + 1}/{tol.noise_twins}: prefill + {steps} steps") as st, torch.no_grad():
                cap = {}
                with _hooks(m, 1000 + j, cap):
                    lj, sj = m(ids.to(dev))
                tr.prefill_logits, tr.prefill_state, tr.prefill_layers = _host(lj), _np(sj), dict(cap)
                for k, s_in in enumerate(ref.inputs):
                    st.update(f"step {k + 1}/{steps}")
                    cap = {}
                    with _hooks(m, 2000 + 97 * j + k, cap):
                        lk, sk = m(on_dev(ref.tokens[k]), {n: on_dev(v) for n, v in s_in.items()})
                    tr.step_logits.append(_host(lk))
                    tr.step_states.append(_np(sk))
                    tr.step_layers.append(dict(cap) if per_layer else {})
            ref.noise.append(tr)
    return ref
