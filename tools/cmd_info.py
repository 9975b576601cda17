"""``dsv4 info``: the config, parameter counts (total / active per token) and decode-state bytes per token."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from dsv4.fmt import nbytes, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="config, parameter counts and state bytes of a preset or checkpoint directory")
    p.add_argument("path", nargs="?", help="checkpoint directory (config.json) instead of --preset")
    p.add_argument("--preset", help="flash, pro, tiny or small")
    p.add_argument("--max-seq-len", type=int, default=None, help="state capacity used for the state sizes")
    p.set_defaults(func=run)


def load_args(path: str | None, preset_name: str | None, **overrides):
    from dsv4.models.config import ModelArgs, preset

    if (path is None) == (preset_name is None):
        raise ValueError("info: give either a checkpoint directory or --preset NAME")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return preset(preset_name, **overrides) if preset_name else ModelArgs.from_hf_config(path, **overrides)


def run(a: argparse.Namespace) -> int:
    import torch

    from dsv4.models.hf_config import official
    from dsv4.models.model import parameter_counts
    from dsv4.models.state import bytes_per_token, compact_bytes_per_token

    args = load_args(a.path, a.preset, max_seq_len=a.max_seq_len)
    con = Console()
    cfg = Table(title=f"DeepSeek V4 config ({a.preset or a.path})", show_header=False)
    for k, v in args.__dict__.items():
        key = official(k) if official(k) == k else f"{official(k)} ({k})"
        cfg.add_row(key, str(v) if not isinstance(v, tuple) or len(v) < 12 else f"{v[:6]} ... ({len(v)} entries)")
    print_table(cfg, con)
    n = parameter_counts(args)
    kinds = {r: sum(1 for i in range(args.n_layers) if args.ratio(i) == r) for r in (0, 4, 128)}
    t = Table(title="parameters (counted on the meta device)")
    t.add_column("what")
    t.add_column("count", justify="right")
    t.add_row("total (embed + head + blocks, no MTP)", f"{n['total'] / 1e9:.3f} B")
    t.add_row("active per token (excl. embedding)", f"{n['active'] / 1e9:.3f} B")
    t.add_row("MTP blocks", f"{n['mtp'] / 1e9:.3f} B")
    t.add_row("layers: window-only / CSA (4) / HCA (128)", f"{kinds[0]} / {kinds[4]} / {kinds[128]}")
    print_table(t, con)
    layout = "FP8 KV + MXFP4 index codes, rope dims BF16" if args.compact_kv or args.compact_index else "BF16"
    s = Table(title=f"decode state ({layout}, max_seq_len={args.max_seq_len}; docs/state_layout.md)")
    s.add_column("layer kind")
    s.add_column("bytes / token", justify="right")
    for k, v in bytes_per_token(args, torch.bfloat16).items():
        s.add_row(k, f"{v:,.1f}")
    s.add_row("paper's figure (scales padded to 8 B), total", f"{compact_bytes_per_token(args):,.1f}")
    print_table(s, con)
    from dsv4.models.checkpoint import checkpoint_totals, official_totals

    tot = checkpoint_totals(a.path) if a.path else official_totals(args)
    w = Table(title="stored tensors by dtype (" + ("this checkpoint's shard headers)" if a.path else "official format)"))
    for c in ("dtype", "tensors", "bytes"):
        w.add_column(c, justify="left" if c == "dtype" else "right")
    for d, v in [*tot.items(), ("all", {k: sum(x[k] for x in tot.values()) for k in ("tensors", "bytes")})]:
        w.add_row(d, f"{v['tensors']:,}", nbytes(v["bytes"]))
    print_table(w, con)
    return 0
