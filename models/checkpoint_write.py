"""Writing checkpoints in the official format (SPEC §7): a streaming safetensors writer and synthetic checkpoints.

``write_synthetic(args, out, seed)`` produces what the release looks like for `args`: the official config.json,
``model.safetensors.index.json`` and shards with BF16 / F32 / I64 tensors, FP8 e4m3 projections with E8M0
128x128 tile scales and MXFP4 routed experts (I8 bytes, E8M0 per 32). Values are ``synthetic_tensor``'s, so
``round_like_checkpoint_(init_random_(DeepseekV4(args), seed))`` is the same model.

Memory is bounded by one generated chunk (<= 64 MiB of fp32, see models/synthetic.py), not by the shard: every
shard's header is computed up front from the tensor table, then tensor bytes are streamed after it. The whole
directory is written into a temporary sibling and renamed into place at the end, so a failure never leaves a
half checkpoint under the requested name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import quant
from .checkpoint import TensorSpec, expected_tensors
from .checkpoint_io import (
    CONFIG,
    DTYPES,
    INDEX,
    progress_bar,
    safetensors_header,
    write_shard,
)
from .config import FP8_BLOCK, ModelArgs
from .files import check_space, writing_dir
from .synthetic import synthetic_chunks

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(s: str | int) -> int:
    """'2GB' -> 2e9 (decimal units as Hugging Face uses them), '512MiB' -> 512 * 2^20, 1000 -> 1000."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", s)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"shard size: cannot parse {s!r} (examples: 2GB, 500MB, 512MiB, 1000000)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"shard size: must be > 0, got {s!r}")
    return n


@dataclass(frozen=True)
class Entry:
    """One stored tensor: a weight (or plain tensor) or the E8M0 scale that follows it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    spec: TensorSpec

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][0]
        for s in self.shape:
            n *= s
        return n


def official_entries(args: ModelArgs) -> list[list[Entry]]:
    """The stored tensors of the official format, grouped weight + scale, in checkpoint order."""
    groups = []
    for spec in expected_tensors(args).values():
        shape, sshape = spec.layout(spec.official_dtype)
        g = [Entry(spec.name, spec.official_dtype, shape, spec)]
        if sshape is not None:
            g.append(Entry(spec.scale_name, "F8_E8M0", sshape, spec))
        groups.append(g)
    return groups


def plan_shards(groups: list[list[Entry]], shard_size: int) -> list[list[Entry]]:
    """Greedy shards of at most `shard_size` bytes (a larger tensor gets its own); a weight and its scale stay
    together, and the MTP tensors start a shard of their own as in the release."""
    shards: list[list[Entry]] = []
    cur: list[Entry] = []
    size = 0
    for g in groups:
        gs = sum(e.nbytes for e in g)
        mtp_starts = g[0].name.startswith("mtp.") and cur and not cur[-1].name.startswith("mtp.")
        if cur and (size + gs > shard_size or mtp_starts):
            shards.append(cur)
            cur, size = [], 0
        cur += g
        size += gs
    if cur:
        shards.append(cur)
    return shards


def encode_synthetic(spec: TensorSpec, seed: int, args: ModelArgs) -> Iterator[torch.Tensor]:
    """The stored tensors of `spec` in file order, chunk by chunk: the weight's rows, then its scale (if any).

    FP8 chunks are whole 128-row tile rows and MXFP4 scales are per row, so chunk-wise quantisation equals
    quantising the whole tensor.
    """
    scales = []
    for r0, v in synthetic_chunks(spec.name, spec.shape, seed, args):
        if spec.fmt == "fp8":
            if r0 % FP8_BLOCK:
                raise RuntimeError(f"{spec.name}: chunk at row {r0} is not aligned to the FP8 tile")
            q, s = quant.fp8_block_quantize(v)
            scales.append(s)
            yield q
        elif spec.fmt == "fp4":
            q, s = quant.mxfp4_quantize(v)
            scales.append(s)
            yield q.view(torch.int8)
        else:
            yield v.to(DTYPES[spec.official_dtype][1])
    if scales:
        yield torch.cat(scales, 0).view(torch.float8_e8m0fnu)


def write_synthetic(args: ModelArgs, out: str | Path, seed: int = 0, shard_size: str | int = "2GB",
                    overwrite: bool = False, progress: bool | None = None, sparse: bool = False,
                    space_check: bool = True) -> Path:
    """Write a synthetic checkpoint of `args` in the official format to `out` (atomically); returns the path.

    sparse: every tensor's data is zero and stored as a hole (the shards take no disk blocks): the layout, headers
    and sizes of a real checkpoint for measuring what does not depend on the values (export memory, trace time)."""
    out = Path(out)
    size = parse_size(shard_size)
    shards = plan_shards(official_entries(args), size)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    with writing_dir(out, overwrite, "checkpoint make") as tmp:
        total = sum(e.nbytes for s in shards for e in s)
        if space_check:  # sparse: holes take no blocks
            check_space(out.parent, 0 if sparse else total, f"checkpoint make {out}")
        (tmp / CONFIG).write_text(json.dumps(args.to_hf_config(), indent=2) + "\n")
        with progress_bar(progress, f"writing {out.name}", total) as advance:
            for file, entries in zip(names, shards):
                if sparse:
                    _write_hole_shard(tmp / file, entries, advance)
                    continue
                specs = [e.spec for e in entries if e.name == e.spec.name]
                stream = (t for spec in specs for t in encode_synthetic(spec, seed, args))
                write_shard(tmp / file, entries, stream, advance)
        weight_map = {e.name: file for file, s in zip(names, shards) for e in s}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out



def _write_hole_shard(path: Path, entries: list[Entry], advance) -> None:
    """A shard whose header is real and whose data is one hole of the right length (zeros when read)."""
    head = safetensors_header(entries)
    data = sum(e.nbytes for e in entries)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + data)
    advance(data)
