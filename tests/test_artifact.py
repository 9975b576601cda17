"""export/artifact.py writing: stale temporaries of a killed writer are cleaned; progress; the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from dsv4.export.artifact import OWNER, clean_stale, stage_printer, writing


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_a_killed_writer_are_cleaned(tmp_path):
    host = socket.gethostname()
    stale, live, foreign = tmp_path / ".art.tmp-abc", tmp_path / ".art.tmp-def", tmp_path / ".other.tmp-x"
    for d, pid in ((stale, _dead_pid()), (live, os.getpid())):
        d.mkdir()
        (d / "weights.data").write_bytes(b"half")
        (d / OWNER).write_text(json.dumps({"pid": pid, "host": host}))
    foreign.mkdir()  # no owner file: not ours to remove
    with writing(tmp_path / "new") as tmp:
        (tmp / "f").write_text("x")
        assert (tmp / OWNER).is_file()
    assert not stale.exists() and live.exists() and foreign.exists()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["f"]  # the owner file does not ship
    assert clean_stale(tmp_path) == []


def test_a_killed_ranks_export_leaves_a_template_the_next_export_cleans(tmp_path, monkeypatch):
    """export --ranks writes its template in a sibling temporary; one left by a killed export (the process gone) is
    removed by the next export into the same parent, like artifact.writing's."""
    from dsv4.export import export as export_mod
    from dsv4.export.ranks import export_ranks

    seen = []

    def killed(path, **_):  # the template directory as the export sees it, then the process "dies"
        seen.append((path.parent, json.loads((path.parent / OWNER).read_text())))
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export_artifact", killed)
    with pytest.raises(KeyboardInterrupt):
        export_ranks(tmp_path / "art", 2, transform=None, preset="tiny")
    tpl, owner = seen[0]
    assert tpl.parent == tmp_path and tpl.name.startswith(".art.template.tmp-") and owner["pid"] == os.getpid()
    assert not tpl.exists()  # an exception (not a kill) removes it at once
    left = tmp_path / (tpl.name + "x")  # what a SIGKILL leaves: the same directory, its owner gone
    left.mkdir()
    (left / OWNER).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    assert clean_stale(tmp_path) == [left]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), writing(tmp_path / "a"):
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_stage_printer_reports_elapsed_time(capsys):
    with stage_printer(True) as stage, stage("trace [decode]") as st:
        st.update("step 3/64 [x]")  # brackets are text, not markup
    assert "✓ trace [decode] (" in capsys.readouterr().err


def test_stage_printer_off_a_terminal_writes_a_line_per_stage_start_and_end(capsys, monkeypatch):
    """A log (stderr not a terminal): the stage's name when it starts and its time when it ends, plain lines; the
    spinner's updates are dropped; DSV4_NO_PROGRESS silences it."""
    import re

    monkeypatch.delenv("DSV4_NO_PROGRESS", raising=False)
    with stage_printer(None) as stage, stage("weights layers.0.attn.wq_a.weight") as st:
        st.update("step 3/64")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].endswith("] weights layers.0.attn.wq_a.weight ...")
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] weights layers\.0\.attn\.wq_a\.weight: \d+\.\d s", lines[1])
    monkeypatch.setenv("DSV4_NO_PROGRESS", "1")
    with stage_printer(None) as stage, stage("x"):
        pass
    assert capsys.readouterr().err == ""


def test_version_and_one_line_errors(capsys):
    import dsv4
    from dsv4.tools.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"dsv4 {dsv4.__version__}"
    long = "x" * 300
    assert main(["inspect", f"/nonexistent/{long}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and long in err  # not wrapped at 80 columns
