"""Deterministic random weights of realistic scale, one tensor at a time (for tests, the demo and benchmarks).

``synthetic_tensor(name, shape, seed)`` depends only on the official tensor name, its shape and the seed,
so a model initialised in memory and a synthetic checkpoint streamed tensor by tensor hold the same values.
Large tensors (the 129280-row embedding and head) are generated in row chunks of at most ``CHUNK_ELEMS``
elements, each chunk from its own generator, so a checkpoint writer never holds more than one chunk in fp32.
Chunk heights are multiples of 128 (the FP8 tile), so each chunk quantises on its own exactly as the whole.
"""

from __future__ import annotations

import zlib

import torch

from .config import ModelArgs


def _gen(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))


CHUNK_ELEMS = 1 << 24  # 64 MiB of fp32 per generated chunk


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows per generated chunk: a multiple of 128 (the FP8 tile height), at most CHUNK_ELEMS elements unless
    128 rows are already more."""
    row = 1
    for s in shape[1:]:
        row *= s
    rows = max(128, CHUNK_ELEMS // max(row, 1))
    return min(rows - rows % 128, shape[0]) if shape else 1


def synthetic_chunks(name: str, shape: tuple[int, ...], seed: int, args: ModelArgs):
    """Yield (first row, values) of `name` in row chunks; chunk 0 uses the tensor's own generator."""
    if not shape:
        yield 0, _values(name, shape, shape, _gen(name, seed), args)
        return
    rows = chunk_rows(shape)
    for k, r0 in enumerate(range(0, shape[0], rows)):
        g = _gen(name if k == 0 else f"{name}#{k}", seed)
        yield r0, _values(name, (min(rows, shape[0] - r0), *shape[1:]), shape, g, args)


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int, args: ModelArgs) -> torch.Tensor:
    """fp32 values (int64 for tid2eid) for the tensor `name` (an official checkpoint name)."""
    parts = [v for _, v in synthetic_chunks(name, tuple(shape), seed, args)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _values(name: str, shape: tuple[int, ...], full: tuple[int, ...], g: torch.Generator,
            args: ModelArgs) -> torch.Tensor:
    """Values of a block of rows `shape` of the tensor `name` whose whole shape is `full`."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("tid2eid"):
        v, k = shape
        return torch.rand(v, args.n_routed_experts, generator=g).argsort(-1)[:, :k].to(torch.int64)
    randn = torch.randn(shape, generator=g)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * randn
    if leaf.endswith("_fn"):  # hc_*_fn [mix, hc*D]: mixing logits of order 1
        return randn * full[-1] ** -0.5
    if leaf.endswith("_base"):
        return 0.1 * randn
    if leaf.endswith("_scale"):
        return 0.5 + 0.5 * torch.rand(shape, generator=g)
    if leaf == "attn_sink":
        return 0.5 * randn
    if leaf == "ape":
        return 0.1 * randn
    if name.endswith("gate.bias"):
        return 0.1 * randn
    if name == "embed.weight":
        return randn
    if len(shape) == 2:  # every projection [out, in]: unit-variance outputs for unit-variance inputs
        return randn * full[1] ** -0.5
    return randn


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and tid2eid table of a DeepseekV4 with synthetic values (in place)."""
    args = model.args
    for name, t in model.named_official_tensors():
        t.copy_(synthetic_tensor(name, tuple(t.shape), seed, args).to(t.dtype))
    return model
