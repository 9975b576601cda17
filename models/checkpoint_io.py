"""The safetensors layer of checkpoints: header parsing, a lazy checkpoint-directory reader, a streaming writer.

A checkpoint directory holds ``config.json``, ``model.safetensors.index.json`` (tensor name -> shard) and the
shards. A shard is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets)
and the tensor bytes. Headers are parsed here so that validation never touches tensor data; data is read with
``safetensors.safe_open``, one tensor (or a slice of its rows) at a time. Never torch.load, never pickle.
What the tensors must be for DeepSeek V4 lives in models/checkpoint.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # the safetensors limit on the JSON header

# safetensors dtype codes -> (bytes per element, torch dtype)
DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "BF16": (2, torch.bfloat16), "F16": (2, torch.float16), "F32": (4, torch.float32), "F64": (8, torch.float64),
    "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16), "I8": (1, torch.int8),
    "U8": (1, torch.uint8), "BOOL": (1, torch.bool), "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2), "F8_E8M0": (1, torch.float8_e8m0fnu),
}
FLOATS = ("BF16", "F16", "F32")

# ---------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint. `kind`: config, index, shard, missing, unexpected, dtype, shape,
    scale, experts or values."""

    kind: str
    tensor: str
    file: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.tensor or '-'} in {self.file}: {self.detail}"


class CheckpointError(ValueError):
    """A checkpoint failed validation; ``problems`` lists everything found, not just the first."""

    def __init__(self, path: str | Path, problems: list[Problem]):
        self.path, self.problems = str(path), list(problems)
        lines = [str(p) for p in self.problems[:40]]
        if len(self.problems) > 40:
            lines.append(f"... and {len(self.problems) - 40} more")
        super().__init__(f"checkpoint {path}: {len(self.problems)} problem(s)\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------------------
# Reading: headers parsed here, data through safe_open
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredTensor:
    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # of its first byte in the shard file (header included)


def read_header(path: Path) -> tuple[dict, int]:
    """(header JSON, bytes of tensor data present after it). Raises ValueError on a malformed header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, size - 8 - n


class Checkpoint:
    """An opened checkpoint directory: config, tensor locations, and lazy per-tensor reads.

    Structural problems (unreadable config or index, absent, malformed or truncated shards, index and
    shards disagreeing) are collected in ``problems``; tensors they concern are listed in ``accounted`` so
    that validation does not report them a second time as missing.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.problems: list[Problem] = []
        self.accounted: set[str] = set()
        self.tensors: dict[str, StoredTensor] = {}
        self.config: dict | None = None
        self._handles: dict[str, object] = {}
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint: {self.path} is not a directory")
        self._read_config()
        self._read_shards(self._read_index())

    def _problem(self, kind: str, tensor: str, file: str, detail: str) -> None:
        self.problems.append(Problem(kind, tensor, file, detail))

    def _read_config(self) -> None:
        p = self.path / CONFIG
        try:
            self.config = json.loads(p.read_text())
        except FileNotFoundError:
            self._problem("config", "", CONFIG, "missing")
        except (OSError, json.JSONDecodeError) as e:
            self._problem("config", "", CONFIG, f"not readable as JSON ({e})")

    def _read_index(self) -> dict[str, str] | None:
        """weight_map from the index, or None for an index-less checkpoint (every *.safetensors file)."""
        p = self.path / INDEX
        if not p.exists():
            return None
        try:
            wm = json.loads(p.read_text())["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._problem("index", "", INDEX, f"unreadable ({e!r})")
            return {}
        return wm

    def _read_shards(self, weight_map: dict[str, str] | None) -> None:
        if weight_map is None:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                self._problem("index", "", INDEX, "no index file and no *.safetensors shards")
        else:
            files = sorted(set(weight_map.values()))
        listed: dict[str, list[str]] = {}
        for name, file in (weight_map or {}).items():
            listed.setdefault(file, []).append(name)
        for file in files:
            names = listed.get(file, [])
            shard = self.path / file
            if Path(file).name != file:  # never read outside the checkpoint directory
                self.accounted.update(names)
                self._problem("shard", _few(names), file, "not a plain file name in the checkpoint directory")
                continue
            if not shard.is_file():
                self.accounted.update(names)
                self._problem("shard", _few(names), file, f"listed in {INDEX} for {len(names)} tensor(s) but the "
                              "file does not exist")
                continue
            try:
                header, data_len = read_header(shard)
            except (OSError, ValueError) as e:
                self.accounted.update(names)
                self._problem("shard", _few(names), file, f"unreadable: {e}")
                continue
            self._add_shard(file, header, data_len, names if weight_map is not None else None, weight_map or {})

    def _add_shard(self, file: str, header: dict, data_len: int, listed: list[str] | None,
                   weight_map: dict[str, str]) -> None:
        start = (self.path / file).stat().st_size - data_len  # the data area follows the 8-byte length + header
        cut: list[str] = []
        end = 0  # tensors must tile the data area without holes or overlaps (as safetensors requires)
        entries = sorted(((n, i) for n, i in header.items() if n != "__metadata__"),
                         key=lambda e: e[1].get("data_offsets", [0])[0] if isinstance(e[1], dict) else 0)
        for name, info in entries:
            try:
                dtype, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
                if dtype not in DTYPES:
                    raise ValueError(f"unknown dtype {dtype!r}")
                size = DTYPES[dtype][0] * math.prod(shape)
            except (KeyError, TypeError, ValueError) as e:
                self.accounted.add(name)
                self._problem("shard", name, file, f"malformed header entry ({e})")
                continue
            if b - a != size or a != end:
                self.accounted.add(name)
                self._problem("shard", name, file, f"header offsets [{a}, {b}) do not hold {dtype} {list(shape)} "
                              f"right after the previous tensor (ends at {end})")
                end = max(end, b)
                continue
            end = b
            if b > data_len:
                cut.append(name)
                continue
            if name in self.tensors:
                self._problem("shard", name, file, f"also stored in {self.tensors[name].file}")
                continue
            self.tensors[name] = StoredTensor(name, file, dtype, shape, size, start + a)
        if cut:
            self.accounted.update(cut)
            self._problem("shard", _few(cut), file, f"truncated: {data_len} bytes of tensor data, the header needs "
                          f"{end} for {len(cut)} more tensor(s)")
        elif end < data_len:
            self._problem("shard", "", file, f"{data_len - end} bytes after the last tensor (the header covers {end})")
        if listed is not None:
            in_file = set(header) - {"__metadata__"}
            for name in listed:
                if name not in in_file:
                    self.accounted.add(name)
                    self._problem("index", name, file, f"{INDEX} maps it to {file}, which does not contain it")
            for name in sorted(in_file - set(listed)):
                if name in self.tensors and self.tensors[name].file == file:
                    del self.tensors[name]
                if name not in weight_map:  # else the index maps it to another file: reported for that file
                    self.accounted.add(name)
                    self._problem("index", name, file, f"stored in {file} but not listed by {INDEX}")

    # ---- data ------------------------------------------------------------------------------------------
    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The stored tensor (its on-disk dtype), or a slice of its rows; only that data is read."""
        from safetensors import safe_open

        file = self.tensors[name].file
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        h = self._handles[file]
        return h.get_tensor(name) if rows is None else h.get_slice(name)[rows]

    def read_raw(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The stored tensor (its on-disk dtype), or a contiguous slice of its rows, read with pread into fresh
        memory: not a mapping of the shard, so its resident pages go with the tensor (bounded export RSS)."""
        t = self.tensors[name]
        n_rows = t.shape[0] if t.shape else 1
        row = t.nbytes // n_rows if n_rows else 0
        r0, r1, _ = (rows or slice(None)).indices(n_rows)
        r1 = max(r0, r1)
        buf = bytearray((r1 - r0) * row)
        view, done = memoryview(buf), 0
        with open(self.path / t.file, "rb", buffering=0) as f:
            while done < len(buf):  # one pread returns at most ~2 GiB
                got = os.preadv(f.fileno(), [view[done:]], t.offset + r0 * row + done)
                if got <= 0:
                    raise OSError(f"{self.path / t.file}: short read of {name} ({done} of {len(buf)} bytes)")
                done += got
        shape = (r1 - r0, *t.shape[1:]) if t.shape else ()
        if not buf:
            return torch.empty(shape, dtype=DTYPES[t.dtype][1])
        return torch.frombuffer(buf, dtype=torch.uint8).view(DTYPES[t.dtype][1]).reshape(shape)

    def first_layers(self, n: int) -> None:
        """Forget the tensors of decoder layers >= n (a slice of the model: the first n layers, head and MTP)."""
        for name in [k for k in self.tensors if k.startswith("layers.") and int(k.split(".")[1]) >= n]:
            del self.tensors[name]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def safetensors_header(entries: list) -> bytes:
    """8-byte little-endian length + JSON header (padded with spaces so the data starts 8-byte aligned)."""
    h: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for e in entries:
        h[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_shard(path: Path, entries: list, tensors: Iterator[torch.Tensor], advance) -> None:
    """Write one shard: header, then the bytes of `tensors` (which must match `entries` in total size)."""
    expected = sum(e.nbytes for e in entries)
    written = 0
    with open(path, "wb") as f:
        f.write(safetensors_header(entries))
        for t in tensors:
            b = t.contiguous().view(torch.uint8).reshape(-1).numpy()
            f.write(memoryview(b))
            written += b.nbytes
            advance(b.nbytes)
        f.flush()
        os.fsync(f.fileno())
    if written != expected:
        raise RuntimeError(f"{path.name}: wrote {written} bytes of tensor data, the header announces {expected}")


def check_finite(ck: Checkpoint, progress: bool | None = None) -> list[Problem]:
    """NaN/Inf in float tensors, NaN codes in F8_E4M3 (0x7F/0xFF) and F8_E8M0 (255), read in row chunks."""
    out = []
    todo = [t for t in ck.tensors.values() if t.dtype in FLOATS + ("F64", "F8_E4M3", "F8_E8M0")]
    with progress_bar(progress, "checking values", sum(t.nbytes for t in todo)) as advance:
        prev = None
        for t in sorted(todo, key=lambda t: t.file):
            if t.file != prev:  # release the previous shard's mapping: resident pages stay bounded by one shard
                ck.close()
                prev = t.file
            rows = max(1, (1 << 26) // max(1, t.nbytes // max(1, t.shape[0] if t.shape else 1)))
            bad, first = 0, None
            for r0 in range(0, t.shape[0] if t.shape else 1, rows):
                x = ck.read(t.name) if not t.shape else ck.read(t.name, slice(r0, r0 + rows))
                if t.dtype.startswith("F8"):
                    b = x.view(torch.uint8)
                    m = (b & 0x7F) == 0x7F if t.dtype == "F8_E4M3" else b == 255
                else:
                    m = ~torch.isfinite(x)
                n = int(m.sum())
                if n and first is None:
                    first = [int(i) for i in m.nonzero()[0]]
                    if t.shape:
                        first[0] += r0
                bad += n
            advance(t.nbytes)
            if bad:
                out.append(Problem("values", t.name, t.file, f"{bad} NaN/Inf value(s) in {t.dtype}, first at {first}"))
    return out


def dtype_totals(ck: Checkpoint) -> dict[str, dict[str, int]]:
    """Tensors and bytes per stored dtype."""
    tot: dict[str, dict[str, int]] = {}
    for t in ck.tensors.values():
        d = tot.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += t.nbytes
    return dict(sorted(tot.items()))


@contextmanager
def progress_bar(show: bool | None, what: str, total: int):
    """A rich byte progress bar (shown when `show`, or when stderr is a terminal if `show` is None)."""
    if show is None:
        show = sys.stderr.isatty() and not os.environ.get("DSV4_NO_PROGRESS")
    if not show:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)
