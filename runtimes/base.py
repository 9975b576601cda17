"""What every runtime provides, and the generation loop they share.

A runtime implements two calls on numpy arrays, ``_run_prefill(ids) -> (logits, state)`` and
``_run_decode(ids, state) -> (logits, state)``, where state is the flat dict of models/state.py (keyed by
state entry name). ``Generator`` adds the checks (vocabulary, batch, capacity), the state threading, and
sampling, so the ORT and TVM generators behave identically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np


class CapacityError(ValueError):
    """A sequence would run past the artifact's max_seq_len (the decode state's fixed capacity)."""


MIN_CAPACITY = 256  # a growable state starts at the prompt's length rounded up to a power of two, at least this


class StateCapacity:
    """The capacity of a growable artifact's state (manifest ``capacity.growable``, docs/capacity.md): its per-token
    caches (state entries with a ``ratio``) hold capacity // ratio rows, grown by doubling with their fill when a
    step would not fit. Results do not change (models/state.py ``resize``): a row is read only once its block is
    complete and written only at its own slot."""

    def __init__(self, manifest: dict, max_seq_len: int):
        self.max_seq_len = max_seq_len
        self.growable = bool((manifest.get("capacity") or {}).get("growable"))
        self.caches = {e["name"]: (int(e["ratio"]), float(e["fill"])) for e in manifest["state"]
                       if e.get("per_token") and "ratio" in e} if self.growable else {}

    def start(self, length: int, asked: int | None) -> int:
        """The capacity a prefill of `length` tokens allocates: `asked`, else the next power of two >= length
        (at least MIN_CAPACITY), never past max_seq_len."""
        if asked is not None:
            return min(max(int(asked), length), self.max_seq_len)
        return min(max(MIN_CAPACITY, 1 << max(length - 1, 0).bit_length()), self.max_seq_len)

    def of(self, state: dict) -> int:
        """Positions `state` holds room for ((rows + 1) * ratio - 1 per cache, models/state.py ``capacity``)."""
        caps = [(np.asarray(state[n]).shape[1] + 1) * m - 1 for n, (m, _) in self.caches.items()]
        return min([self.max_seq_len, *caps])

    def fit(self, state: dict, positions: int) -> dict:
        """`state`, grown (doubling) if it cannot hold `positions` positions; the same dict if it can."""
        cap = self.of(state)
        if positions <= cap or not self.caches:
            return state
        new = min(self.max_seq_len, max(positions, 2 * cap))
        out = dict(state)
        for n, (m, fill) in self.caches.items():
            v = np.asarray(state[n])
            rows = new // m
            if rows > v.shape[1]:
                pad = np.full((v.shape[0], rows - v.shape[1], *v.shape[2:]), fill, dtype=v.dtype)
                out[n] = np.concatenate([v, pad], axis=1)
        return out


class Generator:
    """``prefill(ids)``, ``step(ids)``, ``generate(prompts, max_new_tokens, temperature=0, top_p=1, top_k=0, seed=None,
    stop=None)``.

    Subclasses set ``vocab_size`` and ``max_seq_len`` and implement ``_run_prefill`` / ``_run_decode``.
    """

    vocab_size: int
    max_seq_len: int
    eos_token_id: int | None = None  # generate stops a sequence here (the artifact's generation defaults)
    fixed_batch: int | None = None  # a static-shape artifact's batch: no ragged prompts, finished rows stay

    def __init__(self) -> None:
        self.state: dict[str, np.ndarray] | None = None
        self.stats: dict[str, float] = {}
        self.capacity: StateCapacity | None = None  # growable artifacts (set by the runtime)
        self.start_capacity: int | None = None  # a growable state's first allocation (None: from the prompt)

    # ---- the runtime's part ---------------------------------------------------------------------------------
    def _run_prefill(self, ids: np.ndarray, capacity: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """capacity: positions the fresh state holds (growable artifacts; others allocate max_seq_len)."""
        raise NotImplementedError

    def _run_decode(self, ids: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError

    # ---- checks ---------------------------------------------------------------------------------------------
    def _ids(self, ids, what: str) -> np.ndarray:
        a = np.asarray(ids)
        if a.dtype.kind not in "iu":
            raise ValueError(f"{what}: token ids must be integers, got {a.dtype}")
        a = a.astype(np.int64)
        if a.ndim == 1:
            a = a[None] if what == "prefill" else a[:, None]
        if a.ndim != 2 or a.shape[1] == 0 or a.shape[0] == 0:
            raise ValueError(f"{what}: expected ids [batch, length] with length >= 1, got shape {list(a.shape)}")
        bad = (a < 0) | (a >= self.vocab_size)
        if bad.any():
            b, t = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{what}: token id {int(a[b, t])} at [{b}, {t}] is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        return a

    @property
    def batch(self) -> int | None:
        return None if self.state is None else int(self.state["pos"].shape[0])

    @property
    def position(self) -> np.ndarray | None:
        """Tokens held per sequence (the next position), or None before prefill."""
        return None if self.state is None else self.state["pos"].copy()

    # ---- API --------------------------------------------------------------------------------------------------
    def prefill(self, ids, capacity: int | None = None) -> np.ndarray:
        """Start fresh sequences from position 0 with `ids` [batch, length]; returns logits [batch, 1, vocab] (the
        last position; [batch, length, vocab] from an artifact exported with --all-logits). capacity: positions
        the new state is allocated for (growable artifacts; default ``start_capacity``, else the prompt's length
        rounded up to a power of two); it grows as the sequences do, up to max_seq_len."""
        a = self._ids(ids, "prefill")
        if a.shape[1] > self.max_seq_len:
            raise CapacityError(f"prefill: {a.shape[1]} tokens exceed max_seq_len={self.max_seq_len}")
        cap = None
        if self.capacity is not None and self.capacity.growable:
            cap = self.capacity.start(a.shape[1], capacity if capacity is not None else self.start_capacity)
        logits, self.state = self._run_prefill(a, cap)
        return logits

    def _fit(self, state: dict, positions: int) -> dict:
        """`state` with room for `positions` positions (grown where the artifact's state is growable)."""
        return state if self.capacity is None else self.capacity.fit(state, positions)

    def step(self, ids) -> np.ndarray:
        """Append one token per sequence (`ids` [batch] or [batch, 1]); returns logits [batch, 1, vocab]."""
        if self.state is None:
            raise ValueError("step: no sequences yet; call prefill first")
        a = self._ids(ids, "step")
        if a.shape[1] != 1:
            raise ValueError(f"step: one token per sequence, got {a.shape[1]}")
        if a.shape[0] != self.batch:
            raise ValueError(f"step: batch {a.shape[0]} does not match the sequences' batch {self.batch}")
        held = int(self.state["pos"].max())
        if held + 1 > self.max_seq_len:
            raise CapacityError(f"step: max_seq_len={self.max_seq_len} reached: the sequences hold {held} "
                                "positions, the decode state has no room for another token")
        logits, self.state = self._run_decode(a, self._fit(self.state, held + 1))
        return logits

    def run_step(self, ids, state) -> tuple[np.ndarray, dict]:
        """One decode step from an explicit `state` (a dict of arrays in the manifest's state layout), not the held
        one: returns (logits [batch, 1, vocab], the new state); the held sequences are not touched."""
        a = self._ids(ids, "step")
        if a.shape[1] != 1:
            raise ValueError(f"step: one token per sequence, got {a.shape[1]}")
        pos = np.asarray(state["pos"])
        if pos.shape != (a.shape[0],):
            raise ValueError(f"step: state batch {list(pos.shape)} does not match the ids' batch {a.shape[0]}")
        if int(pos.max()) + 1 > self.max_seq_len:
            raise CapacityError(f"step: max_seq_len={self.max_seq_len} reached: the state holds {int(pos.max())} "
                                "positions")
        return self._run_decode(a, self._fit(state, int(pos.max()) + 1))

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop=None, ignore_eos: bool = False) -> Iterator[np.ndarray]:
        """Prefill `prompts`, then yield the next token of every sequence ([batch] int64), up to `max_new_tokens` times.

        prompts: ids [batch, length], one list of ids, or a list of id lists of different lengths (each sequence
        then gets exactly the tokens of its solo run: the prompts of one length are prefilled together and the
        per-row states stacked; decode runs the batch with a position per sequence). A sequence stops after it
        yields ``eos_token_id`` (unless `ignore_eos`) or any id in `stop`; from then on its entry is -1, and the
        loop ends when every sequence has stopped. Finished rows leave the batch: afterwards ``state`` holds the
        sequences still running. ``stats`` holds the prefill and decode token counts and seconds.

        temperature 0 is greedy (argmax, lowest id on ties); otherwise sampling from softmax(logits / T) restricted
        to the `top_k` most likely tokens (0: all) and then to the smallest set whose probability reaches `top_p`,
        seeded by `seed`. Raises CapacityError, after yielding what fit, when max_seq_len is reached.
        """
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
        rows = self._prompts(prompts)
        stops = {int(s) for s in (stop or ())} | (set() if ignore_eos or self.eos_token_id is None
                                                   else {int(self.eos_token_id)})
        return self._generate(rows, max_new_tokens, temperature, top_p, top_k, seed, stops)

    def _prompts(self, prompts) -> list[np.ndarray]:
        if not isinstance(prompts, (list, tuple)) or (prompts and all(np.isscalar(t) for t in prompts)):
            return list(self._ids(prompts, "prefill"))  # an array [batch, length] (or [length]), or one id list
        if not prompts:
            raise ValueError("prompts: expected ids [batch, length] or a non-empty list of id lists, got []")
        rows = []
        for i, p in enumerate(prompts):
            if np.ndim(p) != 1 or len(p) == 0:
                raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got shape {list(np.shape(p))}")
            rows.append(self._ids(np.asarray(p)[None], f"prompts[{i}]")[0])
        if len({len(r) for r in rows}) > 1 and self.fixed_batch:
            raise ValueError(f"prompts: this artifact has a static batch of {self.fixed_batch}; prompts of different "
                             f"lengths ({sorted({len(r) for r in rows})}) need a dynamic-shape artifact")
        return rows

    def _prefill_rows(self, rows: list[np.ndarray]) -> np.ndarray:
        """Prefill `rows` (ids of any lengths), grouping equal lengths; state rows end in the order of `rows`."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(len(r), []).append(i)
        if len(groups) == 1:
            return self.prefill(np.stack(rows))[:, -1]
        last, states, order = [], [], []
        cap = None if self.capacity is None or not self.capacity.growable else \
            self.capacity.start(max(groups), self.start_capacity)  # one allocation: the states are stacked
        for _, idx in sorted(groups.items()):
            last.append(self.prefill(np.stack([rows[i] for i in idx]), cap)[:, -1])
            states.append({n: np.asarray(self.state[n]) for n in self.state})
            order += idx
        inv = np.argsort(order, kind="stable")
        self.state = {n: np.concatenate([s[n] for s in states])[inv] for n in states[0]}
        return np.concatenate(last)[inv]

    def _generate(self, rows, max_new_tokens, temperature, top_p, top_k, seed, stops) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        B = len(rows)
        self.stats = {"prefill_tokens": sum(len(r) for r in rows), "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
        t = time.perf_counter()
        logits = self._prefill_rows(rows)
        self.stats["prefill_s"] = time.perf_counter() - t
        active = np.arange(B)  # rows of the batch still running, in the order of the state's rows
        finished = np.zeros(B, dtype=bool)  # per state row; only a static batch keeps finished rows
        stop_ids = np.array(sorted(stops), dtype=np.int64)
        for k in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, rng, top_k)
            out = np.full(B, -1, dtype=np.int64)
            out[active[~finished]] = tok[~finished]
            yield out
            finished = finished | np.isin(tok, stop_ids)
            if k + 1 == max_new_tokens or finished.all():
                return
            if finished.any() and not self.fixed_batch:  # finished rows leave the batch
                keep = ~finished
                self.state = {n: np.asarray(self.state[n])[keep] for n in self.state}
                active, tok, finished = active[keep], tok[keep], finished[keep]
            held = int(np.asarray(self.state["pos"]).max())
            if held + 1 > self.max_seq_len:
                raise CapacityError(f"generate: stopped after {k + 1} of {max_new_tokens} new tokens: the "
                                    f"sequences hold {held} positions = max_seq_len")
            t = time.perf_counter()
            logits = self.step(tok)[:, -1]
            self.stats["decode_s"] += time.perf_counter() - t
            self.stats["decode_tokens"] += len(tok)


def generation_defaults(manifest: dict) -> dict:
    """The artifact's generation defaults (manifest ``generation``; older artifacts: the config's token ids)."""
    cfg = manifest.get("config", {})
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"), "temperature": 0.0,
           "top_p": 1.0, "top_k": 0}
    return gen | (manifest.get("generation") or {})


def check_sampling(max_new_tokens, temperature, top_p, top_k=0, seed=None, stop=None, flag: bool = False) -> None:
    """The arguments of ``generate``, checked before any work; ValueError naming the argument (as a command-line
    flag, ``--top-p``, when `flag`)."""
    def name(a: str) -> str:
        return "--" + a.replace("_", "-") if flag else a

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{name('max_new_tokens')}: must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name('temperature')}: must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:  # NaN fails the comparison
        raise ValueError(f"{name('top_p')}: must be in (0, 1], got {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"{name('top_k')}: must be an integer >= 0 (0: no limit), got {top_k!r}")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise ValueError(f"{name('seed')}: must be an integer >= 0, got {seed!r}")
    if stop is not None and (isinstance(stop, (str, bytes)) or not all(is_int(s) and s >= 0 for s in stop)):
        raise ValueError(f"{name('stop')}: must be token ids (integers >= 0), got {stop!r}")


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator, top_k: int = 0) -> np.ndarray:
    """Next token per row of `logits` [batch, vocab]: greedy when temperature == 0, else top-k then nucleus sampling."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.empty(p.shape[0], dtype=np.int64)
    for b, row in enumerate(p):
        order = np.argsort(-row, kind="stable")
        if top_k:
            order = order[:top_k]
        cum = np.cumsum(row[order]) / row[order].sum()
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        q = row[keep] / row[keep].sum()
        out[b] = keep[rng.choice(len(keep), p=q)]
    return out
