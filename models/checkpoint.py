"""The official checkpoint format (SPEC §7): the expected tensor table, validation, loading into DeepseekV4.

A checkpoint directory holds ``config.json`` (official keys), ``model.safetensors.index.json`` and the shards;
the safetensors layer (lazy reading, header parsing, streaming writes) is models/checkpoint_io.py, the synthetic
writer models/checkpoint_write.py. Validation reads headers only; loading reads one tensor at a time.

Formats per tensor (SPEC §7.1): ``bf16`` / ``f32`` / ``i64`` plain; ``fp8`` = F8_E4M3 [out, in] + F8_E8M0
``.scale`` per 128x128 tile; ``fp4`` = MXFP4 as I8 [out, in/2] + F8_E8M0 ``.scale`` [out, in/32]. A plain
float tensor is accepted wherever the official format is FP8/FP4 ("Base" or dequantised checkpoints), and
routed experts may also be FP8 (``convert.py --expert-dtype fp8``). Decisions: docs/checkpoint.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import quant
from .checkpoint_io import (
    CONFIG,
    DTYPES,
    FLOATS,
    INDEX,
    Checkpoint,
    CheckpointError,
    Problem,
    check_finite,
    dtype_totals,
    progress_bar,
)
from .config import FP4_BLOCK, FP8_BLOCK, ConfigError, ModelArgs
from .stored import check_act_blocks, set_stored, stored_format

__all__ = ["Checkpoint", "CheckpointError", "Problem", "Report", "TensorSpec", "checkpoint_totals", "expected_tensors",
           "load_model", "official_totals", "round_like_checkpoint_", "validate"]

OFFICIAL_DTYPE = {"bf16": "BF16", "f32": "F32", "i64": "I64", "fp8": "F8_E4M3", "fp4": "I8"}

# ---------------------------------------------------------------------------------------------------------
# The expected tensor table
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One official tensor: its name, logical shape ([out, in] for projections) and official format."""

    name: str
    shape: tuple[int, ...]
    fmt: str  # "bf16", "f32", "i64", "fp8" or "fp4"

    @property
    def official_dtype(self) -> str:
        return OFFICIAL_DTYPE[self.fmt]

    @property
    def scale_name(self) -> str | None:
        return self.name[: -len("weight")] + "scale" if self.fmt in ("fp8", "fp4") else None

    def layout(self, dtype: str) -> tuple[tuple[int, ...], tuple[int, ...] | None] | None:
        """(stored shape, scale shape or None) when `dtype` is accepted for this tensor, else None."""
        if self.fmt == "f32":
            return (self.shape, None) if dtype == "F32" else None
        if self.fmt == "i64":
            return (self.shape, None) if dtype in ("I64", "I32") else None
        if dtype in FLOATS:
            return self.shape, None
        if self.fmt in ("fp8", "fp4") and dtype == "F8_E4M3":
            o, i = self.shape
            return self.shape, (-(-o // FP8_BLOCK), -(-i // FP8_BLOCK))
        if self.fmt == "fp4" and dtype == "I8":
            o, i = self.shape
            return (o, i // 2), (o, i // FP4_BLOCK)
        return None


def expected_tensors(args: ModelArgs) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for `args` (SPEC §7.1, §7.6), in checkpoint order."""
    out: dict[str, TensorSpec] = {}
    D, hcd, mix, I = args.dim, args.hc_dim, args.hc_mix, args.moe_inter_dim

    def add(name: str, shape: tuple[int, ...], fmt: str) -> None:
        out[name] = TensorSpec(name, tuple(int(s) for s in shape), fmt)

    def block(p: str, layer: int) -> None:
        r, hd = args.ratio(layer), args.head_dim
        for sub in ("attn", "ffn"):
            add(f"{p}hc_{sub}_fn", (mix, hcd), "f32")
            add(f"{p}hc_{sub}_base", (mix,), "f32")
            add(f"{p}hc_{sub}_scale", (3,), "f32")
        add(f"{p}attn_norm.weight", (D,), "bf16")
        add(f"{p}ffn_norm.weight", (D,), "bf16")
        a = f"{p}attn."
        add(a + "attn_sink", (args.n_heads,), "f32")
        add(a + "wq_a.weight", (args.q_lora_rank, D), "fp8")
        add(a + "q_norm.weight", (args.q_lora_rank,), "bf16")
        add(a + "wq_b.weight", (args.n_heads * hd, args.q_lora_rank), "fp8")
        add(a + "wkv.weight", (hd, D), "fp8")
        add(a + "kv_norm.weight", (hd,), "bf16")
        add(a + "wo_a.weight", (args.o_groups * args.o_lora_rank, args.o_group_dim), "fp8")
        add(a + "wo_b.weight", (D, args.o_groups * args.o_lora_rank), "fp8")
        comps = [(a + "compressor.", r, hd)] if r else []
        if r == 4:
            di = args.index_head_dim
            add(a + "indexer.wq_b.weight", (args.index_n_heads * di, args.q_lora_rank), "fp8")
            add(a + "indexer.weights_proj.weight", (args.index_n_heads, D), "bf16")
            comps.append((a + "indexer.compressor.", 4, di))
        for c, m, d in comps:
            width = (2 if m == 4 else 1) * d
            add(c + "wkv.weight", (width, D), "bf16")
            add(c + "wgate.weight", (width, D), "bf16")
            add(c + "norm.weight", (d,), "bf16")
            add(c + "ape", (m, width), "f32")
        f = f"{p}ffn."
        add(f + "gate.weight", (args.n_routed_experts, D), "bf16")
        if args.is_hash_layer(layer):
            add(f + "gate.tid2eid", (args.vocab_size, args.n_activated_experts), "i64")
        else:
            add(f + "gate.bias", (args.n_routed_experts,), "f32")
        for e in range(args.n_routed_experts):
            for w, shape in (("w1", (I, D)), ("w2", (D, I)), ("w3", (I, D))):
                add(f"{f}experts.{e}.{w}.weight", shape, args.expert_dtype)
        for w, shape in (("w1", (I, D)), ("w2", (D, I)), ("w3", (I, D))):
            add(f"{f}shared_experts.{w}.weight", shape, "fp8")

    def hc_head(p: str) -> None:
        add(f"{p}hc_head_fn", (args.hc_mult, hcd), "f32")
        add(f"{p}hc_head_base", (args.hc_mult,), "f32")
        add(f"{p}hc_head_scale", (1,), "f32")

    add("embed.weight", (args.vocab_size, D), "bf16")
    for i in range(args.n_layers):
        block(f"layers.{i}.", i)
    add("norm.weight", (D,), "bf16")
    add("head.weight", (args.vocab_size, D), "bf16")
    hc_head("")
    for j in range(args.n_mtp_layers):
        p = f"mtp.{j}."
        block(p, args.n_layers + j)
        add(p + "e_proj.weight", (D, D), "fp8")
        add(p + "h_proj.weight", (D, D), "fp8")
        for n in ("enorm", "hnorm", "norm"):
            add(f"{p}{n}.weight", (D,), "bf16")
        hc_head(p)
    return out


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Result of `validate`: the problems, the ModelArgs (expert format detected from the tensors) and totals."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    args: ModelArgs | None = None
    totals: dict[str, dict[str, int]] = field(default_factory=dict)  # dtype -> {"tensors", "bytes"}

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(path: str | Path | Checkpoint, check_values: bool = False, progress: bool | None = None,
             **overrides) -> Report:
    """Check a checkpoint against the table derived from its config.json; report every problem at once.

    check_values: also read every floating-point tensor and report NaN/Inf (NaN codes in FP8 and E8M0).
    """
    ck = path if isinstance(path, Checkpoint) else Checkpoint(path)
    rep = Report(ck.path, list(ck.problems))
    rep.totals = dtype_totals(ck)
    if ck.config is None:
        return rep
    try:
        args = ModelArgs.from_hf_config(ck.config, **overrides)
    except (ConfigError, TypeError, ValueError) as e:
        rep.problems.append(Problem("config", "", CONFIG, str(e)))
        return rep
    specs = expected_tensors(args)
    scales = {s.scale_name: s for s in specs.values() if s.scale_name}
    P = rep.problems.append
    where = {n: t.file for n, t in ck.tensors.items()}
    for name in specs:
        if name not in ck.tensors and name not in ck.accounted:
            P(Problem("missing", name, INDEX if (ck.path / INDEX).exists() else "*.safetensors", "not in the checkpoint"))
    for name in ck.tensors:
        if name not in specs and name not in scales:
            P(Problem("unexpected", name, where[name], "not a tensor of this model (config.json)"))
    expert_fmt: dict[str, list[str]] = {}
    for name, spec in specs.items():
        t = ck.tensors.get(name)
        if t is None:
            continue
        lay = spec.layout(t.dtype)
        if lay is None:
            P(Problem("dtype", name, t.file, f"stored as {t.dtype}; expected {spec.official_dtype}"
                      + (" or a float dtype" if spec.fmt in ("bf16", "fp8", "fp4") else "")))
            continue
        shape, sshape = lay
        if t.shape != shape:
            P(Problem("shape", name, t.file, f"shape {list(t.shape)}, expected {list(shape)} for {t.dtype}"))
            continue
        if ".ffn.experts." in name:
            expert_fmt.setdefault({"I8": "fp4", "F8_E4M3": "fp8"}.get(t.dtype, "float"), []).append(name)
        sname = spec.scale_name
        s = ck.tensors.get(sname) if sname else None
        if sshape is None:
            if s is not None:
                P(Problem("unexpected", sname, s.file, f"scale for a {t.dtype} weight, which has none"))
        elif s is None:
            if sname not in ck.accounted:
                P(Problem("scale", sname, t.file, f"missing; {name} is {t.dtype} and needs F8_E8M0 {list(sshape)}"))
        elif s.dtype != "F8_E8M0":
            P(Problem("scale", sname, s.file, f"stored as {s.dtype}; expected F8_E8M0"))
        elif s.shape != sshape:
            P(Problem("scale", sname, s.file, f"shape {list(s.shape)}, expected {list(sshape)} for {t.dtype} "
                      f"{name} {list(t.shape)}"))
    packed = [f for f in ("fp4", "fp8") if f in expert_fmt]
    if packed and "float" in expert_fmt:  # one MoE kernel, one activation simulation (stored.py)
        n0 = expert_fmt["float"][0]
        P(Problem("experts", n0, where[n0], f"{len(expert_fmt['float'])} routed expert weight(s) are stored as floats, "
                  f"{len(expert_fmt[packed[0]])} as {packed[0]}; all routed experts must share one format"))
    if len(packed) > 1:  # one MoE kernel per model: the routed experts share one format
        odd = min(packed, key=lambda f: len(expert_fmt[f]))
        n0 = expert_fmt[odd][0]
        P(Problem("experts", n0, where[n0], f"{len(expert_fmt[odd])} routed expert weight(s) are {odd}, the others "
                  f"{max(packed, key=lambda f: len(expert_fmt[f]))}; all routed experts must share one format"))
    elif packed:
        declared = ck.config.get("expert_dtype")
        if declared and declared != packed[0]:
            n0 = expert_fmt[packed[0]][0]
            P(Problem("experts", n0, where[n0], f"stored as {packed[0]} but {CONFIG} says expert_dtype={declared}"))
        else:
            args = args.with_(expert_dtype=packed[0])
    if check_values:
        for p in check_finite(ck, progress):
            P(p)
    rep.args = args
    return rep


def checkpoint_totals(path: str | Path) -> dict[str, dict[str, int]]:
    """Tensors and bytes per stored dtype of a checkpoint directory (headers only; for ``dsv4 info DIR``)."""
    return dtype_totals(Checkpoint(path))


def official_totals(args: ModelArgs) -> dict[str, dict[str, int]]:
    """Tensors and bytes per dtype of the official format for `args` (the release, or ``checkpoint make``).

    Flash: 69,187 tensors, 148.65 GiB; Pro: 145,116 tensors, 805.32 GiB (SPEC §0 [CKPT] listings).
    """
    tot: dict[str, dict[str, int]] = {}
    for spec in expected_tensors(args).values():
        shape, sshape = spec.layout(spec.official_dtype)
        for dtype, shp in ((spec.official_dtype, shape), ("F8_E8M0", sshape)):
            if shp is not None:
                d = tot.setdefault(dtype, {"tensors": 0, "bytes": 0})
                d["tensors"] += 1
                d["bytes"] += DTYPES[dtype][0] * math.prod(shp)
    return dict(sorted(tot.items()))


# ---------------------------------------------------------------------------------------------------------
# Loading into DeepseekV4
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device (buffers stay real, e.g. RoPE tables).

    Lets a 2-layer Flash (26 GB of fp32 expert weights if materialised) be constructed in a few MB; the
    loader then swaps in the stored tensors.
    """
    orig = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False,
               check_values: bool = False, progress: bool | None = None, **overrides):
    """A DeepseekV4 from a checkpoint directory; raises CheckpointError listing every problem.

    keep_quantized: FP8/FP4 weights stay packed (uint8 bytes + E8M0 scales, dequantised on the fly by the
    dsv4 kernels); otherwise they are dequantised to `dtype`. Plain-float stored weights load as floats.
    overrides: ModelArgs fields that do not change shapes (max_seq_len, quant_sim, ...).
    """
    from .model import DeepseekV4, Linear

    ck = Checkpoint(path)
    rep = validate(ck, check_values=check_values, progress=progress, **overrides)
    if not rep.ok:
        raise CheckpointError(ck.path, rep.problems)
    args = rep.args
    with parameters_on_meta():
        model = DeepseekV4(args, dtype)
    set_stored(model, lambda n: stored_format(ck.tensors[n].dtype) if n in ck.tensors else None)
    check_act_blocks(model)  # before reading any tensor
    modules = dict(model.named_modules())
    specs = expected_tensors(args)
    order = sorted(specs.values(), key=lambda s: ck.tensors[s.name].file)  # shard by shard
    total = sum(ck.tensors[s.name].nbytes for s in specs.values())
    with torch.no_grad(), ck, progress_bar(progress, "loading", total) as advance:
        for spec in order:
            t = ck.tensors[spec.name]
            mod_name, _, attr = spec.name.rpartition(".")
            mod = modules[mod_name]
            value = ck.read(spec.name)
            if spec.scale_name and t.dtype not in FLOATS:
                scale = ck.read(spec.scale_name)
                if not isinstance(mod, Linear) or mod.fmt != ("fp8" if t.dtype == "F8_E4M3" else "fp4"):
                    raise CheckpointError(ck.path, [Problem("dtype", spec.name, t.file, f"{t.dtype} does not "
                                                            "match the model's format for this projection")])
                if keep_quantized:
                    mod.set_packed(value, scale)
                    advance(t.nbytes)
                    continue
                deq = quant.fp8_block_dequant if t.dtype == "F8_E4M3" else quant.mxfp4_dequant
                value = deq(value.view(torch.uint8), scale.view(torch.uint8))
            old = getattr(mod, attr)
            value = value.to(old.dtype)
            if attr in mod._buffers:
                mod._buffers[attr] = value
            else:
                setattr(mod, attr, nn.Parameter(value, requires_grad=False))
            advance(t.nbytes)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # the table and the model disagree: a bug, not a user error
        raise RuntimeError(f"load_model: parameters not in the checkpoint table: {left[:5]}")
    return model.eval()


@torch.no_grad()
def round_like_checkpoint_(model: nn.Module) -> nn.Module:
    """Round a float model's tensors exactly as the checkpoint writer stores them (BF16, FP8 tiles, MXFP4).

    ``round_like_checkpoint_(init_random_(DeepseekV4(args), seed))`` equals the model loaded from
    ``write_synthetic(args, dir, seed)``, dequantised or packed.
    """
    specs = expected_tensors(model.args)
    for name, t in model.named_official_tensors():
        fmt = specs[name].fmt
        if fmt == "bf16":
            t.copy_(t.to(torch.bfloat16))
        elif fmt == "fp8":
            t.copy_(quant.fp8_block_dequant(*quant.fp8_block_quantize(up32(t))))
        elif fmt == "fp4":
            t.copy_(quant.mxfp4_dequant(*quant.mxfp4_quantize(up32(t))))
    return model


def up32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)

