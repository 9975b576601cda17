"""PNG plots (matplotlib, Agg backend: no display needed) of ``dsv4 bench`` results and ``dsv4 parity`` reports.

``bench_plots(result, dir)``: decode ms/token against context length and prefill tokens/s against prompt length,
one line per side (the JSON that ``dsv4 bench`` writes). ``parity_plot(report, path)``: the error of every
position (prefill, then each decode step) against the tolerance, and of every decoder layer.
"""

from __future__ import annotations

import re
from pathlib import Path

STYLE = {"eager": ("tab:blue", "o"), "ort": ("tab:orange", "s"), "tvm": ("tab:green", "^")}  # side -> colour, marker


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _log_if_wide(ax, values: list[float]) -> None:
    """Log scale on y when the lines span more than 20x (a slow side would flatten the others)."""
    v = [x for x in values if x and x > 0]
    if v and max(v) / min(v) > 20:
        ax.set_yscale("log")


def bench_plots(res: dict, out: str | Path) -> dict[str, Path]:
    """decode_latency.png and prefill_throughput.png of a ``dsv4 bench`` result under `out`: {kind: path}."""
    plt = _pyplot()
    out = Path(out)
    s = res["settings"]
    m = res["machine"]
    load = "/".join(f"{x:.1f}" for x in m.get("loadavg_1_5_15", []))
    foot = (f"{s['model']['name']}: {s['weights']} weights, quant_sim {'on' if s['quant_sim'] else 'off'}, "
            f"{s['dtype']}, batch 1, {s['threads']} thread(s) per side · {m['cores']} cores, load {load} · "
            f"{m['date'][:10]}")
    figs = {"decode": ("decode_latency.png", "contexts", "decode_ms", "context length (tokens)", "decode step (ms/token)",
                       f"Decode latency against context (median of {s['steps'] - 1} steps after a prefill)"),
            "prefill": ("prefill_throughput.png", "prefill_lengths", "prefill_tokens_per_s", "prompt length (tokens)",
                        "prefill throughput (tokens/s)", f"Prefill throughput (median of {s['repeat']})")}
    paths = {}
    for kind, (name, xs_key, ys_key, xlabel, ylabel, title) in figs.items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        xs, allv = s[xs_key], []
        for side, r in res["sides"].items():
            colour, marker = STYLE.get(side, (None, "o"))
            ax.plot(xs, r[ys_key], marker=marker, color=colour, label=r["label"])
            allv += r[ys_key]
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        _log_if_wide(ax, allv)
        if ax.get_yscale() == "linear":
            ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=9, framealpha=0.9)
        fig.text(0.01, 0.01, foot, fontsize=7, color="0.35")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        paths[kind] = out / name
        fig.savefig(paths[kind])
        plt.close(fig)
    return paths


# ---- parity ----------------------------------------------------------------------------------------------------
def parity_plot(report, path: str | Path) -> Path:
    """Error per position and per layer of a parity report (a ParityReport or its ``to_json()``) to `path` (a .png
    file, or a directory: parity.png in it); returns the file written."""
    rep = report.to_json() if hasattr(report, "to_json") else report
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path / "parity.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    _positions(left, rep)
    _layers(right, rep)
    verdict = "PASS" if rep["ok"] else "FAIL"
    fig.suptitle(f"parity {Path(rep['artifact']).name}: {verdict} · tolerance {tuple(rep['tolerance_key'])} · "
                 f"prompt {rep['prompt']['length']} tokens + {rep['prompt']['steps']} decode steps "
                 f"({rep['prompt']['backend']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _row(rep: dict, name: str) -> dict | None:
    return next((r for r in rep["rows"] if r["name"] == name), None)


def _floor(values: list[float]) -> list[float]:
    """Zeros drawn at the bottom of a log axis (an exact match has no logarithm)."""
    pos = [v for v in values if v > 0]
    lo = min(pos) / 10 if pos else 1e-12
    return [v if v > 0 else lo for v in values]


def _positions(ax, rep: dict) -> None:
    pos = rep.get("positions") or {}
    T = rep["prompt"]["length"]
    ax.set_title("max |artifact − eager| per position (prefill, then each decode step)", fontsize=9)
    if not pos:
        ax.text(0.5, 0.5, "no per-position errors in this report\n(a report from before `dsv4 parity --plot`)",
                ha="center", va="center", transform=ax.transAxes)
        return
    pre, dec = pos.get("prefill", []), pos.get("decode", [])
    xs_pre = list(range(T - len(pre), T))  # last-position artifacts return one prefill position
    xs_dec = list(range(T, T + len(dec)))
    for xs, key, what in ((xs_pre, "prefill", "prefill"), (xs_dec, "decode", "decode step (from the eager state)")):
        if pos.get(f"{key} noise"):
            ax.plot(xs, _floor(pos[f"{key} noise"]), color="0.65", lw=0.8,
                    label="noise twins (eager ±1 ulp)" if key == "decode" or not dec else None)
        vals = pos.get(key, [])
        if vals:
            style = {"marker": "o", "ms": 3} if len(vals) < 80 else {"lw": 0.9}
            ax.plot(xs, _floor(vals), color="tab:blue" if key == "prefill" else "tab:orange", label=what, **style)
        row = _row(rep, f"{key}.logits")
        if row and xs:
            ax.hlines(row["bound"], xs[0] - 0.5, xs[-1] + 0.5, colors="tab:red", linestyles="--",
                      label="tolerance bound" if key == "decode" or not dec else None)
    for key, vals in pos.items():  # with the layer taps: the last layer's streams at every prefill position
        if key.startswith("prefill layer") and vals:
            ax.plot(range(T - len(vals), T), _floor(vals), color="tab:cyan", lw=0.8,
                    label=f"prefill: {key.split()[1]} output streams")
    ax.axvline(T - 0.5, color="0.3", lw=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens)" + (" · prefill logits: last position only" if len(pre) == 1 < T else ""))
    ax.set_ylabel("max |Δ| (logits; streams)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)


def _layers(ax, rep: dict) -> None:
    """Hidden streams per decoder layer when the report has the per-layer taps, else its state tensors per layer."""
    tapped = [r for r in rep["rows"] if re.fullmatch(r"(prefill|decode)\.layer\d+", r["name"])]
    if tapped:
        rows, what = tapped, "output streams per decoder layer"
    else:
        rows = [r for r in rep["rows"] if re.fullmatch(r"(prefill|decode)\.\d+\..+", r["name"])]
        what = "state tensors per decoder layer\n(no per-layer taps in this report: dsv4 parity --per-layer)"
    ax.set_title(what, fontsize=9)
    per: dict[str, dict[int, float]] = {"prefill": {}, "decode": {}}
    for r in rows:
        phase, rest = r["name"].split(".", 1)
        i = int(re.match(r"(?:layer)?(\d+)", rest).group(1))
        per[phase][i] = max(per[phase].get(i, 0.0), r["max_abs"])
    n = max([i for d in per.values() for i in d], default=-1) + 1
    width = 0.4
    for k, (phase, colour) in enumerate((("prefill", "tab:blue"), ("decode", "tab:orange"))):
        xs = sorted(per[phase])
        if xs:
            ax.bar([x + (k - 0.5) * width for x in xs], _floor([per[phase][x] for x in xs]), width, color=colour,
                   label=f"{phase}: max |Δ|")
    bound = next((r["bound"] for r in rows if r["name"].startswith("decode.")), None)
    if bound:
        ax.axhline(bound, color="tab:red", ls="--", label="tolerance bound")
    ax.set_yscale("log")
    ax.set_xticks(range(n))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max |Δ| (streams / state)")
    ax.grid(True, alpha=0.3, axis="y", which="both")
    if n:
        ax.legend(fontsize=8)
