"""The weights writer: every initializer of both graphs streamed once into the shared external-data file, in
bounded memory, with progress (N of M tensors, bytes, rate, ETA). Decisions: docs/export.md "Real size".

Three kinds of tensor, cheapest first:
* a stored tensor the graph wants byte for byte (packed FP8/MXFP4 bytes, E8M0 scales, F32, I64, and BF16 kept as
  BF16): copied shard -> weights file through one reused buffer of ``COPY`` bytes, hashed on the way (the manifest's
  sha256 of the weights file costs no second read);
* a stored tensor the graph wants converted (BF16 -> fp32, FP8/MXFP4 -> float with ``--weights float*``): read with
  pread in row chunks of at most ``CHUNK`` bytes of output, converted, written;
* a derived re-layout (passes/derived.py) or a stacked expert tensor: member by member (one expert at a time).

Peak memory is one chunk or one expert, whatever the model size: nothing maps the shards (a mapping's touched
pages would count as resident for as long as the mapping lives).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from dsv4.models import quant
from dsv4.models.checkpoint_io import DTYPES
from dsv4.models.config import FP8_BLOCK
from dsv4.models.files import allocated_bytes, data_runs

ALIGN = 64  # byte alignment of every tensor in the weights file
CHUNK = 64 << 20  # bytes of converted output per chunk
COPY = 8 << 20  # bytes per read of a copied range (one reused buffer)
_ZEROS = bytes(1 << 20)
# stored dtype -> the graph dtypes that take its bytes unchanged
SAME_BYTES = {"I8": {ir.DataType.UINT8, ir.DataType.INT8}, "U8": {ir.DataType.UINT8},
              "F8_E4M3": {ir.DataType.UINT8, ir.DataType.FLOAT8E4M3FN}, "F8_E8M0": {ir.DataType.UINT8},
              "F32": {ir.DataType.FLOAT}, "F64": {ir.DataType.DOUBLE}, "I64": {ir.DataType.INT64},
              "I32": {ir.DataType.INT32}, "BF16": {ir.DataType.BFLOAT16}, "F16": {ir.DataType.FLOAT16}}
_TORCH = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
          ir.DataType.INT64: torch.int64, ir.DataType.UINT8: torch.uint8, ir.DataType.INT32: torch.int32,
          ir.DataType.BOOL: torch.bool, ir.DataType.DOUBLE: torch.float64}


# ---- the file ----------------------------------------------------------------------------------------------------
class WeightsFile:
    """Append-only writer of the shared external-data file; every tensor starts on an ALIGN boundary. The file's
    sha256 is computed from the bytes as they are written (``sha256`` after close): the manifest takes it from
    here instead of reading the whole file back."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb", buffering=0)
        self.offset = 0
        self._hash = hashlib.sha256()
        self._buf = None
        self.sha256: str | None = None

    def _pad(self) -> int:
        pad = -self.offset % ALIGN
        if pad:
            self._out(memoryview(bytes(pad)))
        return self.offset

    def _out(self, view: memoryview) -> None:
        self._hash.update(view)
        while view:
            n = self._f.write(view)
            view = view[n:]
            self.offset += n

    def _hole(self, n: int) -> None:
        """`n` zero bytes left as a hole (no disk blocks), hashed as the zeros they read as."""
        for k in range(0, n, len(_ZEROS)):
            self._hash.update(memoryview(_ZEROS)[: min(len(_ZEROS), n - k)])
        os.lseek(self._f.fileno(), n, os.SEEK_CUR)
        self.offset += n

    def append(self, parts: Iterable[torch.Tensor]) -> tuple[int, int]:
        """Write the parts back to back (a stacked tensor is its members in order); returns (offset, length)."""
        start = self._pad()
        for t in parts:
            self.write(t)
        return start, self.offset - start

    def write(self, t: torch.Tensor) -> None:
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        self._out(memoryview(np.ascontiguousarray(t.numpy()).reshape(-1).view(np.uint8)))

    def copy(self, src: Path, offset: int, length: int) -> None:
        """`length` bytes of `src` from `offset`, read once through one reused buffer of COPY bytes (hashed on the
        way; the next buffer's pages are asked for ahead, the copied ones dropped from the page cache); holes of a
        sparse source stay holes (skipped, not written)."""
        if self._buf is None:
            self._buf = memoryview(bytearray(COPY))
        with open(src, "rb", buffering=0) as f:
            fd, pos, end = f.fileno(), offset, offset + length
            for data, stop in data_runs(fd, offset, length):
                self._hole(data - pos)
                pos = data
                while pos < stop:
                    want = min(stop - pos, COPY)
                    if stop - pos > want:
                        os.posix_fadvise(fd, pos + want, min(stop - pos - want, COPY), os.POSIX_FADV_WILLNEED)
                    n = os.preadv(fd, [self._buf[:want]], pos)
                    if n <= 0:
                        raise OSError(f"{src}: short read at byte {pos} of [{offset}, {end})")
                    self._out(self._buf[:n])
                    # read once: its clean pages leave the page cache now instead of through reclaim (9.25 GB Flash
                    # slice, cold: 38 -> 14.5 s of system time, 190-202 -> 353-357 MB/s; docs/export.md)
                    os.posix_fadvise(fd, pos, n, os.POSIX_FADV_DONTNEED)
                    pos += n
            self._hole(end - pos)

    def close(self) -> None:
        os.ftruncate(self._f.fileno(), self.offset)  # a trailing hole still counts
        os.fsync(self._f.fileno())
        self._f.close()
        self.sha256 = self._hash.hexdigest()

    def abort(self) -> None:
        """Close after a failed write (e.g. a full disk) without flushing: the caller removes the file."""
        self._f.close()


# ---- progress ----------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Tensors and bytes written of the totals, with rate and ETA; `report(text)` at most every `every` s."""

    tensors: int
    total: int
    report: Callable[[str], None] | None = None
    every: float = 0.5
    done_tensors: int = 0
    done: int = 0

    def __post_init__(self):
        self.t0 = self._last = time.perf_counter()

    def advance(self, nbytes: int, tensor: bool = False) -> None:
        self.done += nbytes
        self.done_tensors += int(tensor)
        now = time.perf_counter()
        if self.report is not None and (now - self._last >= self.every or self.done_tensors == self.tensors):
            self._last = now
            self.report(self.text())

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def text(self) -> str:
        s = max(self.seconds, 1e-9)
        rate = self.done / s
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.done_tensors}/{self.tensors} tensors · {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB · "
                f"{rate / 1e6:.0f} MB/s · ETA {eta:.0f} s")


def printer(show: bool | None) -> Callable[[str], None] | None:
    """Progress lines on stderr (for logs: a terminal gets the stage spinner's text instead)."""
    if not show:
        return None
    return lambda text: print(f"  weights: {text}", file=sys.stderr, flush=True)


# ---- what to write -------------------------------------------------------------------------------------------------
def stored(source, name: str):
    """The checkpoint's StoredTensor for `name` (None for an in-memory source)."""
    ck = getattr(source, "ck", None)
    return ck.tensors.get(name) if ck is not None else None


def raw_copy(source, name: str, want: ir.DataType, shape: tuple[int, ...]):
    """The StoredTensor when the graph takes its bytes unchanged (same element bytes, same element count)."""
    t = stored(source, name)
    if t is None or want not in SAME_BYTES.get(t.dtype, ()):
        return None
    n = 1
    for d in shape:
        n *= d
    return t if n * DTYPES[t.dtype][0] == t.nbytes else None


def chunks(source, name: str, want: ir.DataType, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """`name` as the graph wants it, in row chunks of at most CHUNK bytes of output (dequantised, cast)."""
    from .weights import resolve

    t = stored(source, name)
    if t is None or not shape or want == ir.DataType.UINT8:
        yield resolve(source, name, want, shape)
        return
    out_row = _TORCH[want].itemsize
    for d in shape[1:]:
        out_row *= d
    rows = max(1, CHUNK // max(1, out_row))
    fmt = source.packed(name)
    if fmt == "fp8":
        rows = max(FP8_BLOCK, rows // FP8_BLOCK * FP8_BLOCK)
    scale_name = name[: -len("weight")] + "scale" if fmt else None
    for r0 in range(0, shape[0], rows):
        r1 = min(shape[0], r0 + rows)
        x = source.read(name, slice(r0, r1))
        if fmt == "fp8":
            s = source.read(scale_name, slice(r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)))
            x = quant.fp8_block_dequant(x, s)
        elif fmt == "fp4":
            x = quant.mxfp4_dequant(x, source.read(scale_name, slice(r0, r1)))
        x = x.to(_TORCH[want])
        if tuple(x.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"weights: {name} has rows of shape {list(x.shape[1:])} in the source; the graph wants "
                             f"{list(shape[1:])}")
        yield x.contiguous()


def nbytes(v: ir.Value) -> int:
    n = 1
    for d in v.shape:
        n *= int(d)
    return n * v.dtype.itemsize


# ---- bf16 kept as bf16 -------------------------------------------------------------------------------------------
def keep_bf16(graphs: dict[str, ir.Model], source) -> int:
    """Initializers stored as BF16 in the checkpoint that the graph reads as float32 become BF16 initializers
    followed by one Cast to float32 (exact): the artifact holds the checkpoint's bytes (embedding and head are
    2x smaller). Returns the number of initializers retyped per graph (the same in each)."""
    n = 0
    for m in graphs.values():
        g = m.graph
        for name, v in list(g.initializers.items()):
            t = stored(source, name)
            if t is None or t.dtype != "BF16" or v.dtype != ir.DataType.FLOAT or not v.uses():
                continue
            cast = ir.node("Cast", [v], attributes={"to": ir.DataType.FLOAT}, name=f"{name}.to_float32")
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = f"{name}.float32", ir.DataType.FLOAT, v.shape
            for node, i in list(v.uses()):
                if node is not cast:
                    node.replace_input_with(i, out)
            g.insert_before(next(iter(g)), cast) if len(g) else g.append(cast)
            v.type = ir.TensorType(ir.DataType.BFLOAT16)  # a new type: type objects may be shared
            if v.const_value is not None:
                v.const_value = ir.ExternalTensor("<pending>", 0, nbytes(v), ir.DataType.BFLOAT16, shape=v.shape,
                                                  name=name)
            n += 1
    return n // max(1, len(graphs))


# ---- the writer --------------------------------------------------------------------------------------------------
def disk_bytes(jobs: list, source) -> int:
    """The bytes the weights file will take on disk: every tensor's (aligned), less the holes that the ranges copied
    from a sparse source keep (``dsv4 checkpoint make --sparse``). Asks the filesystem (SEEK_DATA), reads nothing."""
    n = 0
    for _, v, how, _ in jobs:
        n += nbytes(v) + ALIGN
        if callable(how):
            continue
        kind, members, shp = how
        for m in (members if kind == "stack" else [members]):
            if (t := raw_copy(source, m, v.dtype, shp)) is not None:
                n -= t.nbytes - allocated_bytes(source.ck.path / t.file, t.offset, t.nbytes)
    return n


def write_weights(graphs: dict[str, ir.Model], source, buffers: dict[str, torch.Tensor], stacks: dict[str, list[str]],
                  path: Path, derived_key: str, report: Callable[[str], None] | None = None,
                  space: Callable[[int], None] | None = None) -> dict:
    """Write every initializer of the graphs once into `path` and point both graphs at it. Returns statistics:
    tensors, bytes written, bytes copied unchanged, seconds, the file's sha256, and the checkpoint bytes the written
    tensors come from (``source_bytes``: the rate the export is measured by). `space(need)`, before anything is
    written: may refuse (models/files.py check_space) the weights file's size on disk (disk_bytes)."""
    from .weights import resolve

    wanted: dict[str, ir.Value] = {}
    for m in graphs.values():
        for name, v in m.graph.initializers.items():
            wanted.setdefault(name, v)
    jobs = []
    for name, v in wanted.items():
        shape = tuple(int(d) for d in v.shape)
        if derived_key in v.meta:  # a pass's re-layout of other weights (passes/derived.py), expert by expert
            def members(n, dt, shp):
                return (resolve(source, m, dt, tuple(shp[1:])) for m in stacks[n]) if n in stacks else \
                    iter([resolve(source, n, dt, tuple(shp))])

            srcs = [s for n, _, _ in v.meta[derived_key].sources for s in stacks.get(n, [n])]
            jobs.append((name, v, lambda v=v, members=members: v.meta[derived_key](members), srcs))
        elif name in stacks:
            jobs.append((name, v, ("stack", stacks[name], shape[1:]), stacks[name]))
        elif name in source:
            jobs.append((name, v, ("one", name, shape), [name]))
        elif name in buffers:
            jobs.append((name, v, lambda b=buffers[name], v=v: iter([b.to(_TORCH[v.dtype]).contiguous()]), []))
        elif _real(v.const_value):
            continue  # a small constant the exporter lifted (e.g. a scalar): stays inside the .onnx file
        else:
            raise ValueError(f"weights: no data for initializer {name} (neither in the source nor a buffer)")
    src_names = {n for *_, srcs in jobs for n in srcs}
    src_names |= {n[: -len("weight")] + "scale" for n in src_names if n.endswith(".weight") and source.packed(n)}
    source_bytes = sum(t.nbytes for n in src_names if (t := stored(source, n)) is not None)
    if space is not None:
        space(disk_bytes(jobs, source))
    prog = Progress(len(jobs), sum(nbytes(v) for _, v, *_ in jobs), report)
    wf = WeightsFile(path)
    locs: dict[str, tuple[int, int]] = {}
    copied = 0
    try:
        for name, v, how, _ in jobs:
            if callable(how):
                start = wf._pad()
                for part in how():
                    wf.write(part)
                    prog.advance(part.numel() * part.element_size())
                locs[name] = (start, wf.offset - start)
            else:
                kind, members, shp = how
                start = wf._pad()
                for m in (members if kind == "stack" else [members]):
                    t = raw_copy(source, m, v.dtype, shp)
                    if t is not None:
                        wf.copy(source.ck.path / t.file, t.offset, t.nbytes)
                        copied += t.nbytes
                        prog.advance(t.nbytes)
                        continue
                    for part in chunks(source, m, v.dtype, shp):
                        wf.write(part)
                        prog.advance(part.numel() * part.element_size())
                locs[name] = (start, wf.offset - start)
            if locs[name][1] != nbytes(v):
                raise ValueError(f"weights: wrote {locs[name][1]} bytes for {name}, the graph wants {nbytes(v)}")
            prog.advance(0, tensor=True)
    except BaseException:
        wf.abort()
        raise
    wf.close()
    for m in graphs.values():
        for name, v in m.graph.initializers.items():
            if name in locs:
                off, length = locs[name]
                v.const_value = ir.ExternalTensor(path.name, off, length, v.dtype, shape=v.shape, name=name,
                                                  base_dir=path.parent)
    return {"tensors": len(jobs), "bytes": wf.offset, "copied_bytes": copied, "source_bytes": source_bytes,
            "seconds": prog.seconds, "sha256": wf.sha256}


def _real(t) -> bool:
    """Whether an initializer's value holds data (not a meta/fake placeholder nor a pending external one)."""
    if t is None or isinstance(t, ir.ExternalTensor):
        return False
    raw = getattr(t, "raw", None)
    return not (isinstance(raw, torch.Tensor) and (raw.is_meta or type(raw).__name__ == "FakeTensor"))


# ---- progress to the stage -------------------------------------------------------------------------------------
def reporter(status, show: bool | None) -> Callable[[str], None]:
    """Progress text to the stage's spinner, and as lines on stderr when asked for (`show`) without a terminal."""
    lines = printer(show) if show and not sys.stderr.isatty() else None
    last = [0.0]

    def report(text: str) -> None:
        status.update(text)
        if lines is not None and time.perf_counter() - last[0] >= 5:
            last[0] = time.perf_counter()
            lines(text)

    return report
