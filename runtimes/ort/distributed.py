"""Expert-parallel ranks on ONNX Runtime, joined by torch.distributed (issue [11], docs/scale.md).

A ranks artifact (export/ranks.py) holds one artifact per rank; each rank's graphs all-reduce every MoE layer's
routed output with ``ai.onnx.contrib.Dsv4AllReduce``. Its kernel here is an onnxruntime-extensions PyOp (a Python
function registered as an ORT custom op) that calls ``torch.distributed.all_reduce`` (Gloo on CPU) on the
process's default group. Every rank runs the same graphs in the same order, so the collectives pair up.

* ``rank_artifact(ART)``: the directory this process runs: ART itself for an ordinary artifact; for a ranks
  artifact, ``ART/rank{r}`` after joining the group (env ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``, as torchrun or runtimes/ort/launch.py set them). ``Generator(ART)`` calls it: its API is
  unchanged on each rank.
* Failure: an exception inside an ORT kernel would abort the process (PyOp rethrows into C++), so the kernel
  records the first error, stops calling collectives and returns its input; the session wrapper (``RankSession``)
  then raises ``CollectiveError`` naming the rank and the cause. A dead peer closes its Gloo sockets (the others
  fail at once); a stuck one trips the group timeout (``DSV4_COLLECTIVE_TIMEOUT`` seconds, default 60).
* ``drive`` / ``follow``: rank 0 runs arbitrary code on its Generator (e.g. ``dsv4 parity``) while the other
  ranks replay each session run it broadcasts (the feed, state included) — used where only rank 0 knows the inputs.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np

TIMEOUT_ENV = "DSV4_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
RANKS_FORMAT = "dsv4-ranks"


class CollectiveError(RuntimeError):
    """An all-reduce of an expert-parallel run failed: a peer rank died, or did not answer within the timeout."""


class _Collective:
    """The process-wide state of the PyOp kernel (ORT calls it by op name, so it cannot carry an object)."""

    registered = False
    error: str | None = None
    calls = 0


def timeout_s() -> float:
    v = os.environ.get(TIMEOUT_ENV, "")
    try:
        t = float(v) if v else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}: expected seconds, got {v!r}") from None
    if t <= 0:
        raise ValueError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {v!r}")
    return t


def register_kernel() -> None:
    """Register the Dsv4AllReduce PyOp (once per process, before any session that uses it is created)."""
    if _Collective.registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(op_type="Dsv4AllReduce", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float])
    def _all_reduce(x):
        import torch
        import torch.distributed as dist

        if _Collective.error is not None:  # the group is broken: this run's outputs are discarded anyway
            return x
        try:
            t = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
            dist.all_reduce(t)
            _Collective.calls += 1
            return t.numpy()
        except Exception as e:  # noqa: BLE001 - raising here aborts the process (PyOp rethrows into C++)
            _Collective.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
            return x

    _Collective.registered = True


def ranks_manifest(art: str | Path) -> dict | None:
    """The ranks manifest of ART (export/ranks.py), or None for an ordinary artifact."""
    p = Path(art) / "manifest.json"
    try:
        man = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return man if isinstance(man, dict) and man.get("format") == RANKS_FORMAT else None


def join(ranks: int, where: str = "") -> int:
    """Join (or check) the default process group for a run of `ranks` ranks; returns this process's rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"{where}: an expert-parallel artifact of {ranks} ranks needs one process per rank "
                             f"(torchrun --nproc-per-node {ranks}, or dsv4 generate --ranks {ranks}); "
                             f"{', '.join(missing)} not set")
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timedelta(seconds=timeout_s()))
    if dist.get_world_size() != ranks:
        raise ValueError(f"{where}: the artifact has {ranks} ranks, the process group {dist.get_world_size()} "
                         f"(start {ranks} processes)")
    return dist.get_rank()


def rank_artifact(art: str | Path) -> Path:
    """The artifact directory this process runs (see the module docstring)."""
    man = ranks_manifest(art)
    if man is None:
        return Path(art)
    rank = join(int(man["ranks"]), str(art))
    register_kernel()
    return Path(art) / man["rank_dirs"][rank]["dir"]


class RankSession:
    """An InferenceSession of a rank artifact: run() raises CollectiveError when an all-reduce inside it failed
    (and refuses to run after a failure: the group is broken). Everything else is the session's."""

    def __init__(self, session, rank: int, ranks: int):
        self._s, self.rank, self.ranks = session, rank, ranks

    def __getattr__(self, name):
        return getattr(self._s, name)

    def _check(self) -> None:
        if _Collective.error is not None:
            raise CollectiveError(f"rank {self.rank} of {self.ranks}: an all-reduce failed ({_Collective.error}); a "
                                  f"peer rank exited or did not answer within {timeout_s():g} s ({TIMEOUT_ENV})")

    def run(self, output_names, feed, run_options=None):
        self._check()
        out = self._s.run(output_names, feed, run_options)
        self._check()
        return out


def wrap_sessions(manifest: dict, sessions: dict) -> dict:
    """load_sessions' hook: the sessions of a rank artifact wrapped in RankSession (others unchanged)."""
    info = manifest.get("rank")
    if not info:
        return sessions
    return {g: RankSession(s, int(info["rank"]), int(info["ranks"])) for g, s in sessions.items()}


def session_library(manifest: dict, so) -> None:
    """load_sessions' hook: a rank artifact's sessions get the extensions library holding the PyOp kernel."""
    if manifest.get("rank"):
        from onnxruntime_extensions import get_library_path

        register_kernel()
        so.register_custom_ops_library(get_library_path())


# ---- rank 0 drives, the others replay ----------------------------------------------------------------------------
class _Driving:
    def __init__(self, key: str, session):
        self.key, self._s = key, session

    def __getattr__(self, name):
        return getattr(self._s, name)

    def run(self, output_names, feed, run_options=None):
        import torch.distributed as dist

        dist.broadcast_object_list([(self.key, feed)], src=0)
        return self._s.run(output_names, feed, run_options)


def drive(gen) -> None:
    """On rank 0: every session run of `gen` is first broadcast to the followers (call ``release`` at the end)."""
    gen.sessions = {k: _Driving(k, s) for k, s in gen.sessions.items()}


def release() -> None:
    """On rank 0 after ``drive``: tell the followers to stop."""
    import torch.distributed as dist

    dist.broadcast_object_list([None], src=0)


def follow(gen) -> int:
    """On ranks > 0: replay rank 0's session runs until it releases; returns the number of runs."""
    import torch.distributed as dist

    n = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return n
        key, feed = box[0]
        gen.sessions[key].run(None, feed)
        n += 1
