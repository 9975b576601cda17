"""The expert-parallel side of ``dsv4 export --ranks N``, ``dsv4 generate ART --ranks N`` and ``dsv4 parity ART``
(issue [11], docs/scale.md): the ranks are launched on this machine, one process each (runtimes/ort/launch.py)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import sys


def export(a: argparse.Namespace) -> int:
    """``dsv4 export ... --ranks N --out ART``: the rank template exported once, cut into N rank artifacts."""
    from dsv4.export.ranks import check_ranks, export_ranks
    from dsv4.export.static import parse_lengths
    from dsv4.fmt import print_table
    from dsv4.passes.shard_experts import rank_transform

    check_ranks(a.ranks)
    if a.no_passes:
        raise ValueError("--ranks: the rank graphs are made by the pass pipeline (shard_experts); drop --no-passes")
    if a.target != "ort-cpu":
        raise ValueError(f"--ranks: expert-parallel artifacts are implemented for --target ort-cpu, not {a.target}")
    rank_sum = getattr(a, "rank_sum", "ordered")
    man = export_ranks(a.out, a.ranks, transform=functools.partial(rank_transform, rank_sum=rank_sum),
                       overwrite=a.force, space_check=not getattr(a, "no_space_check", False),
                       progress=None if not a.no_progress else False,
                       checkpoint=a.checkpoint, preset=a.preset, seed=a.seed, target=a.target, weights=a.weights,
                       experts=a.experts, layers=a.layers, max_seq_len=a.max_seq_len,
                       quant_sim=False if a.no_quant_sim else None,
                       quant_sims={f"{p}_quant_sim": False for p in ("act", "kv", "index") if getattr(a, f"no_{p}_sim")},
                       batch=a.batch, prefill_lengths=parse_lengths(a.prefill_lengths))
    print_table(ranks_table(man, a.out))
    return 0


def ranks_table(man: dict, path) -> object:
    from rich.table import Table

    from dsv4.fmt import nbytes

    c = man["collective"]
    t = Table(title=f"{path}  ·  {man['ranks']} ranks  ·  experts {man['experts']['per_rank']}/rank of "
              f"{man['experts']['total']}  ·  {c['per_step']} all-reduces/step ({c['sum']} sum), "
              f"{nbytes(c['bytes_per_token'])}/token")
    for col in ("rank", "experts", "weights", "of which experts", "replicated"):
        t.add_column(col, justify="left" if col in ("rank", "experts") else "right")
    for r in man["rank_dirs"]:
        t.add_row(r["dir"], f"{r['experts'][0]}..{r['experts'][1] - 1}", nbytes(r["weights_bytes"]),
                  nbytes(r["expert_bytes"]), nbytes(r["replicated_bytes"]))
    return t


def ranks_of(art: str) -> int | None:
    from dsv4.runtimes.ort.distributed import ranks_manifest

    man = ranks_manifest(art)
    return None if man is None else int(man["ranks"])


def check_launch(art: str, ranks: int | None) -> int:
    have = ranks_of(art)
    if have is None:
        raise ValueError(f"--ranks: {art} is not an expert-parallel artifact (export it with --ranks N)")
    if ranks is not None and ranks != have:
        raise ValueError(f"--ranks: {art} holds {have} ranks, got --ranks {ranks}")
    return have


# ---- generate: every rank runs the command, rank 0 prints ---------------------------------------------------------
def _generate_rank(gen, rank: int, a: argparse.Namespace) -> int:
    from . import cmd_generate

    a.generator = gen
    if rank == 0:
        return cmd_generate.run(a)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cmd_generate.run(a)


def generate(a: argparse.Namespace) -> int:
    """``dsv4 generate ART --ranks N``: N processes, each the same generation (same seed: the same tokens, since
    every rank's logits are the all-reduced ones); rank 0's output is printed as it streams."""
    from dsv4.runtimes.ort.launch import launch

    if a.backend != "ort":
        raise ValueError("--ranks: expert-parallel artifacts run on the ort backend")
    n = check_launch(a.artifact, a.ranks)
    b = argparse.Namespace(**{k: v for k, v in vars(a).items() if k not in ("func", "ranks")})
    b.ranks = None
    sys.stdout.flush()
    return launch(a.artifact, n, _generate_rank, (b,), threads=a.threads,
                  gen_kwargs={"providers": a.providers.split(",") if a.providers else None})


# ---- parity: the eager reference here, rank 0 drives the artifact, the others replay --------------------------------
def _parity_rank(gen, rank: int, art: str, ref, kw: dict):
    from dsv4.runtimes.ort import distributed

    if rank != 0:
        distributed.follow(gen)
        return None
    from dsv4.runtimes.parity import run_parity

    distributed.drive(gen)
    try:
        return run_parity(art, generator=gen, reference=ref, **kw)
    finally:
        distributed.release()


def parity(a: argparse.Namespace, render) -> int:
    """``dsv4 parity ART`` on a ranks artifact: the eager reference computed in this process, then the ranks run
    the parity procedure (prefill, steps from the eager state, free running) with rank 0 driving."""
    import tempfile
    from pathlib import Path

    from dsv4.export.artifact import load_manifest, stage_printer
    from dsv4.runtimes.eager import eager_model, eager_reference
    from dsv4.runtimes.ort.launch import launch

    if a.backend != "ort" or a.per_layer:
        raise ValueError("parity: an expert-parallel artifact is checked with the ort backend, without --per-layer")
    n = check_launch(a.artifact, None)
    rank0 = str(Path(a.artifact) / "rank0")
    man = load_manifest(rank0, verify=True)
    with stage_printer(None) as stage:
        with tempfile.TemporaryDirectory(prefix="dsv4-parity-") as tmp, stage("load the eager model"):
            model = eager_model(man, a.checkpoint, Path(tmp), near=a.artifact)
        ref = eager_reference(model, man, steps=a.steps, prompt_len=a.prompt_len, batch=a.batch, seed=a.seed,
                              stage=stage)
    del model
    with stage_printer(None) as stage, stage(f"{n} ranks: artifact prefill + 2 x {a.steps} decode steps"):
        rep = launch(a.artifact, n, _parity_rank, (rank0, ref, {"optimization": a.optimization, "verify": False}),
                     threads=a.threads)
    rep.artifact = f"{a.artifact} ({n} ranks)"
    return render(rep)
