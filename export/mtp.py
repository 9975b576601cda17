"""MTP as a sidecar graph, and the multi-token verify graph of speculative decoding (``dsv4 export --mtp``).

V4 ships one MTP block (SPEC §8): it reads the main model's final streams at positions t (``hidden``) and the
embeddings of the tokens t+1, and predicts the tokens t+2. An artifact exported with ``--mtp`` holds, besides
prefill and decode (which then also output ``hidden``):

- ``mtp.onnx``: ``hidden`` [batch, length, hc, dim] + ``input_ids`` [batch, length] (the next tokens) + its own
  state ``past.*`` (manifest ``mtp_state``: ``pos`` and ``mtp0.*``) -> the last position's ``logits`` (the draft)
  + ``present.*``;
- ``verify.onnx``: the main step with T tokens after the past and every position's logits + ``hidden``: one call
  checks a draft and yields the token after it.

Both share the artifact's one weights file (embedding and head are the main model's tensors, by name). The
Generator's speculative loop is runtimes/ort/speculative.py.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.models.model import DeepseekV4
from dsv4.models.state import init_state, state_entries

from .signature import BATCH, HIDDEN, INPUT_IDS, LENGTH, LOGITS, past, present
from .targets import Target


class _Mtp(nn.Module):
    """hidden [B,T,hc,D] + next ids [B,T] + MTP state -> (last position's logits, *present MTP state)."""

    def __init__(self, model: DeepseekV4):
        super().__init__()
        self.model = model
        self.names = [e.name for e in state_entries(model.args, model.dtype, mtp=True)]

    def forward(self, hidden, input_ids, *past_state):
        logits, new, _ = self.model.forward_mtp(hidden, input_ids, dict(zip(self.names, past_state)), last_only=True)
        return (logits, *[new[n] for n in self.names])


def check(args, target: Target) -> None:
    """--mtp needs an MTP block and a dynamic ONNX Runtime target (the loop runs in runtimes/ort)."""
    if args.n_mtp_layers < 1:
        raise ValueError("--mtp: the checkpoint has no MTP block (num_nextn_predict_layers is 0)")
    if not target.dynamic or target.runtime != "ort":
        raise ValueError(f"--mtp: speculative decoding runs on the dynamic ONNX Runtime targets (ort-cpu, ort-cuda), "
                         f"not {target.name}")


def trace_mtp(model: DeepseekV4, target: Target):
    """The MTP graph of a meta-device model (export.trace's conventions: dynamic batch and length)."""
    from .tracing import onnx_trace

    args, names = model.args, [e.name for e in state_entries(model.args, model.dtype, mtp=True)]
    b, n = 2, 7
    state = init_state(args, b, model.dtype, "meta", mtp=True)
    example = (torch.zeros(b, n, args.hc_mult, args.dim, dtype=model.dtype, device="meta"),
               torch.zeros(b, n, dtype=torch.int64, device="meta"), *[state[k] for k in names])
    batch = torch.export.Dim(BATCH, min=1, max=4096)
    length = torch.export.Dim(LENGTH, min=1, max=args.max_seq_len)
    dyn = ({0: batch, 1: length}, {0: batch, 1: length}, tuple({0: batch} for _ in names))
    m = onnx_trace(_Mtp(model), example, dyn, [HIDDEN, INPUT_IDS] + [past(k) for k in names],
                   [LOGITS] + [present(k) for k in names], target)
    m.graph.name = "dsv4_mtp"
    return m
