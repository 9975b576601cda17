"""MTP sidecar and speculative decoding (issue [10]): export --mtp, runtimes/ort/speculative.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4.export.signature import INPUT_IDS, past
from dsv4.models import init_state
from dsv4.runtimes.ort import Generator
from dsv4.runtimes.ort.speculative import _fresh

PROMPT = [int(x) for x in np.random.default_rng(3).integers(0, 512, 40)]
STEPS = 64


@pytest.fixture(scope="module")
def gen(tiny_artifact_f32):
    return Generator(tiny_artifact_f32, threads=1)


@pytest.fixture(scope="module")
def plain(gen):
    return [int(t[0]) for t in gen.generate([PROMPT], STEPS, ignore_eos=True)]


class _Oracle:
    """The MTP session, its logits replaced by a one-hot of the true greedy token (or a wrong one every
    `wrong_every` calls): drives the accept path that random tiny weights almost never take."""

    def __init__(self, session, full: list[int], wrong_every: int = 0):
        self.s, self.full, self.wrong_every, self.calls = session, full, wrong_every, 0

    def get_outputs(self):
        return self.s.get_outputs()

    def run(self, names, feeds):
        out = self.s.run(names, feeds)
        self.calls += 1
        at = int(feeds[past("pos")][0]) + feeds[INPUT_IDS].shape[1] + 1  # the pairs end at s; they predict s + 2
        tok = self.full[at] if at < len(self.full) else 0
        if self.wrong_every and self.calls % self.wrong_every == 0:
            tok = (tok + 1) % out[0].shape[-1]
        out[0] = np.full_like(out[0], -1.0)
        out[0][..., tok] = 1.0
        return out


def test_manifest_and_graphs(gen):
    """--mtp adds mtp.onnx and verify.onnx to the one weights file; prefill/decode output the final streams."""
    man = gen.manifest
    assert man["mtp"] and {"verify", "mtp"} <= set(man["graphs"]) and [e["name"] for e in man["mtp_state"]][0] == "pos"
    outs = {g: [o["name"] for o in man["graphs"][g]["outputs"]] for g in man["graphs"]}
    assert outs["prefill"][-1] == outs["decode"][-1] == outs["verify"][-1] == "hidden"
    assert man["graphs"]["verify"]["outputs"][0]["dims"] == ["batch", "length", 512]


def test_speculative_equals_plain_greedy_with_the_real_mtp(gen, plain, capsys):
    """64 tokens of speculative decoding with the artifact's MTP graph are plain greedy decoding's tokens."""
    got = [int(t[0]) for t in gen.generate_speculative(PROMPT, STEPS, ignore_eos=True)]
    assert got == plain
    st = gen.stats
    assert st["drafted"] >= 32 and 0.0 <= st["acceptance"] <= 1.0 and st["decode_tokens"] == STEPS - 1


@pytest.mark.parametrize("wrong_every", [0, 3])
def test_accepted_drafts_keep_the_tokens_and_save_main_calls(gen, plain, wrong_every):
    """With drafts that are right (all, or 2 of 3), the accept path (verify keeps 2 tokens, the state is the
    verify graph's) gives the same 64 tokens in fewer main-model calls; a wrong draft is dropped."""
    real = gen.sessions["mtp"]
    gen.sessions["mtp"] = _Oracle(real, PROMPT + plain, wrong_every)
    try:
        got = [int(t[0]) for t in gen.generate_speculative(PROMPT, STEPS, ignore_eos=True)]
    finally:
        gen.sessions["mtp"] = real
    st = gen.stats
    assert got == plain
    if wrong_every == 0:
        assert st["acceptance"] == 1.0 and st["main_calls"] == st["drafted"] <= STEPS // 2
    else:
        assert 0.5 <= st["acceptance"] < 1.0 and st["main_calls"] < STEPS - 1


def test_mtp_graph_matches_the_eager_mtp_block(gen, tiny_eager_f32):
    """The MTP graph's draft logits equal the eager forward_mtp's within the strict fp32 bound (1e-4)."""
    ids = np.array([PROMPT], dtype=np.int64)
    pre = gen.sessions["prefill"]
    out = dict(zip((o.name for o in pre.get_outputs()), pre.run(None, {INPUT_IDS: ids})))
    nxt = np.array([[*PROMPT[1:], int(out["logits"][0, -1].argmax())]], dtype=np.int64)
    feeds = {"hidden": out["hidden"], INPUT_IDS: nxt}
    feeds |= {past(k): v for k, v in _fresh(gen.manifest["mtp_state"], 1).items()}
    got = gen.sessions["mtp"].run(None, feeds)[0]
    with torch.no_grad():
        _, _, hidden = tiny_eager_f32.step(torch.from_numpy(ids), init_state(tiny_eager_f32.args, 1))
        ref, _, _ = tiny_eager_f32.forward_mtp(hidden, torch.from_numpy(nxt), last_only=True)
    assert np.abs(got - ref.numpy()).max() <= 1e-4
    assert np.abs(out["hidden"] - hidden.numpy()).max() <= 1e-4


def test_speculative_cli_prints_the_acceptance(tiny_artifact_f32, capsys):
    from dsv4.tools.cli import main

    assert main(["generate", str(tiny_artifact_f32), "--prompt-ids", ",".join(map(str, PROMPT[:10])),
                 "--max-new-tokens", "8", "--ids", "--speculative"]) == 0
    err = capsys.readouterr().err
    assert "MTP drafts accepted (acceptance" in err
