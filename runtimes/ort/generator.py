"""``Generator(ART, providers=None)``: an artifact run by ONNX Runtime, state threaded through the decode graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv4.export.signature import CAPACITY, INPUT_IDS, LENGTHS, graph_key, past, present
from dsv4.runtimes.base import CapacityError, StateCapacity, generation_defaults
from dsv4.runtimes.base import Generator as _Base

from .distributed import rank_artifact
from .session import load_sessions


class Generator(_Base):
    """prefill / step / generate on an artifact directory (see runtimes/base.py for the contract).

    providers: ORT execution providers (default: the artifact's target). optimization: "all" (default),
    "extended", "basic" or "disable". threads / spinning: see session.session_options. capacity: the positions a
    prefill allocates the state for (growable artifacts, docs/capacity.md; default: the prompt's length rounded
    up to a power of two, at least 256); the state doubles when a step would not fit, up to max_seq_len.
    """

    def __init__(self, art: str | Path, providers: list[str] | None = None, optimization: str = "all",
                 threads: int | None = None, spinning: bool = False, verify: bool = True, layer_taps: bool = False,
                 capacity: int | None = None):
        super().__init__()
        art = rank_artifact(art)  # a ranks artifact (export/ranks.py): join the group, run this rank's artifact
        self.art = Path(art)
        # layer_taps: run copies of the graphs that also output every decoder layer's streams (layer_outputs)
        self._taps = layer_taps
        self.manifest, self.sessions = load_sessions(art, providers, optimization, threads, spinning, verify,
                                                     layer_taps)
        self.layer_outputs: dict[str, np.ndarray] = {}
        cfg = self.manifest["config"]
        self.vocab_size, self.max_seq_len = int(cfg["vocab_size"]), int(cfg["max_seq_len"])
        self.names = [e["name"] for e in self.manifest["state"]]
        self.providers = self.sessions["decode"].get_providers()
        # static artifacts (ascend): fixed batch, prefill buckets; a prompt is right-padded up to the next bucket
        self.static = self.manifest.get("static")
        self.fixed_batch = self.static["batch"] if self.static else None
        self.eos_token_id = generation_defaults(self.manifest)["eos_token_id"]
        self.capacity = StateCapacity(self.manifest, self.max_seq_len)
        if capacity is not None and not 0 < int(capacity) <= self.max_seq_len:
            raise ValueError(f"capacity: {capacity} is not in [1, max_seq_len={self.max_seq_len}]")
        self.start_capacity = capacity

    def _state(self, outputs: list[np.ndarray], session) -> dict[str, np.ndarray]:
        by_name = dict(zip((o.name for o in session.get_outputs()), outputs))
        if self._taps:
            self.layer_outputs = {k.split(".")[0]: v for k, v in by_name.items() if k.endswith(".streams")}
        return {n: by_name[present(n)] for n in self.names}

    def _run_prefill(self, ids, capacity=None):
        if not self.static:
            s = self.sessions["prefill"]
            feed = {INPUT_IDS: ids} | ({} if capacity is None else {CAPACITY: np.array(capacity, dtype=np.int64)})
            out = s.run(None, feed)
            return out[0], self._state(out, s)
        B, L = ids.shape
        batch, buckets = self.static["batch"], self.static["prefill_lengths"]
        if B != batch:
            raise ValueError(f"prefill: the artifact's graphs have a static batch of {batch}, got {B} sequences "
                             f"(export with --batch {B})")
        T = next((n for n in buckets if n >= L), None)
        if T is None:
            raise CapacityError(f"prefill: {L} tokens exceed the largest prefill bucket {buckets[-1]} "
                                f"(buckets {buckets}; export with a longer --prefill-lengths)")
        s = self.sessions[graph_key("prefill", T)]
        padded = np.zeros((B, T), dtype=np.int64)
        padded[:, :L] = ids
        out = s.run(None, {INPUT_IDS: padded, LENGTHS: np.full(B, L, dtype=np.int64)})
        return out[0][:, :L], self._state(out, s)

    def generate_speculative(self, prompt, max_new_tokens: int, stop=None, ignore_eos: bool = False):
        """Greedy speculative decoding with the MTP graph (runtimes/ort/speculative.py): the tokens of
        ``generate(prompt, max_new_tokens)`` at temperature 0; ``stats["acceptance"]`` after the loop."""
        from .speculative import generate_speculative

        return generate_speculative(self, prompt, max_new_tokens, stop, ignore_eos)

    def _run_decode(self, ids, state):
        s = self.sessions["decode"]
        out = s.run(None, {INPUT_IDS: ids, **{past(n): state[n] for n in self.names}})
        return out[0], self._state(out, s)
