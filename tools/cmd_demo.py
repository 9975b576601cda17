"""``dsv4 demo``: the main job end to end on a built-in default, a tiny model from a fixed seed."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

PROMPT = (0, 17, 42, 7, 99, 3, 256, 128, 64, 5, 11, 300, 77, 1, 19, 23)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tiny synthetic model end to end (the README's first command)")
    p.add_argument("--out", default="out/demo", help="working directory for the demo's files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=16)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dsv4.models import DeepseekV4, preset
    from dsv4.models.checkpoint_write import write_synthetic
    from dsv4.models.model import parameter_counts

    con = Console()
    args = preset("tiny")
    t0 = time.perf_counter()
    # a tiny checkpoint in the official format (FP8 / MXFP4 / E8M0), read back through the real loader
    ckpt = write_synthetic(args, Path(a.out) / "checkpoint", seed=a.seed, overwrite=True, progress=False)
    model = DeepseekV4.from_pretrained(ckpt, keep_quantized=True, max_seq_len=args.max_seq_len, progress=False)
    con.print(f"checkpoint     : {ckpt} (official format, loaded with FP8/MXFP4 weights kept packed)")
    n = parameter_counts(args)
    con.print(f"[bold]tiny DeepSeek V4[/] (seed {a.seed}): {n['total']:,} parameters, {n['active']:,} active per token, "
              f"layers {args.compress_ratios[:args.n_layers]} (0 = window, 4 = CSA, 128 = HCA)")
    prompt = torch.tensor([PROMPT])
    toks, _ = model.greedy(prompt, a.new_tokens)
    con.print(f"prompt ids     : {list(PROMPT)}")
    con.print(f"greedy (eager) : {toks[0].tolist()}")
    # prefill of the whole sequence vs prefill of the prompt + one token at a time
    seq = torch.cat([prompt, toks[:, :-1]], 1)
    with torch.no_grad():
        full, _ = model(seq)
        logits, st = model(seq[:, :1])
        steps = [logits]
        for i in range(1, seq.shape[1]):
            logits, st = model(seq[:, i:i + 1], st)
            steps.append(logits)
    diff = (full - torch.cat(steps, 1)).abs().max().item()
    t = Table(title="prefill vs token-by-token decode (fp32, quantisation simulation on)")
    t.add_column("positions")
    t.add_column("max |Δlogits|", justify="right")
    t.add_column("same argmax", justify="right")
    same = (full.argmax(-1) == torch.cat(steps, 1).argmax(-1)).float().mean().item()
    t.add_row(str(seq.shape[1]), f"{diff:.2e}", f"{same:.0%}")
    con.print(t)
    con.print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
