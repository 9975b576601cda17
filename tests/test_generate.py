"""runtimes/base.py Generator.generate: ragged batches equal their solo runs, per-sequence stops, argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from dsv4.runtimes.base import Generator, check_sampling, sample


class Counting(Generator):
    """A runtime whose next token is (last id + position) % 10, state = pos + last id; eos 9."""

    vocab_size, max_seq_len, eos_token_id = 10, 40, 9

    def _logits(self, ids, pos):
        out = np.zeros((*ids.shape, 10))
        out[np.arange(len(pos)), -1, (ids[:, -1] + pos) % 10] = 1
        return out

    def _run_prefill(self, ids, capacity=None):
        pos = np.full(len(ids), ids.shape[1])
        return self._logits(ids, pos), {"pos": pos, "last": ids[:, -1:]}

    def _run_decode(self, ids, state):
        pos = state["pos"] + 1
        return self._logits(ids, pos), {"pos": pos, "last": ids}


def _solo(gen, prompt, n, **kw):
    return [int(t[0]) for t in gen.generate([prompt], n, **kw)]


def test_ragged_batch_stops_each_sequence_at_eos_and_stop_ids():
    """Each row gets its solo tokens; a row that yields eos (or a stop id) yields -1 from then on, the others go on."""
    g = Counting()
    prompts = [[1, 2], [3], [4, 5, 6, 7]]
    steps = np.stack(list(g.generate(prompts, 6)), 1)
    for row, p in zip(steps, prompts):
        solo = _solo(Counting(), p, 6)
        assert row[: len(solo)].tolist() == solo and (row[len(solo):] == -1).all()
    assert steps.tolist() == [[4, 7, 1, 6, 2, 9], [4, 6, 9, -1, -1, -1], [1, 6, 2, 9, -1, -1]]
    assert g.stats["prefill_tokens"] == 7 and g.stats["decode_tokens"] == 5 + 2 + 3
    assert g.position.tolist() == [7]  # finished rows left the batch
    stopped = np.stack(list(Counting().generate(prompts, 6, stop=[7])), 1)
    assert stopped.tolist() == [[4, 7, -1, -1], [4, 6, 9, -1], [1, 6, 2, 9]]  # all stopped after 4
    assert _solo(Counting(), [3], 6, ignore_eos=True) == [4, 6, 9, 3, 8, 4]


def test_all_sequences_stopped_ends_the_loop():
    assert len(list(Counting().generate([[3], [1, 2]], 20))) == 6  # 3 tokens, then 6 up to its eos
    assert len(list(Counting().generate([[3], [4, 5, 6]], 20, stop=[4]))) == 1  # a stop id and an eos at once


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=float("nan")), "temperature: must be a finite number"),
    (dict(temperature=-1.0), "temperature: must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=float("nan")), r"top_p: must be in \(0, 1\]"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-3), "top_k: must be an integer >= 0"),
    (dict(top_k=2.5), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(stop="9"), "stop: must be token ids"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_arguments_fail_before_any_work(kw, msg):
    class Boom(Counting):
        def _run_prefill(self, ids):
            raise AssertionError("prefill ran")

    n = kw.pop("max_new_tokens", 4)
    with pytest.raises(ValueError, match=msg):
        Boom().generate([[1, 2]], n, **kw)  # raised at the call, not at the first next()


def test_bad_prompts_name_the_prompt():
    g = Counting()
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty list"):
        g.generate([[1], []], 2)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 12 at \[0, 1\] is outside the vocabulary"):
        g.generate([[1, 12], [3]], 2)
    g.fixed_batch = 2
    with pytest.raises(ValueError, match="static batch of 2; prompts of different lengths"):
        g.generate([[1, 2], [3]], 2)


def test_top_k_limits_the_sampled_set():
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    rng = np.random.default_rng(0)
    assert {int(sample(logits, 1.0, 1.0, rng, top_k=2)[0]) for _ in range(200)} == {0, 1}
    assert {int(sample(logits, 1.0, 1.0, rng)[0]) for _ in range(400)} == {0, 1, 2, 3}
    check_sampling(3, 0.7, 0.9, 40, 1, [1, 2])


def test_generate_command_checks_arguments_before_loading(tmp_path, capsys):
    """``--temperature nan`` is refused naming the flag, before the (here missing) artifact is read."""
    from dsv4.tools.cli import main

    for args, msg in ((["--temperature", "nan"], "--temperature: must be a finite number"),
                      (["--top-p", "1.5"], "--top-p: must be in"), (["--stop", "a"], "--stop: expected"),
                      (["--max-new-tokens", "-2"], "--max-new-tokens")):
        assert main(["generate", str(tmp_path / "none"), "--prompt-ids", "1,2"] + args) == 2
        err = capsys.readouterr().err
        assert msg in err and "not an artifact" not in err


# ---- on the tiny artifact ---------------------------------------------------------------------------------------
def test_ragged_batch_5_37_300_equals_solo_runs(tiny_artifact_f32):
    """Prompts of 5, 37 and 300 tokens in one batch, 64 greedy steps: each sequence's tokens equal its solo run
    (no padding leaks between rows); then a stop id ends one sequence while the others continue."""
    from dsv4.runtimes.ort import Generator as OrtGenerator

    gen = OrtGenerator(tiny_artifact_f32, verify=False)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, gen.vocab_size, n).tolist() for n in (5, 37, 300)]
    solo = [np.array([t[0] for t in gen.generate([p], 64, ignore_eos=True)]) for p in prompts]
    both = np.stack(list(gen.generate(prompts, 64, ignore_eos=True)), 1)
    for i in range(3):
        np.testing.assert_array_equal(both[i], solo[i], err_msg=f"sequence {i} (length {len(prompts[i])})")
    # a stop id that sequence 1 yields at step k >= 1 and the others never yield
    k, stop = next((k, int(v)) for k, v in enumerate(solo[1]) if k >= 1 and v not in solo[0] and v not in solo[2]
                   and v not in solo[1][:k])
    got = np.stack(list(gen.generate(prompts, 64, stop=[stop], ignore_eos=True)), 1)
    np.testing.assert_array_equal(got[1, : k + 1], solo[1][: k + 1])
    assert (got[1, k + 1:] == -1).all()
    np.testing.assert_array_equal(got[0], solo[0])
    np.testing.assert_array_equal(got[2], solo[2])
    assert gen.stats["decode_tokens"] == 63 * 2 + k


def test_state_starts_small_and_grows_without_changing_results(tiny_artifact_default):
    """docs/capacity.md: a growable artifact's prefill allocates the state for `capacity` positions (default: the
    prompt rounded up to a power of two, >= 256) and the Generator doubles it when a step would not fit. Logits
    are bit-identical to a state allocated at max_seq_len (1024) for a 37-token prompt started at capacity 40 +
    240 steps (three growths, rows of the ratio-4 caches 10 -> 21 -> 43 -> 87); a program that does not feed
    `capacity` gets the full state (the input's default)."""
    from dsv4.export.artifact import load_manifest
    from dsv4.runtimes.ort import Generator as OrtGenerator

    man = load_manifest(tiny_artifact_default, verify=False)
    assert man["capacity"] == {"max_seq_len": 1024, "growable": True, "input": "capacity"}
    kv = next(e for e in man["state"] if e.get("ratio") == 4)
    assert kv["shape"][1] == "rows4" and man["graphs"]["prefill"]["inputs"][-1] == \
        {"name": "capacity", "dtype": "int64", "dims": []}
    full, grow = OrtGenerator(tiny_artifact_default, verify=False, capacity=1024), \
        OrtGenerator(tiny_artifact_default, verify=False)
    plain = full.sessions["prefill"].run(None, {"input_ids": np.zeros((1, 3), dtype=np.int64)})
    assert plain[[o.name for o in full.sessions["prefill"].get_outputs()].index(kv["present"])].shape[1] == 256
    ids = np.random.default_rng(3).integers(2, full.vocab_size, (1, 37))
    grow.prefill(ids)
    assert grow.state[kv["name"]].shape[1] == 64  # the default start: 256 positions
    a, b = full.prefill(ids), grow.prefill(ids, capacity=40)
    np.testing.assert_array_equal(a, b)
    rows = [grow.state[kv["name"]].shape[1]]
    for k in range(240):
        tok = a[:, -1].argmax(-1)
        a, b = full.step(tok), grow.step(tok)
        np.testing.assert_array_equal(a, b, err_msg=f"step {k}")
        rows += [grow.state[kv["name"]].shape[1]] if grow.state[kv["name"]].shape[1] != rows[-1] else []
    assert rows == [10, 21, 43, 87] and full.state[kv["name"]].shape[1] == 256
    with pytest.raises(ValueError, match="capacity: 2048 is not in"):
        OrtGenerator(tiny_artifact_default, verify=False, capacity=2048)


def test_generate_command_output(monkeypatch, capsys):
    """No tokenizer: one sequence's ids stream on one line, a batch prints a line per sequence (up to its stop);
    the rates go to stderr."""
    from dsv4.tools.cli import main

    class Fake(Counting):
        def __init__(self, art, providers=None):
            super().__init__()
            self.manifest, self.art = {"tokenizer": None}, art

    monkeypatch.setattr("dsv4.runtimes.ort.Generator", Fake)
    assert main(["generate", "ART", "--prompt-ids", "1,2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out == "4 7 1 6 \n" and "prefill: 2 tokens" in out.err and "decode: 3 tokens" in out.err
    assert main(["generate", "ART", "--prompt-ids", "1,2;3;4,5,6,7", "--max-new-tokens", "6", "--stop", "7"]) == 0
    assert capsys.readouterr().out.splitlines() == ["4 7", "4 6 9", "1 6 2 9"]


def test_generate_command_uses_the_artifact_generation_defaults(monkeypatch, capsys):
    """Sampling flags not given come from the manifest's ``generation`` section; given flags win."""
    from dsv4.tools.cli import main

    seen = []

    class Fake(Counting):
        def __init__(self, art, providers=None):
            super().__init__()
            self.manifest, self.art = {"tokenizer": None, "generation": {"temperature": 0.6, "top_p": 0.95}}, art

        def generate(self, prompts, n, temperature, top_p, top_k, *rest):
            seen.append((temperature, top_p, top_k))
            return super().generate(prompts, n, temperature, top_p, top_k, *rest)

    monkeypatch.setattr("dsv4.runtimes.ort.Generator", Fake)
    assert main(["generate", "ART", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--seed", "0"]) == 0
    assert main(["generate", "ART", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert seen == [(0.6, 0.95, 0), (0.0, 0.95, 0)]
