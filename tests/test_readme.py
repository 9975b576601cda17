"""The README's walk-through runs top to bottom as written (issue [7]): every line of the first ``sh`` block under
"## Commands", in a scratch directory, each one exiting 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Commands", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    lines = []
    for raw in block.splitlines():
        cmd = raw.split("  #", 1)[0].strip()  # a comment starts after two spaces
        if cmd and not cmd.startswith("#"):
            lines.append(cmd)
    return lines


def test_walkthrough_is_a_sequence():
    """Each artifact or directory a command reads was written by an earlier line (so the block can run as is)."""
    cmds = readme_commands()
    written: set[str] = set()
    for c in cmds:
        words = c.split()
        reads = [w for w in words[2:3] if not w.startswith("-")] if words[0] == "dsv4" and words[1] != "info" else []
        if words[:2] == ["dsv4", "checkpoint"]:
            reads = [words[3]] if words[2] == "verify" else []
        for r in reads:
            assert r in written, f"README: {c!r} reads {r!r} before any line writes it"
        written |= {words[i + 1] for i, w in enumerate(words[:-1]) if w == "--out"}
    assert any(c.startswith("dsv4 compile") for c in cmds) and any(c.startswith("tools/gpu_check.sh") for c in cmds)


@pytest.mark.slow  # four tiny exports, two TVM builds, two parity runs, the GPU check's dry run: ~30 min of CPU
def test_walkthrough_runs(tmp_path):
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OUT=str(tmp_path / "gc"))
    for cmd in readme_commands():
        res = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, f"README line failed: {cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
