"""Shared fixtures: the tiny preset and models built from it (session-scoped, built once)."""

from __future__ import annotations

import pytest
import torch

from dsv4.models import DeepseekV4, init_random_, preset


@pytest.fixture(scope="session")
def tiny_args():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_args):
    """tiny, fp32, quantisation simulation on, seed 0."""
    return init_random_(DeepseekV4(tiny_args), seed=0).eval()


@pytest.fixture(scope="session")
def tiny_model_f64():
    """tiny in fp64 with the quantisation simulation on: rounding decisions no longer depend on 1-ulp noise."""
    return init_random_(DeepseekV4(preset("tiny"), dtype=torch.float64), seed=0).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A synthetic tiny checkpoint in the official format (seed 0, 256 kB shards so there are several); read-only."""
    from dsv4.models.checkpoint_write import write_synthetic

    return write_synthetic(preset("tiny"), tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, shard_size="256KB",
                           progress=False)
