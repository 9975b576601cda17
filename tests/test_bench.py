"""``dsv4 bench`` (tools/cmd_bench.py, runtimes/bench.py): arguments checked before any work (one line naming the
argument, exit 2), and the JSON and both PNGs of the smallest run on the shared tiny artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_plots import is_png

from dsv4.tools.cli import main


@pytest.mark.parametrize("argv, says", [
    (["--sides", "eager,gpu"], "--sides: 'gpu' is not one of eager, ort, tvm"),
    (["--contexts", "128,-5"], "--contexts: lengths must be positive integers"),
    (["--prefill-lengths", "12x"], "--prefill-lengths: expected comma-separated positive integers"),
    (["--steps", "1"], "--steps: must be at least 2"),
    (["--contexts", "1020"], "--contexts: 1020 + 16 steps exceed max_seq_len 1024"),
    (["--artifact", "."], "--artifact: . is not an artifact directory"),
    (["--sides", "eager", "--artifact", "."], "--artifact is measured on the ort side"),
])
def test_bad_arguments_give_one_line_before_any_work(argv, says, tmp_path, capsys):
    """exit 2, one stderr line naming the argument, and nothing made in --out."""
    out = tmp_path / "bench"
    assert main(["bench", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_bench_eager_and_ort_on_the_shared_artifact(tiny_checkpoint, tiny_artifact_default, tmp_path, capsys):
    """The smallest run, eager + ORT on the session's default artifact: bench.json holds every number with its
    settings and machine, both plots are PNGs, and the table (plain lines off a terminal) has ORT against eager."""
    out = tmp_path / "bench"
    assert main(["bench", str(tiny_checkpoint), "--artifact", str(tiny_artifact_default), "--sides", "eager,ort",
                 "--prefill-lengths", "16,32", "--contexts", "16", "--steps", "2", "--repeat", "1",
                 "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    s = res["settings"]
    assert s["sides"] == ["eager", "ort"] and s["prefill_lengths"] == [16, 32] and s["contexts"] == [16]
    assert s["weights"] == "packed" and s["quant_sim"] is True and s["artifacts"]["ort"] == str(tiny_artifact_default)
    for side in ("eager", "ort"):
        r = res["sides"][side]
        assert len(r["prefill_tokens_per_s"]) == 2 and len(r["decode_ms"]) == 1
        assert all(np.isfinite(v) and v > 0 for v in r["prefill_tokens_per_s"] + r["decode_ms"])
    assert set(res["speedup_vs_eager"]) == {"ort"}
    m = res["machine"]
    assert m["cores"] and len(m["loadavg_1_5_15"]) == 3 and m["versions"]["onnxruntime"]
    assert not list(out.glob("art-*"))  # the given artifact was measured, nothing exported
    for name in ("decode_latency.png", "prefill_throughput.png"):
        assert is_png(out / name), name
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("decode at 16 of context (ms/token)\t") and ln.endswith(("faster", "slower"))
               for ln in lines), lines
    assert lines[-1].startswith("wrote ") and lines[-1].endswith("prefill_throughput.png")


def test_an_artifact_of_another_checkpoint_is_refused_before_any_work(tiny_checkpoint, tiny_artifact, tmp_path,
                                                                       capsys):
    """--artifact must come from CHECKPOINT (the eager side is that model): its manifest's identity is checked first."""
    import shutil

    fake = tmp_path / "art"
    fake.mkdir()
    man = json.loads((tiny_artifact / "manifest.json").read_text())
    man["source"]["identity"]["sha256"] = "0" * 64
    (fake / "manifest.json").write_text(json.dumps(man))
    out = tmp_path / "bench"
    assert main(["bench", str(tiny_checkpoint), "--artifact", str(fake), "--sides", "eager,ort", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bench: --artifact: ") and "not the checkpoint" in err and not out.exists()
    shutil.rmtree(fake)
