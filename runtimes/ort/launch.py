"""Run the ranks of an expert-parallel artifact on this machine: one process per rank (torch.multiprocessing, spawn),
Gloo over 127.0.0.1, each process building ``Generator(ART)`` and calling ``fn(gen, rank, *args)``; rank 0's return
value comes back. What ``dsv4 generate ART --ranks N`` and ``dsv4 parity ART`` use (torchrun does the same job
for a user's own script).

Nothing hangs: a rank that raises reports its error and exits 1; a rank that dies (a signal) is seen by the parent
at once; the others then fail their next all-reduce (CollectiveError: a dead peer's sockets close, a stuck one trips
the Gloo timeout) and are given ``grace`` seconds to exit on their own before they are terminated. The parent
raises ``RanksFailed`` naming every rank's fate. ``deadline``: an overall limit in seconds (None: none).
"""

from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

from .distributed import TIMEOUT_ENV, ranks_manifest, timeout_s


class RanksFailed(RuntimeError):
    """One or more ranks of a launched run failed; the message has one line per rank that did not finish."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, ranks: int, port: int, art: str, gen_kwargs: dict, fn, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        import torch.distributed as dist

        from .generator import Generator

        gen = Generator(art, **gen_kwargs)
        out = fn(gen, rank, *args)
        queue.put(("ok", rank, out if rank == 0 else None))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then a non-zero exit
        queue.put(("error", rank, f"{type(e).__name__}: {e}", traceback.format_exc()))
        os._exit(1)  # skip atexit / group teardown: a broken group can block in its destructor


def launch(art: str | Path, ranks: int, fn, args: tuple = (), *, threads: int | None = None,
           gen_kwargs: dict | None = None, grace: float | None = None, deadline: float | None = None):
    """Run `fn(Generator(art), rank, *args)` on `ranks` processes; returns rank 0's result or raises RanksFailed.
    threads: ORT intra-op threads per rank (default: this machine's cores / ranks, at least 1)."""
    import torch.multiprocessing as mp

    man = ranks_manifest(art)
    if man is None:
        raise ValueError(f"--ranks: {art} is not an expert-parallel artifact (export it with --ranks N)")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks != int(man["ranks"]):
        raise ValueError(f"--ranks: {art} was exported for {man['ranks']} ranks, got {ranks!r}")
    kwargs = dict(gen_kwargs or {})
    kwargs.setdefault("threads", threads or max(1, (os.cpu_count() or 1) // ranks))
    grace = timeout_s() + 10 if grace is None else grace
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, ranks, port, str(art), kwargs, fn, tuple(args), queue),
                         name=f"dsv4-rank{r}", daemon=True) for r in range(ranks)]
    for p in procs:
        p.start()
    reports: dict[int, tuple] = {}
    t0, failed_at = time.monotonic(), None
    try:
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if deadline is not None and now - t0 > deadline:
                failed_at = failed_at or now
                reports.setdefault(-1, ("error", -1, f"deadline of {deadline:g} s passed", ""))
                break
            if failed_at is not None and now - failed_at > grace:
                break
            wait([p.sentinel for p in procs if p.is_alive()] + [queue._reader], timeout=0.5)
            while not queue.empty():
                msg = queue.get()
                reports[msg[1]] = msg
            if failed_at is None and (any(p.exitcode not in (None, 0) for p in procs)
                                      or any(m[0] == "error" for m in reports.values())):
                failed_at = time.monotonic()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    while not queue.empty():
        msg = queue.get()
        reports[msg[1]] = msg
    lines = []
    for r, p in enumerate(procs):
        rep = reports.get(r)
        if rep and rep[0] == "ok" and p.exitcode == 0:
            continue
        if rep and rep[0] == "error":
            lines.append(f"rank {r}: {rep[2]}")
        elif p.exitcode is not None and p.exitcode < 0:
            lines.append(f"rank {r}: killed by {signal.Signals(-p.exitcode).name}")
        else:
            lines.append(f"rank {r}: exit code {p.exitcode} before it could report (e.g. its function or arguments "
                         "could not be unpickled in the child: its traceback is on stderr)")
    if -1 in reports:
        lines.insert(0, reports[-1][2])
    if lines:
        raise RanksFailed(f"{art}: {len(lines)} of {ranks} ranks failed ({TIMEOUT_ENV}={timeout_s():g} s):\n  "
                          + "\n  ".join(lines))
    return reports[0][2]


def greedy(gen, rank: int, ids, steps: int):
    """A launch() function: prefill `ids`, then `steps` greedy decode steps. Returns (logits [B, T + steps, V] of
    every position, the greedy tokens [B, steps], decode seconds per step); the same on every rank."""
    import numpy as np

    first = gen.prefill(np.asarray(ids, dtype=np.int64))
    logits, tokens = [first], []
    tok = first[:, -1].argmax(-1)[:, None]
    t = time.perf_counter()
    for _ in range(steps):
        out = gen.step(tok)
        logits.append(out)
        tok = out[:, -1].argmax(-1)[:, None]
        tokens.append(tok)
    per_step = (time.perf_counter() - t) / max(steps, 1)
    return np.concatenate(logits, 1), np.concatenate(tokens, 1) if tokens else np.zeros((len(ids), 0), np.int64), per_step
