"""``dsv4 lint ART [--target T]``: would the target's runtime run every node of the artifact on the kernels it
promises (ort-cpu, ort-cuda), or accept the graph at all (ascend: CANN's ONNX parser and the CANN EP's graph mode)?
Any profile runs on any artifact; every graph the manifest lists is checked. One line per violation (graph, node or
``(model)``/``(input x)``/..., op, rule, the rule's source), notes, a summary; exit 1 when any."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from dsv4.passes.lint import PROFILES

    p = sub.add_parser("lint", help="check every graph of an artifact against a target's rules (kernel tables, ascend)")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--target", choices=sorted(PROFILES), help="profile to check against (default: the manifest's)")
    p.add_argument("--no-verify", action="store_true", help="skip the manifest's hash check")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from dsv4.passes.lint import lint_artifact

    rep = lint_artifact(a.artifact, a.target, verify=not a.no_verify)
    checked = ", ".join(f"{g} {n}" for g, n in rep.nodes.items())
    excused = sum(rep.excepted.values())
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        con = Console()
        if rep.violations:
            t = Table(title=f"{len(rep.violations)} violation(s) of the {rep.target} rules")
            for col in ("graph", "node", "op", "rule", "source"):
                t.add_column(col, overflow="fold")
            for v in rep.violations:
                t.add_row(v.graph, v.node, v.op, v.rule, v.source)
            con.print(t)
        for key, n in rep.excepted.items():
            con.print(f"excepted: {n} node(s) by {key}")
        for note in rep.info:
            con.print(f"note: {note}")
        con.print(f"lint {rep.target}: {len(rep.violations)} violation(s), {excused} excepted; nodes checked: {checked}")
    else:  # plain lines, never wrapped: one violation per line, tab separated
        for v in rep.violations:
            print(v.line())
        for key, n in rep.excepted.items():
            print(f"# excepted: {n} node(s) by {key}")
        for note in rep.info:
            print(f"# note: {note}")
        print(f"# lint {rep.target}: {len(rep.violations)} violation(s), {excused} excepted; nodes checked: {checked}")
    return 1 if rep.violations else 0
