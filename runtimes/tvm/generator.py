"""``Generator(ART)``: an artifact run by TVM's Relax VM, with the ORT Generator's interface (runtimes/base.py).

The two graphs come from a ``dsv4 compile`` directory (``compiled=DIR``) or are compiled in memory on first
use. Weights are read once from the artifact's external-data file and shared by both graphs. The decode
state stays on the device between steps: ``state`` maps each entry to the device tensor and converts it to
numpy only when read (the base class reads ``pos``; parity reads every entry), so a decode step copies only
its token ids and logits across.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import tvm

from dsv4.export.artifact import load_manifest
from dsv4.export.signature import GRAPHS, INPUT_IDS, LOGITS, past, present
from dsv4.runtimes.base import Generator as _Base
from dsv4.runtimes.base import generation_defaults

from . import backend, library


class DeviceState(Mapping):
    """State entry -> numpy array (converted on first read); ``tensors`` holds the device tensors."""

    def __init__(self, tensors: dict[str, tvm.runtime.Tensor]):
        self.tensors = tensors
        self._host: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._host:
            self._host[name] = self.tensors[name].numpy()
        return self._host[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class Generator(_Base):
    """prefill / step / generate on an artifact directory with TVM (see runtimes/base.py for the contract).

    target: "tvm-llvm" (default) or "tvm-cuda"; compiled: a ``dsv4 compile`` output for that target (else the
    graphs are compiled here, about a minute for tiny on 2 cores, TVM's native log going to the temporary file
    ``log``); arch: CUDA arch when compiling here.
    """

    def __init__(self, art: str | Path, compiled: str | Path | None = None, target: str = "tvm-llvm",
                 arch: str = backend.DEFAULT_ARCH, device_index: int = 0, verify: bool = True):
        super().__init__()
        self.art = Path(art)
        self.manifest = load_manifest(art, verify=verify)
        cfg = self.manifest["config"]
        self.vocab_size, self.max_seq_len = int(cfg["vocab_size"]), int(cfg["max_seq_len"])
        self.names = [e["name"] for e in self.manifest["state"]]
        self.eos_token_id = generation_defaults(self.manifest)["eos_token_id"]
        self.target = target
        self.device = backend.device_of(target, device_index)
        weights = backend.Weights(self.art, self.device)
        self.graphs: dict[str, backend.CompiledGraph] = {}
        self.seconds: dict[str, dict] = {}
        self.log: Path | None = None
        if compiled is not None:
            cm, _ = library.load_compiled(compiled, self.art, target)
            for g in GRAPHS:
                lib = tvm.runtime.load_module(str(Path(compiled) / cm["graphs"][g]["library"]))
                ins, outs, params = library.graph_info(cm, g)
                self.graphs[g] = backend.CompiledGraph(lib, ins, outs, params, weights)
                self.seconds[g] = cm["graphs"][g]["seconds"]
        else:
            library.check_artifact(self.manifest, self.art)
            tgt = backend.make_target(target, arch)
            fd, log = tempfile.mkstemp(prefix="dsv4-tvm-", suffix=".log")
            os.close(fd)
            self.log = Path(log)  # TVM's native log of this compile (library.native_log)
            with library.native_log(self.log):
                for g in GRAPHS:
                    ex, prep, self.seconds[g], _ = library.compile_graph(self.art, g, tgt)
                    self.graphs[g] = backend.CompiledGraph(ex, prep.inputs, prep.outputs, prep.params, weights)
        self.providers = [target]  # what ran it, as the ORT Generator reports its execution providers

    def _split(self, outs: dict) -> tuple[np.ndarray, DeviceState]:
        return outs[LOGITS].numpy(), DeviceState({n: outs[present(n)] for n in self.names})

    def _run_prefill(self, ids: np.ndarray, capacity=None):  # TVM artifacts keep the fixed-capacity state
        return self._split(self.graphs["prefill"].run({INPUT_IDS: ids}))

    def _run_decode(self, ids: np.ndarray, state: Mapping):
        dev = state.tensors if isinstance(state, DeviceState) else state
        return self._split(self.graphs["decode"].run({INPUT_IDS: ids, **{past(n): dev[n] for n in self.names}}))
