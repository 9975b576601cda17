"""runtimes/parity: the artifact against the eager model (the acceptance of issue [3]) and ``dsv4 parity``.

Bounds come from runtimes/parity.py TOLERANCES (each with its reason); the acceptance bound of the issue,
1e-4 on logits with 64/64 identical greedy tokens, is also asserted explicitly where it is meaningful.
"""

from __future__ import annotations

import json

import pytest

from dsv4.runtimes.parity import TOLERANCES, compare, run_parity

ACCEPT_LOGITS = 1e-4  # issue [3]: ORT-CPU vs eager max |Δlogits| over a 300-token prefill and 64 greedy steps


def _assert_strict(rep, bound):
    for r in rep.rows:
        assert r.max_abs <= bound, f"{r.name}: {r.max_abs:.3g} > {bound}"
    assert rep.greedy_agree == rep.greedy_steps == 64 and rep.top1 == 1.0
    assert rep.ok


@pytest.mark.parametrize("optimization", ["all", "disable"])
def test_fp32_without_quant_sim_matches_eager(tiny_artifact_f32, tiny_eager_f32, optimization):
    """tiny fp32, quant_sim off: 300-token prefill (all positions, every state tensor) + 64 greedy steps, within
    1e-4, identical tokens; with ORT's graph optimizations enabled and disabled."""
    rep = run_parity(tiny_artifact_f32, model=tiny_eager_f32, steps=64, prompt_len=300, optimization=optimization)
    assert tuple(rep.tolerance_key) == ("float32", False)
    _assert_strict(rep, ACCEPT_LOGITS)


@pytest.mark.slow  # a third export (~1-2.5 min on 2 cores) + 64 fp64 steps
def test_fp64_with_quant_sim_reproduces_every_rounding_decision(tiny_artifact_f64, tiny_model_f64):
    """tiny fp64, quant_sim on: the graph takes every FP8/FP4 rounding decision the eager model takes, so the two
    agree to fp64 accumulation noise (measured ~4e-14) over the same 300 + 64 tokens."""
    rep = run_parity(tiny_artifact_f64, model=tiny_model_f64, steps=64, prompt_len=300)
    assert tuple(rep.tolerance_key) == ("float64", True)
    _assert_strict(rep, TOLERANCES[("float64", True)].logits_abs)


@pytest.mark.parametrize("optimization", ["all", "disable"])
def test_fp32_packed_with_quant_sim(tiny_artifact, tiny_packed_reference, optimization):
    """tiny as shipped (packed FP8/MXFP4, quant_sim on, fp32): within the calibrated fp32+quant_sim tolerance
    (rounding flips, see TOLERANCES): the artifact agrees with the eager model's fp64 twin about as often as the
    eager fp32 model does; most elements still within 1e-4."""
    rep = run_parity(tiny_artifact, reference=tiny_packed_reference, optimization=optimization)  # 300 + 64
    assert tuple(rep.tolerance_key) == ("float32", True)
    assert rep.ok, ([r for r in rep.rows if not r.ok], rep.vs_fp64)
    assert set(rep.vs_fp64) == {"eager top-1", "artifact top-1", "eager greedy", "artifact greedy"}
    assert rep.vs_fp64["artifact top-1"] >= 0.9 and rep.vs_fp64["artifact greedy"] >= 0.75
    logits = next(r for r in rep.rows if r.name == "prefill.logits")
    assert logits.share_out < 0.5


def test_fp64_twin_is_the_fp64_model(tiny_checkpoint, tiny_eager_packed):
    """The calibration reference: the fp32 model's fp64 twin computes exactly what load_model(dtype=float64)
    computes (0.0 difference on logits and state)."""
    import torch

    from dsv4.models.checkpoint import load_model
    from dsv4.runtimes.parity import fp64_twin

    m64 = load_model(tiny_checkpoint, dtype=torch.float64, keep_quantized=True, max_seq_len=1024, progress=False)
    ids = torch.randint(0, m64.args.vocab_size, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        (a, sa), (b, sb) = m64(ids), fp64_twin(tiny_eager_packed)(ids)
    assert b.dtype == torch.float64 and torch.equal(a, b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert next(tiny_eager_packed.parameters()).dtype == torch.float32  # the original is untouched


def test_calibrated_verdict():
    """fp32 + quant_sim: the artifact may fall short of the eager model's own agreement with the fp64 twin by the
    slack, not more; the absolute floors still apply."""
    from dataclasses import asdict

    from dsv4.runtimes.parity import ParityReport

    tol = TOLERANCES[("float32", True)]

    def rep(eager, art, greedy=(0.7, 0.7), top1=0.85):
        return ParityReport("a", ["float32", True], asdict(tol), {}, top1=top1, greedy_steps=10, greedy_agree=8,
                            vs_fp64={"eager top-1": eager, "artifact top-1": art, "eager greedy": greedy[0],
                                     "artifact greedy": greedy[1]})

    assert rep(0.83, 0.85).ok and rep(0.83, 0.83 - tol.top1_slack + 0.01).ok
    assert not rep(0.83, 0.83 - tol.top1_slack - 0.01).ok
    assert not rep(0.83, 0.85, greedy=(0.7, 0.7 - tol.greedy_slack - 0.05)).ok
    assert not rep(0.83, 0.85, top1=0.4).ok  # below the absolute floor


def test_batch2_and_two_prompt_lengths_through_one_artifact(tiny_artifact_f32, tiny_eager_f32):
    for length in (37, 300):
        rep = run_parity(tiny_artifact_f32, model=tiny_eager_f32, steps=8, prompt_len=length, batch=2, seed=length)
        assert rep.prompt["batch"] == 2
        assert all(r.max_abs <= ACCEPT_LOGITS for r in rep.rows) and rep.greedy_agree == 8 and rep.ok


def test_compare_counts_non_finite_mismatches():
    import numpy as np

    ref = np.array([1.0, -np.inf, 3.0])
    assert compare("x", ref, ref.copy(), 1e-4, 0.0).ok
    c = compare("x", ref, np.array([1.0, 0.0, 3.0]), 1e-4, 0.0)
    assert not c.ok and c.max_abs == np.inf and c.share_out == pytest.approx(1 / 3)
    assert not compare("x", ref, ref[:2], 1e-4, 0.0).ok


def test_parity_cli_passes_and_fails(tiny_artifact, tmp_path, capsys):
    """``dsv4 parity`` finds the eager model by the manifest's identity ($DSV4_CHECKPOINTS, set by the
    tiny_checkpoint fixture), prints JSON; refuses another checkpoint (another
    seed: its identity differs) in one line, and with --any-checkpoint runs it and exits 1 (wrong weights)."""
    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset
    from dsv4.tools.cli import main

    assert main(["parity", str(tiny_artifact), "--steps", "4", "--prompt-len", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["greedy_steps"] == 4 and out["rows"][0]["name"] == "prefill.logits"
    assert out["summary"] == "PASS" and out["diverged"] == [] and all(r["criterion"] for r in out["rows"])
    assert {"eager prefill", "artifact prefill", "artifact decode step"} <= set(out["seconds"])
    other = write_synthetic(preset("tiny"), tmp_path / "seed1", seed=1, progress=False)
    assert main(["parity", str(tiny_artifact), "--checkpoint", str(other), "--steps", "4", "--prompt-len", "40"]) == 2
    assert "seed1 is not the checkpoint this artifact was exported from" in capsys.readouterr().err
    assert main(["parity", str(tiny_artifact), "--checkpoint", str(other), "--any-checkpoint", "--steps", "4",
                 "--prompt-len", "40"]) == 1
    lines = capsys.readouterr().out.splitlines()  # not a terminal: one row a line, one problem a line, the verdict
    assert lines[-1].startswith("FAIL: diverged: prefill.logits")
    assert any(line.startswith("problem: prefill.logits: p50 ") for line in lines)


def _default_export(tmp_path, preset_name: str, seed: int):
    """``dsv4 export --preset P --seed S``: packed FP8/MXFP4, quant_sim on, fp32, the ort-cpu pipeline."""
    from dsv4.export.export import export_artifact
    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset
    from dsv4.passes.pipeline import run

    ck = write_synthetic(preset(preset_name), tmp_path / "ckpt", seed=seed, progress=False)
    return export_artifact(tmp_path / "art", checkpoint=ck, progress=False,
                           transform=lambda model, graph, target: run(model, target.name)).path


@pytest.mark.slow  # one tiny export each (~2.5 min on 2 cores)
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_honest_tiny_artifacts_pass_the_calibrated_verdict(tmp_path, seed):
    """Issue [6]: honest default artifacts of five checkpoint seeds pass with the default 300-token prompt + 64 steps."""
    rep = run_parity(_default_export(tmp_path, "tiny", seed), steps=64, prompt_len=300, threads=1)
    assert rep.ok, rep.summary()


@pytest.mark.slow  # the small export and 64 steps (~10 min on 2 cores)
def test_honest_small_artifact_passes_the_calibrated_verdict(tmp_path):
    rep = run_parity(_default_export(tmp_path, "small", 0), steps=64, prompt_len=300, threads=1)
    assert rep.ok, rep.summary()


def test_judge_rows_holds_quantiles_and_share_to_the_noise_twins():
    """The calibrated verdict of one tensor: sparse flips like the twins' pass; a systematic shift of every position
    or 20% of the decode steps fails, naming the quantile or share; prefill judges the median only."""
    import numpy as np

    from dsv4.runtimes.parity import judge_rows

    tol = TOLERANCES[("float32", True)]
    rng = np.random.default_rng(0)
    noise = [np.abs(rng.normal(0, 1e-6, 300)) for _ in range(2)]
    noise[0][:5] = 0.05  # a twin's flips
    honest = np.abs(rng.normal(0, 1e-6, 300))
    honest[:6] = 0.04
    ok = judge_rows("decode.logits", [300], honest, noise, 1e-4, tol, scale=3.0, propagating=False)
    assert ok.ok and ok.bound == pytest.approx(3e-4) and ok.failed == ""
    shifted = honest + 0.03
    bad = judge_rows("decode.logits", [300], shifted, noise, 1e-4, tol, scale=3.0, propagating=False)
    assert not bad.ok and bad.failed.startswith("p50 0.03") and "of positions >" in bad.failed
    some = honest.copy()
    some[:60] = 0.05  # 20% of the steps
    part = judge_rows("decode.logits", [300], some, noise, 1e-4, tol, scale=3.0, propagating=False)
    assert not part.ok and part.failed.startswith("p90 0.05") and "20.0% of positions" in part.failed
    assert judge_rows("prefill.logits", [300], some, noise, 1e-4, tol, scale=3.0, propagating=True).ok
    assert not judge_rows("prefill.logits", [300], shifted, noise, 1e-4, tol, scale=3.0, propagating=True).ok


def test_noise_twins_move_linear_outputs_by_the_accumulation_spread_of_their_length():
    """A noise twin moves a linear layer's outputs by +-1 ulp plus accumulation_spread(k) x 2^-23 x rms(row): at
    k = 4096 about 3 units (what ORT's MLAS and torch differ by there), at k = 64 about 1.2; an RMSNorm by +-1 ulp
    only. Measured as the std of the twin's change over the unperturbed output, in units of 2^-23 x rms."""
    import torch
    from torch import nn

    from dsv4.models.model import Linear, RMSNorm
    from dsv4.runtimes.eager import _hooks, accumulation_spread

    assert accumulation_spread(64) == pytest.approx(1.2) and accumulation_spread(4096) == 3.0
    assert accumulation_spread(1 << 20) == 3.0 and accumulation_spread(256) == pytest.approx(2.4)

    class M(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.lin, self.norm, self.layers = Linear(k, 512), RMSNorm(512, 1e-6), nn.ModuleList()
            nn.init.normal_(self.lin.weight, std=k ** -0.5)

        def forward(self, x, h):
            return self.lin(x), self.norm(h)

    for k, want in ((4096, 3.0), (64, 1.2)):
        m = M(k)
        x, h = torch.randn(64, k, generator=torch.Generator().manual_seed(1)), torch.randn(64, 512)
        with torch.no_grad():
            y0, n0 = m(x, h)
            with _hooks(m, 7, None):
                y1, n1 = m(x, h)
        unit = 2.0 ** -23 * y0.square().mean(-1, keepdim=True).sqrt()
        got = float(((y1 - y0).double() / unit).std())
        # +-1 ulp of each element adds ~0.5-0.8 unit in quadrature (an ulp is 0.5-1 x 2^-23 x |y| relative)
        assert want <= got <= (want ** 2 + 1.0) ** 0.5 + 0.1, (k, got)
        step = (torch.nextafter(n0.abs(), torch.tensor(float("inf"))) - n0.abs())  # one ulp of each element
        assert 0 < float(((n1 - n0).abs() / step).max()) <= 2.0  # t (1 +- eps): 1-2 ulps, by its mantissa


def test_prefill_median_is_held_to_the_twins_worst_decile_not_their_median():
    """Propagating rows: an honest artifact whose early flip reached 80% of the rows, against twins whose flips
    reached 40% and none (their medians both fp32 noise), passes: its median is a flip no larger than the twins'
    flips. A median 5x the twins' flips fails, and so does a flipped median when no twin flipped a tenth of its
    rows. Decode rows stay held to the twins' p50 and p90."""
    import numpy as np

    from dsv4.runtimes.parity import judge_rows

    tol = TOLERANCES[("float32", True)]
    rng = np.random.default_rng(0)
    calm = np.abs(rng.normal(0, 1e-6, 64))
    some = calm.copy()
    some[38:] = 0.25  # a twin whose flips reached 40% of the rows: p50 fp32 noise, p90 a flip
    art = calm.copy()
    art[13:] = 0.25  # the artifact's flip at row 13 reached the rest
    row = judge_rows("prefill.1.window", [1, 128, 512], art, [calm, some], 1e-4, tol, scale=4.0, propagating=True)
    assert row.ok and row.quantiles["p50"] == 0.25 and row.floor["p50"] < 1e-5 and row.floor["p90"] == 0.25
    assert row.criterion == "p50 ≤ max(4×noise p90, 4.0e-04)"
    gross = judge_rows("prefill.1.window", [1, 128, 512], art * 5, [calm, some], 1e-4, tol, scale=4.0,
                       propagating=True)
    assert not gross.ok and gross.failed == "p50 1.25 > 1"
    few = calm.copy()
    few[60:] = 0.25  # 6% of the rows: p90 still fp32 noise
    quiet = judge_rows("prefill.1.window", [1, 128, 512], art, [calm, few], 1e-4, tol, scale=4.0, propagating=True)
    assert not quiet.ok and quiet.failed == "p50 0.25 > 0.0004"
    dec = judge_rows("decode.1.window", [8, 1, 128, 512], art, [calm, some], 1e-4, tol, scale=4.0,
                     propagating=False)
    assert not dec.ok and dec.failed.startswith("p50 0.25 > 0.0004")
