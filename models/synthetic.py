"""Deterministic random weights of realistic scale, one tensor at a time (for tests, the demo and benchmarks).

``synthetic_tensor(name, shape, seed)`` depends only on the official tensor name, its shape and the seed,
so a model initialised in memory and a synthetic checkpoint streamed tensor by tensor hold the same values.
"""

from __future__ import annotations

import zlib

import torch

from .config import ModelArgs


def _gen(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int, args: ModelArgs) -> torch.Tensor:
    """fp32 values (int64 for tid2eid) for the tensor `name` (an official checkpoint name)."""
    g = _gen(name, seed)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("tid2eid"):
        v, k = shape
        return torch.rand(v, args.n_routed_experts, generator=g).argsort(-1)[:, :k].to(torch.int64)
    randn = torch.randn(shape, generator=g)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * randn
    if leaf.endswith("_fn"):  # hc_*_fn [mix, hc*D]: mixing logits of order 1
        return randn * shape[-1] ** -0.5
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
        return randn * shape[1] ** -0.5
    return randn


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and tid2eid table of a DeepseekV4 with synthetic values (in place)."""
    args = model.args
    for name, t in model.named_official_tensors():
        t.copy_(synthetic_tensor(name, tuple(t.shape), seed, args).to(t.dtype))
    return model
