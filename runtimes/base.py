"""What every runtime provides, and the generation loop they share.

A runtime implements two calls on numpy arrays, ``_run_prefill(ids) -> (logits, state)`` and
``_run_decode(ids, state) -> (logits, state)``, where state is the flat dict of models/state.py (keyed by
state entry name). ``Generator`` adds the checks (vocabulary, batch, capacity), the state threading, and
sampling, so the ORT and TVM generators behave identically.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class CapacityError(ValueError):
    """A sequence would run past the artifact's max_seq_len (the decode state's fixed capacity)."""


class Generator:
    """``prefill(ids)``, ``step(ids)``, ``generate(ids, max_new_tokens, temperature=0, top_p=1, seed=None)``.

    Subclasses set ``vocab_size`` and ``max_seq_len`` and implement ``_run_prefill`` / ``_run_decode``.
    """

    vocab_size: int
    max_seq_len: int

    def __init__(self) -> None:
        self.state: dict[str, np.ndarray] | None = None

    # ---- the runtime's part ---------------------------------------------------------------------------------
    def _run_prefill(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
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
    def prefill(self, ids) -> np.ndarray:
        """Start fresh sequences from position 0 with `ids` [batch, length]; returns logits [batch, length, vocab]."""
        a = self._ids(ids, "prefill")
        if a.shape[1] > self.max_seq_len:
            raise CapacityError(f"prefill: {a.shape[1]} tokens exceed max_seq_len={self.max_seq_len}")
        logits, self.state = self._run_prefill(a)
        return logits

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
        logits, self.state = self._run_decode(a, self.state)
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
        return self._run_decode(a, state)

    def generate(self, ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Iterator[np.ndarray]:
        """Prefill `ids`, then yield the next token of every sequence ([batch] int64), `max_new_tokens` times.

        temperature 0 is greedy (argmax, lowest id on ties); otherwise sampling from softmax(logits / T)
        restricted to the smallest set of tokens whose probability reaches `top_p`, seeded by `seed`.
        Raises CapacityError, after yielding what fit, when max_seq_len is reached.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        rng = np.random.default_rng(seed)
        logits = self.prefill(ids)[:, -1]
        for k in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, rng)
            yield tok
            if k + 1 == max_new_tokens:
                return
            if int(self.state["pos"].max()) + 1 > self.max_seq_len:
                raise CapacityError(f"generate: stopped after {k + 1} of {max_new_tokens} new tokens: the "
                                    f"sequences hold {int(self.state['pos'].max())} positions = max_seq_len")
            logits = self.step(tok)[:, -1]


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of `logits` [batch, vocab]: greedy when temperature == 0, else nucleus sampling."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.empty(p.shape[0], dtype=np.int64)
    for b, row in enumerate(p):
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(row[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        q = row[keep] / row[keep].sum()
        out[b] = keep[rng.choice(len(keep), p=q)]
    return out
