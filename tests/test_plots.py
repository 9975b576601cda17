"""tools/plots.py and ``dsv4 parity --plot``: a parity report drawn without running parity (a report built by hand,
as run_parity fills it), a .png path or a directory, and the --plot argument checked before the run."""

from __future__ import annotations

from dsv4.tools.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 10_000  # a drawn figure, not an empty canvas


def _report(per_layer: bool):
    """A calibrated report as run_parity builds it (rows, positions) without running parity: 8 prompt positions, 4
    decode steps, 2 layers."""
    from dataclasses import asdict

    from dsv4.runtimes.parity import TOLERANCES, Comparison, ParityReport

    rep = ParityReport("art/tiny", ["float32", True], asdict(TOLERANCES[("float32", True)]),
                       {"batch": 1, "length": 8, "seed": 0, "steps": 4, "optimization": "all", "backend": "ort"},
                       per_layer=per_layer)
    names = ["logits", "0.kv", "1.kv"] + (["layer0", "layer1"] if per_layer else [])
    rep.rows = [Comparison(f"{ph}.{n}", [1, 8], 3e-6 * (i + 1), 1e-6, 0.0, 1e-4, True) for ph in ("prefill", "decode")
                for i, n in enumerate(names)]
    rep.positions = {"prefill": [2e-6], "prefill noise": [1e-6], "decode": [1e-6, 0.0, 3e-6, 2e-6],
                     "decode noise": [1e-6, 1e-6, 2e-6, 1e-6]}
    if per_layer:
        rep.positions["prefill layer1"] = [0.0, 1e-7, 2e-7, 1e-6, 5e-7, 1e-6, 2e-6, 1e-6]
    return rep


def test_parity_plot_draws_a_report(tmp_path):
    """parity_plot takes a ParityReport (or its JSON) and a .png path or a directory; without the layer taps the
    per-layer panel shows the state tensors and its title says so."""
    from dsv4.tools.plots import _layers, _pyplot, parity_plot

    assert parity_plot(_report(per_layer=True), tmp_path / "p.png") == tmp_path / "p.png"
    assert is_png(tmp_path / "p.png")
    bare = _report(per_layer=False).to_json()
    assert parity_plot(bare, tmp_path / "d") == tmp_path / "d" / "parity.png"
    assert is_png(tmp_path / "d" / "parity.png")
    fig, ax = _pyplot().subplots()
    _layers(ax, bare)
    assert "no per-layer taps" in ax.get_title()


def test_parity_plot_argument_is_checked_before_the_run(tmp_path, capsys):
    assert main(["parity", str(tmp_path), "--plot", str(tmp_path / "x.txt")]) == 2
    assert "--plot" in capsys.readouterr().err
