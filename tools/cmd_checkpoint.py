"""``dsv4 checkpoint``: write synthetic checkpoints in the official format, and verify checkpoint directories."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from dsv4.fmt import nbytes, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="official-format checkpoints: make a synthetic one, verify one")
    cs = p.add_subparsers(dest="checkpoint_command", required=True)
    m = cs.add_parser("make", help="write a synthetic checkpoint (random weights, official dtypes and layout)")
    m.add_argument("--preset", required=True, help="flash, pro, tiny or small")
    m.add_argument("--layers", type=int, default=None, help="keep only the first N layers (+ the MTP block)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shard-size", default="2GB", help="maximum shard size, e.g. 2GB, 500MB, 64MiB")
    m.add_argument("--expert-dtype", choices=("fp4", "fp8"), default=None,
                   help="routed expert format (default: the preset's, fp4 = MXFP4 as released)")
    m.add_argument("--sparse", action="store_true",
                   help="zero data stored as file holes (no disk blocks): real layout for memory/time measurements")
    m.add_argument("--out", required=True, help="checkpoint directory to create")
    m.add_argument("--force", action="store_true", help="replace an existing directory")
    m.add_argument("--no-space-check", action="store_true",
                   help="write even when --out's filesystem reports less free space than the shards need")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=run_make)
    v = cs.add_parser("verify", help="validate a checkpoint directory against its config.json (exit 1 on problems)")
    v.add_argument("path")
    v.add_argument("--check-values", action="store_true", help="also read the data and report NaN/Inf")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=run_verify)


def run_make(a: argparse.Namespace) -> int:
    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.config import preset

    over = {k: v for k, v in (("n_layers", a.layers), ("expert_dtype", a.expert_dtype)) if v is not None}
    args = preset(a.preset, **over)
    con = Console()
    t0 = time.perf_counter()
    out = write_synthetic(args, a.out, seed=a.seed, shard_size=a.shard_size, overwrite=a.force,
                          progress=False if a.no_progress else None, sparse=a.sparse,
                          space_check=not a.no_space_check)
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    con.print(f"wrote {out}: {len(files)} shard(s), {nbytes(size)}, preset {a.preset}, {args.n_layers} layer(s), "
              f"seed {a.seed}, in {time.perf_counter() - t0:.1f} s")
    return 0


def run_verify(a: argparse.Namespace) -> int:
    from dsv4.models.checkpoint import validate

    con = Console()
    t0 = time.perf_counter()
    rep = validate(a.path, check_values=a.check_values, progress=False if a.no_progress else None)
    tot = Table(title=f"{a.path}: stored tensors by dtype")
    tot.add_column("dtype")
    tot.add_column("tensors", justify="right")
    tot.add_column("bytes", justify="right")
    for d, v in rep.totals.items():
        tot.add_row(d, f"{v['tensors']:,}", nbytes(v["bytes"]))
    tot.add_row("all", f"{sum(v['tensors'] for v in rep.totals.values()):,}",
                nbytes(sum(v["bytes"] for v in rep.totals.values())))
    print_table(tot, con)
    if rep.ok:
        args = rep.args
        con.print(f"[bold green]OK[/]: matches config.json ({args.n_layers} layers, {args.n_routed_experts} experts "
                  f"as {args.expert_dtype}){', values finite' if a.check_values else ''} "
                  f"({time.perf_counter() - t0:.1f} s)")
        return 0
    t = Table(title=f"{len(rep.problems)} problem(s)")
    for c in ("kind", "tensor", "file", "detail"):
        t.add_column(c, overflow="fold")
    for p in rep.problems:
        t.add_row(p.kind, p.tensor, p.file, p.detail)
    print_table(t, con)
    return 1
