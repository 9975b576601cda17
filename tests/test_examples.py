"""examples/plain_ort.py: an artifact generates with onnxruntime + numpy alone, the same tokens as dsv4 generate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_ort.py"


def _without_dsv4(tmp_path) -> dict:
    """An environment whose Python path has the installed packages but not dsv4 (run with -S: the editable install's
    .pth is not processed; the working directory is not the repository)."""
    site = str(Path(onnxruntime.__file__).resolve().parents[1])
    return {"PYTHONPATH": site, "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}


def test_plain_ort_example_equals_dsv4_generate(tiny_artifact, tmp_path, capsys):
    from dsv4.tools.cli import main

    env = _without_dsv4(tmp_path)
    probe = subprocess.run([sys.executable, "-S", "-c", "import dsv4"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert probe.returncode != 0 and "No module named 'dsv4'" in probe.stderr
    args = ["--prompt-ids", "5,17,300,2", "--max-new-tokens", "12"]
    run = subprocess.run([sys.executable, "-S", str(EXAMPLE), str(tiny_artifact), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = run.stdout.split()
    assert main(["generate", str(tiny_artifact), *args, "--ids"]) == 0
    want = capsys.readouterr().out.split()
    assert got == want and 1 <= len(got) <= 12


@pytest.mark.slow
def test_plain_ort_example_text(tiny_artifact, tmp_path):
    """``--prompt TEXT`` through the artifact's tokenizer.json: the words of the ids dsv4 generate prints."""
    from dsv4.runtimes.ort import Generator

    want = [int(t[0]) for t in Generator(tiny_artifact, verify=False).generate([[5, 17, 300, 2]], 12)]
    env = _without_dsv4(tmp_path)
    text = subprocess.run([sys.executable, "-S", str(EXAMPLE), str(tiny_artifact), "--prompt", "w5 w17 w300 w2",
                           "--max-new-tokens", "12"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert text.returncode == 0, text.stderr
    assert text.stdout.split() == [f"w{t}" for t in want]
