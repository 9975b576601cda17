"""dsv4/fmt.py: one byte formatter (decimal units as labelled); tables off a terminal are plain, unwrapped lines."""

from __future__ import annotations

import json
import shutil

import pytest
from rich.table import Table

from dsv4.fmt import nbytes, print_table, table_lines


@pytest.mark.parametrize("n,text", [(0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "1 kB"), (1536, "1.54 kB"),
                                    (1_234_567, "1.23 MB"), (2 * 10**9, "2 GB"), (148_650_000_000, "149 GB"),
                                    (805.32e9, "805 GB"), (1.6e12, "1.6 TB"), (2.5e15, "2,500 TB")])
def test_nbytes_is_decimal(n, text):
    assert nbytes(n) == text


def test_table_off_a_terminal_is_plain_lines(capsys):
    name = "layers.0.attn.compressor.indexer.wq_b.weight_scale_inv.with.a.long.suffix"
    t = Table(title="[bold]2 problem(s)[/]")
    for c in ("kind", "tensor", "detail"):
        t.add_column(c)
    t.add_row("missing", name, "not in the checkpoint " * 5)
    t.add_row("[red]dtype[/]", "embed.weight", "F32, expected BF16")
    assert table_lines(t) == ["# 2 problem(s)", "# kind\ttensor\tdetail",
                              f"missing\t{name}\t{'not in the checkpoint ' * 5}", "dtype\tembed.weight\tF32, expected BF16"]
    print_table(t)  # capsys: stdout is not a terminal
    assert capsys.readouterr().out.splitlines()[2].split("\t")[1] == name


def test_checkpoint_verify_to_a_file_names_the_full_tensor(tiny_checkpoint, tmp_path):
    """``dsv4 checkpoint verify`` piped to a file: each problem is one line holding the tensor's full name."""
    import subprocess
    import sys

    ck = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(cfg | {"n_routed_experts": cfg["n_routed_experts"] + 1}))
    with open(tmp_path / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "dsv4.tools.cli", "checkpoint", "verify", str(ck)], stdout=log,
                            timeout=300).returncode
    assert rc == 1
    rows = [line.split("\t") for line in (tmp_path / "log.txt").read_text().splitlines() if line[:1] != "#"]
    missing = {r[1] for r in rows if r[0] == "missing"}
    new = cfg["n_routed_experts"]
    assert {f"layers.{i}.ffn.experts.{new}.w{k}.weight" for i in range(cfg["num_hidden_layers"])
            for k in (1, 2, 3)} <= missing
    assert all(len(r) == 4 for r in rows if r[0] == "missing")
