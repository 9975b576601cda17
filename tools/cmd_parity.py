"""``dsv4 parity ART``: the artifact against the eager model; exit 1 when anything is out of tolerance."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="compare an artifact with the eager model (tolerances: runtimes/parity.py)")
    p.add_argument("artifact")
    p.add_argument("--checkpoint", help="checkpoint directory of the eager model (default: the manifest's source)")
    p.add_argument("--any-checkpoint", action="store_true",
                   help="accept a --checkpoint that is not the one the artifact was exported from (its identity, "
                        "sha256 of index + config, differs): e.g. a converted copy")
    p.add_argument("--steps", type=int, default=64, help="greedy decode steps after the prefill")
    p.add_argument("--prompt-len", type=int, default=300)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--optimization", default="all", choices=("all", "extended", "basic", "disable"),
                   help="ONNX Runtime graph optimization level")
    p.add_argument("--backend", default="ort", choices=("ort", "tvm"), help="runtime that runs the artifact")
    p.add_argument("--tvm-target", default="tvm-llvm", choices=("tvm-llvm", "tvm-cuda"), help="with --backend tvm")
    p.add_argument("--compiled", help="with --backend tvm: a `dsv4 compile` directory (default: compile now)")
    p.add_argument("--per-layer", action="store_true",
                   help="also compare every decoder layer's output streams (names the first divergent layer; ort)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: one per core)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="FILE.png|DIR", help="also draw the error per position and per layer to this PNG "
                   "(a directory: parity.png in it; tools/plots.py)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from dsv4.runtimes.parity import run_parity

    from .cmd_ranks import parity as parity_ranks
    from .cmd_ranks import ranks_of

    _check_plot(a)
    if ranks_of(a.artifact) is not None:  # expert-parallel: the ranks launched here (tools/cmd_ranks.py)
        return parity_ranks(a, lambda rep: _show(a, rep))
    rep = run_parity(a.artifact, checkpoint=a.checkpoint, steps=a.steps, prompt_len=a.prompt_len, batch=a.batch,
                     seed=a.seed, optimization=a.optimization, backend=a.backend, threads=a.threads,
                     tvm_options={"target": a.tvm_target, "compiled": a.compiled}, per_layer=a.per_layer,
                     progress=None, identity=not a.any_checkpoint)
    return _show(a, rep)


def _check_plot(a: argparse.Namespace) -> None:
    from pathlib import Path

    if a.plot and Path(a.plot).suffix.lower() not in (".png", "") and not Path(a.plot).is_dir():
        raise ValueError(f"parity: --plot: {a.plot} is neither a .png file nor a directory")


def _plot(a: argparse.Namespace, rep) -> None:
    """The plot of the report (tools/plots.py), named on the last line (stderr under --json, whose stdout is JSON)."""
    import sys

    from .plots import parity_plot

    print(f"plot: {parity_plot(rep, a.plot)}", file=sys.stderr if a.json else sys.stdout)


def _show(a: argparse.Namespace, rep) -> int:
    import sys

    from rich.console import Console

    from dsv4.runtimes.parity import plain_lines, render

    if a.json:
        print(json.dumps(rep.to_json(), indent=2, default=float))
    elif sys.stdout.isatty():
        Console().print(render(rep))
    else:  # logs: one row per line, names never wrapped, then one line per problem
        print("\n".join(plain_lines(rep)))
    if getattr(a, "plot", None):
        _plot(a, rep)
    return 0 if rep.ok else 1
