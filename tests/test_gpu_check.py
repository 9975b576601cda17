"""tools/gpu_check.sh and benchmarks/gpu_check.py (issue [7]): the dry run (everything before the first GPU call)
and the roofline's active-bytes model."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    base = dict(prefill=[1024, 8192], decode_context=1024, parity_prompt=300, decode_steps=32, parity_steps=32,
                flash_layers=4, flash_experts=64, max_seq_len=None)
    return argparse.Namespace(**(base | kw))


def test_flash_slice_is_flash_shaped():
    """4 layers: window, window, CSA, HCA; hash routing in the first three; every per-token dimension of Flash."""
    from dsv4.models.config import preset

    s, full = gpu_check.model_args("flash4", _args()), preset("flash")
    assert tuple(s.compress_ratios) == (0, 0, 4, 128, 0) and s.n_hash_layers == 3
    for k in ("dim", "n_heads", "head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "moe_inter_dim", "vocab_size",
              "n_activated_experts", "index_topk", "window_size", "index_n_heads", "index_head_dim"):
        assert getattr(s, k) == getattr(full, k), k
    assert s.n_routed_experts == 64 and s.max_seq_len == 8192 + 128  # 8K prefill + 32 steps, rounded up to 128


def test_active_bytes():
    """Batch 1 reads exactly top-k experts per layer, so the expert count changes the bytes per step only by the
    router (64 vs 256 experts: the bf16 gate rows of 4 layers and the fp32 bias of the learned layer); a batch of 8
    reads the expected distinct experts; the state grows linearly with the context."""
    a64 = gpu_check.active_bytes(gpu_check.model_args("flash4", _args()), 1, 1024)
    a256 = gpu_check.active_bytes(gpu_check.model_args("flash4", _args(flash_experts=256)), 1, 1024)
    assert a64["experts per layer"] == a256["experts per layer"] == 6
    assert a256["weights"] - a64["weights"] == 4 * 192 * 4096 * 2 + 1 * 192 * 4
    assert 1.9e9 < a64["weights"] < 2.1e9  # the bf16 head (1.06 GB) + 4 layers of FP8 attention + 6 + 1 experts
    b8 = gpu_check.active_bytes(gpu_check.model_args("flash4", _args()), 8, 1024)
    assert b8["experts per layer"] == pytest.approx(64 * (1 - (1 - 6 / 64) ** 8))
    tiny = gpu_check.model_args("tiny", _args())
    s1, s2 = (gpu_check.active_bytes(tiny, 1, c)["state"] for c in (1024, 2048))
    s0 = gpu_check.active_bytes(tiny, 1, 0)["state"]
    assert s2 - s1 == pytest.approx(s1 - s0) and s1 > s0 > 0
    # --experts int8 (backend ort-cuda-int8): each touched expert's e2m1 bytes twice over, per block of its E8M0
    # scales an fp32 scale + a uint8 zero point
    args = gpu_check.model_args("flash4", _args())
    i8 = gpu_check.active_bytes(args, 1, 1024, "int8")
    expert = 3 * 2048 * 4096 // 2  # w1, w2, w3 of one Flash expert: e2m1, two per byte
    scales = expert * 2 // 32  # one E8M0 byte per 32 codes
    assert i8["weights"] - a64["weights"] == pytest.approx(4 * 6 * (expert + 4 * scales))  # 2x codes, 5x scales
    assert gpu_check.EXPORTS["ort-cuda-int8"] == ("ort-cuda", "int8") and "ort-cuda-int8" not in gpu_check.BACKENDS


def test_needs_a_gpu_without_dry_run(tmp_path):
    """Valid bash; on a machine without nvidia-smi the real run stops at once with exit code 2 and says why."""
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: run tools/gpu_check.sh itself")
    res = subprocess.run(["bash", str(SCRIPT)], env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no nvidia-smi" in res.stdout and "--dry-run" in res.stdout


def _dry_run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "out"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "OUT": str(out),
           "PY": sys.executable, "HOME": str(tmp_path)}
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--workdir", str(tmp_path / "work"), *extra], env=env,
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)
    md = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").is_file() else ""
    return res, md


@pytest.mark.slow  # 15 s of CPU (bash + four Python processes); the fast suite keeps bash -n and the refusal above
def test_dry_run_with_exported_artifacts(tiny_artifact_cuda, tmp_path):
    """The dry run over artifacts already in its workdir (the shared tiny ort-cuda artifact): it checks the
    environment, reuses the artifact (its configuration matches), lints it, stops before the first GPU call and
    renders the section without GPU numbers; exit 0."""
    from dsv4.export import artifact

    art = tmp_path / "work" / "tiny" / "ort-cuda"
    shutil.copytree(tiny_artifact_cuda, art)
    before = artifact.sha256(art / "manifest.json")
    res, md = _dry_run(tmp_path, "--models", "tiny", "--backends", "ort-cuda", "--max-seq-len", "1024",
                       "--prefill", "128", "512", "--decode-context", "256", "--parity-steps", "8")
    assert res.returncode == 0, res.stdout + res.stderr
    log = res.stdout
    assert "stopped before the first GPU call" in log and "tiny: export ort-cuda ready" in log
    assert artifact.sha256(art / "manifest.json") == before  # reused, not re-exported
    assert md.startswith(gpu_check.TITLE) and "Dry run: nothing ran on a GPU" in md
    assert "| tiny | 1 |" in md and "| tiny | 8 |" in md and "| measurement |" not in md
    raw = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert raw["results"] == {}

    # the same dry run over an artifact with a node the CUDA EP would hand to the CPU: it stops, naming the node
    from test_lint import _plant

    shutil.rmtree(art)
    _plant(tiny_artifact_cuda, art)
    res, _ = _dry_run(tmp_path, "--models", "tiny", "--backends", "ort-cuda", "--max-seq-len", "1024",
                      "--prefill", "128", "512", "--decode-context", "256", "--parity-steps", "8")
    assert res.returncode != 0 and "planted_hardmax" in res.stdout + res.stderr


@pytest.mark.slow  # two tiny exports and a tvm-cuda compile of both graphs: ~8 minutes of CPU on 2 cores
def test_dry_run_from_scratch(tmp_path):
    """`tools/gpu_check.sh --dry-run --models tiny`: checkpoint, ort-cuda and tvm-cuda exports, the tvm-cuda
    library with sm_90 PTX; everything the GPU run needs exists afterwards."""
    res, md = _dry_run(tmp_path, "--models", "tiny", "--jobs", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    work = tmp_path / "work" / "tiny"
    for b in ("ort-cuda", "tvm-cuda"):
        assert json.loads((work / b / "manifest.json").read_text())["target"] == b
    cm = json.loads((work / "tvm-cuda-lib" / "manifest.json").read_text())
    assert set(cm["graphs"]) == {"prefill", "decode"} and cm["arch"] == "sm_90"
    if shutil.which("nvcc"):
        assert all((work / "tvm-cuda-lib" / g["ptx"]).is_file() for g in cm["graphs"].values())
    assert "Dry run" in md
