"""Weights outside the tracer: where each tensor comes from, the meta skeleton that is traced, and the ONE
external-data file both graphs share, written tensor by tensor (DESIGN.md "Artifacts").

A source is an in-memory DeepseekV4 (``ModuleSource``) or a checkpoint directory (``CheckpointSource``, read
lazily through models/checkpoint.py). Either may hold FP8/MXFP4 projections packed (uint8 bytes + E8M0
scales) or as floats. The skeleton mirrors the source: a projection stored packed is traced packed unless
``--weights`` asks for floats, in which case it is dequantised here, tensor by tensor, while writing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from dsv4.models import kernels, quant
from dsv4.models.checkpoint import Checkpoint, parameters_on_meta, validate
from dsv4.models.config import FP4_BLOCK, FP8_BLOCK, ModelArgs
from dsv4.models.model import DeepseekV4, Linear, MoE
from dsv4.models.stored import check_act_blocks, set_stored, stored_format

from .stream import ALIGN, WeightsFile  # noqa: F401  (re-exported: the writer lives in stream.py)

_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_PACKED_DTYPES = {"F8_E4M3": "fp8", "I8": "fp4"}


class ModuleSource:
    """Tensors of an in-memory DeepseekV4 under their official names (packed Linears as uint8 + scale)."""

    def __init__(self, model: DeepseekV4):
        self.model, self.args = model, model.args
        self._tensors = dict(model.named_official_tensors())
        self._fmt = {f"{n}.weight": m.fmt for n, m in model.named_modules() if isinstance(m, Linear) and m.packed}

    def packed(self, name: str) -> str | None:
        """"fp8" / "fp4" when `name` (a ``*.weight``) is stored packed, else None."""
        return self._fmt.get(name)

    def read(self, name: str) -> torch.Tensor:
        t = self._tensors[name].detach()
        return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu) else t

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def close(self) -> None:
        pass


class CheckpointSource:
    """Tensors of an official-format checkpoint directory, validated first, read one at a time (pread, never a
    mapping). `layers`: only the first N decoder layers (+ head and MTP), a slice of any checkpoint."""

    def __init__(self, path: str | Path, layers: int | None = None, **overrides):
        from dsv4.models.checkpoint import CheckpointError

        self.ck = Checkpoint(path)
        if layers is not None:
            overrides = {**first_layers(self.ck.config or {}, layers), **overrides}
            self.ck.first_layers(layers)
        rep = validate(self.ck, **overrides)
        if not rep.ok:
            raise CheckpointError(self.ck.path, rep.problems)
        self.args: ModelArgs = rep.args

    def packed(self, name: str) -> str | None:
        t = self.ck.tensors.get(name)
        return _PACKED_DTYPES.get(t.dtype) if t is not None and name.endswith(".weight") else None

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self.ck.read_raw(name, rows)
        return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8) else t

    def __contains__(self, name: str) -> bool:
        return name in self.ck.tensors

    def close(self) -> None:
        self.ck.close()


def first_layers(config: dict, n: int) -> dict:
    """ModelArgs overrides that keep the first `n` decoder layers of a checkpoint's config (+ its MTP entries)."""
    total = int(config.get("num_hidden_layers", 0))
    if not 1 <= n <= total:
        raise ValueError(f"--layers: {n} is not between 1 and the checkpoint's {total} layers")
    ratios = list(config.get("compress_ratios", []))
    return {"n_layers": n, "compress_ratios": tuple(ratios[:n] + ratios[total:]),
            "n_hash_layers": min(int(config.get("num_hash_layers", 0)), n)}


def skeleton(args: ModelArgs, source, weights: str) -> DeepseekV4:
    """The model that is traced: parameters on the meta device (buffers real), packed where the source is
    packed and `weights` is "packed"; in float modes every parameter is float of that dtype."""
    dtype = torch.float32 if weights == "packed" else _FLOAT[weights]
    with parameters_on_meta():
        model = DeepseekV4(args, dtype)
    set_stored(model, _stored_of(source))  # the FP8 activation simulation follows the stored format
    check_act_blocks(model)
    if weights != "packed":
        return stack_for_trace(model)
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear) or mod.fmt not in ("fp8", "fp4"):
            continue
        fmt = source.packed(f"{name}.weight")
        if fmt is None:
            continue
        o, i = mod.out_features, mod.in_features
        meta = {"device": "meta", "dtype": torch.uint8}
        if fmt == "fp8":
            mod.set_packed(torch.empty(o, i, **meta), torch.empty(-(-o // FP8_BLOCK), -(-i // FP8_BLOCK), **meta))
        else:
            mod.set_packed(torch.empty(o, i // 2, **meta), torch.empty(o, i // FP4_BLOCK, **meta))
    return stack_for_trace(model)


class _Slot(nn.Module):
    """One stacked weight kind (w1, w2 or w3) of a layer's routed experts: weight [E, ...] (+ scale [E, ...])."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(scale, requires_grad=False)


class StackedExperts(nn.Module):
    """A MoE layer's routed experts as ONE meta parameter per weight and scale, [E, ...], for tracing.

    Why: torch.export's graph-signature bookkeeping is quadratic in the number of lifted parameters; a Flash layer
    has 256 experts x (3 weights + 3 scales) = 1536 of them, which made one layer's trace cost minutes. The stacked
    parameter is what the graph holds anyway (one initializer [E, ...] per kind, written from the checkpoint's
    per-expert tensors by export/stream.py), so the traced graph is the same."""

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        first = experts[0].w1
        self.fmt = (kernels.FMT_FP4 if first.fmt == "fp4" else kernels.FMT_FP8) if first.packed else kernels.FMT_FLOAT
        self.act_quant = first.act_quant
        self.n = len(experts)
        for k in ("w1", "w2", "w3"):
            lin = getattr(experts[0], k)
            scale = lin.scale if lin.packed else None
            setattr(self, k, _Slot(torch.empty(self.n, *lin.weight.shape, dtype=lin.weight.dtype, device="meta"),
                                   None if scale is None else
                                   torch.empty(self.n, *scale.shape, dtype=scale.dtype, device="meta")))


def stack_for_trace(model: DeepseekV4) -> DeepseekV4:
    """Replace every MoE layer's per-expert modules by a StackedExperts (in place; the skeleton only)."""
    for mod in model.modules():
        if isinstance(mod, MoE) and len(mod.experts) and not hasattr(mod, "stacked"):
            mod.stacked = StackedExperts(mod.experts)
            mod.experts = nn.ModuleList()
    return model


def _stored_of(source):
    """name -> the format `source` stores that projection weight in ("fp8", "fp4", "float"; models/stored.py)."""
    if isinstance(source, ModuleSource):
        return {f"{n}.weight": m.stored for n, m in source.model.named_modules() if isinstance(m, Linear)}.get
    return lambda n: stored_format(source.ck.tensors[n].dtype) if n in source.ck.tensors else None


def resolve(source, name: str, want: ir.DataType, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor `name` from `source` as the graph wants it (dtype `want`, `shape`); dequantises packed
    weights when the graph wants floats. Raises ValueError naming the tensor on any mismatch."""
    if name not in source:
        raise ValueError(f"weights: {name} is not in the source")
    t = source.read(name)
    fmt = source.packed(name)
    if want == ir.DataType.UINT8:
        if t.dtype != torch.uint8:
            raise ValueError(f"weights: {name} is {t.dtype} in the source; the graph wants packed uint8")
    elif fmt is not None:
        scale = source.read(name[: -len("weight")] + "scale")
        t = (quant.fp8_block_dequant if fmt == "fp8" else quant.mxfp4_dequant)(t, scale)
    t = t.to(_torch_dtype(want))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"weights: {name} has shape {list(t.shape)} in the source; the graph wants {list(shape)}")
    return t.contiguous()


def _torch_dtype(dt: ir.DataType) -> torch.dtype:
    return {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
            ir.DataType.INT64: torch.int64, ir.DataType.UINT8: torch.uint8, ir.DataType.INT32: torch.int32,
            ir.DataType.BOOL: torch.bool, ir.DataType.DOUBLE: torch.float64}[dt]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes of `t` (bf16 via its int16 view: numpy has no bfloat16)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return np.ascontiguousarray(t.numpy()).tobytes()
