"""Sample inputs per registry row, for the registry's parity tests and per-op checks of every back end.

``sample_<op>(rng, dtype)`` returns a list of cases ``(inputs: list[np.ndarray], attrs: dict)`` in the ONNX
node's input order, covering the op's edge cases (fewer visible entries than top_k, -1 padded slots, empty
compressor state, both overlap modes, ...). A registry row names its sample function.
"""

from __future__ import annotations

import numpy as np
import torch

from dsv4.models import quant


def _f(rng, dtype, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def sample_sparse_attn(rng, dtype):
    B, T, H, D, N, K = 2, 5, 4, 64, 40, 12
    idx = rng.integers(-1, N, (B, T, K)).astype(np.int64)
    idx[1, 0] = -1  # a query with no valid slot: only the sink
    return [([_f(rng, dtype, B, T, H, D), _f(rng, dtype, B, N, D), _f(rng, dtype, H), idx,
              np.array(D ** -0.5, dtype=dtype)], {})]


def sample_indexer_topk(rng, dtype):
    B, T, H, d = 2, 5, 4, 64
    cases = []
    for n, top_k in ((40, 16), (7, 16)):  # more and fewer entries than top_k
        vis = rng.integers(0, n + 1, (B, T)).astype(np.int64)
        vis[0, 0] = 0  # nothing visible yet
        cases.append(([_f(rng, dtype, B, T, H, d), _f(rng, dtype, B, n, d), _f(rng, dtype, B, T, H), vis],
                      {"top_k": top_k}))
    return cases


def sample_compress(rng, dtype):
    cases = []
    for ov, c in ((0, 16), (1, 32)):
        score = _f(rng, dtype, 2, 3, 4, c)
        score[0, 2, 1:] = -np.inf  # a partly filled block
        prev_s = _f(rng, dtype, 2, 4, c)
        prev_s[1] = -np.inf  # empty state (position 0)
        cases.append(([_f(rng, dtype, 2, 3, 4, c), score, _f(rng, dtype, 2, 4, c), prev_s], {"overlap": ov}))
    return cases


def sample_hc_split_sinkhorn(rng, dtype):
    return [([_f(rng, dtype, 2, 5, 24), np.abs(_f(rng, dtype, 3)) + 0.5, _f(rng, dtype, 24, scale=0.1)],
             {"hc_mult": 4, "iters": 20, "eps": 1e-6})]


def _fp8(rng, o, i):
    q, s = quant.fp8_block_quantize(torch.from_numpy(rng.standard_normal((o, i)).astype(np.float32)))
    return q.view(torch.uint8).numpy(), s.numpy()


def _fp4(rng, o, k):
    q, s = quant.mxfp4_quantize(torch.from_numpy(rng.standard_normal((o, k)).astype(np.float32)))
    return q.numpy(), s.numpy()


def sample_fp8_linear(rng, dtype):
    return [([_f(rng, dtype, 2, 3, i), *_fp8(rng, o, i)], {}) for o, i in ((256, 384), (200, 300))]


def sample_mxfp4_linear(rng, dtype):
    return [([_f(rng, dtype, 2, 3, 128), *_fp4(rng, 96, 128)], {})]


def sample_fp8_dequant(rng, dtype):
    return [(list(_fp8(rng, o, i)), {}) for o, i in ((256, 384), (200, 300))]


def sample_mxfp4_dequant(rng, dtype):
    return [(list(_fp4(rng, 96, 128)), {})]


def sample_fp8_act_qdq(rng, dtype):
    x = _f(rng, dtype, 2, 3, 256, scale=10.0)
    x[0, 0, :128] = 1e-6  # a block below the amax floor
    return [([x, np.array([128])], {})]


def sample_moe_experts(rng, dtype):
    E, D, N, K = 8, 128, 9, 2
    idx = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64)
    cases = []
    for aq, inter, limit in ((0, 64, 1.0), (1, 128, 1.0), (0, 128, 0.0)):  # act_quant needs widths % 128 == 0
        w = [_f(rng, dtype, E, inter, D, scale=0.3), _f(rng, dtype, E, D, inter, scale=0.3),
             _f(rng, dtype, E, inter, D, scale=0.3)]
        cases.append(([_f(rng, dtype, N, D), np.abs(_f(rng, dtype, N, K)), idx, *w],
                      {"swiglu_limit": limit, "act_quant": aq}))
    return cases


def sample_moe(rng, dtype):
    """Learned (bias-corrected top-k) and hash routing, with and without the FP8 activation simulation and clamp."""
    E, D, N, K, V = 8, 128, 9, 2, 20
    cases = []
    for hashed, aq, inter, limit in ((0, 0, 64, 1.0), (1, 0, 64, 1.0), (0, 1, 128, 10.0), (1, 1, 128, 0.0)):
        w = [_f(rng, dtype, E, inter, D, scale=0.3), _f(rng, dtype, E, D, inter, scale=0.3),
             _f(rng, dtype, E, inter, D, scale=0.3)]
        if hashed:
            bias, table = np.zeros(E, dtype), np.stack([rng.permutation(E)[:K] for _ in range(V)]).astype(np.int64)
            ids = rng.integers(0, V, N).astype(np.int64)
        else:
            bias, table, ids = _f(rng, dtype, E, scale=0.1), np.zeros((1, K), np.int64), np.zeros(1, np.int64)
        cases.append(([_f(rng, dtype, N, D), _f(rng, dtype, E, D, scale=D ** -0.5), bias, table, ids, *w,
                       _f(rng, dtype, N, D)],
                      {"top_k": K, "route_scale": 1.5, "swiglu_limit": limit, "hash_routing": hashed, "act_quant": aq,
                       "scoring": "sqrtsoftplus"}))
    return cases
