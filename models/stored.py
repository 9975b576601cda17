"""How each projection's weight is stored, and what that decides: the FP8 activation simulation (SPEC §7.4).

The reference rounds a linear's input to FP8 (per 128 channels, power-of-two scales) only when the linear's weight
is stored FP8 or FP4; a BF16-stored weight (a dequantised conversion of the release, a "Base" checkpoint) runs a
plain BF16 GEMM. So the activation simulation is decided per linear by its stored format, not by its role:
``Linear.stored`` holds that format ("fp8", "fp4", or "float"), the official one until a loader says otherwise.
The KV and indexer simulations do not depend on storage. docs/quant_sim.md.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .config import FP8_BLOCK, ConfigError

STORED = {"F8_E4M3": "fp8", "I8": "fp4"}  # safetensors dtype -> stored format; every float dtype is "float"


def stored_format(dtype: str) -> str:
    """The stored format of a projection weight from its safetensors dtype."""
    return STORED.get(dtype, "float")


def set_stored(model: nn.Module, fmt_of: Callable[[str], str | None]) -> None:
    """Mark every FP8/FP4-format projection of `model` with the format `fmt_of(<name>.weight)` (None: unchanged)."""
    from .model import Linear

    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.fmt in ("fp8", "fp4"):
            f = fmt_of(f"{name}.weight")
            if f is not None:
                mod.stored = f


def _width_keys(args) -> dict[int, str]:
    out: dict[int, str] = {}
    for key, width in (("hidden_size", args.dim), ("q_lora_rank", args.q_lora_rank),
                       ("moe_intermediate_size", args.moe_inter_dim),
                       ("o_groups * o_lora_rank", args.o_groups * args.o_lora_rank)):
        out.setdefault(width, key)
    return out


def act_block_problems(model: nn.Module) -> list[str]:
    """One message per input width that the FP8 activation simulation cannot block by 128: naming the config key,
    the first linear concerned and how many more there are."""
    from .model import Linear

    keys = _width_keys(model.args)
    bad: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.act_quant and mod.in_features % FP8_BLOCK:
            bad.setdefault(mod.in_features, []).append(f"{name} (stored {mod.stored})")
    return [f"{keys.get(w, 'in_features')}: {w} is not a multiple of {FP8_BLOCK}, the FP8 activation block in front of "
            f"{names[0]}" + (f" and {len(names) - 1} more linears" if len(names) > 1 else "")
            + "; the reference rounds activations only in front of FP8/FP4-stored linears: store them in BF16, or "
            "set act_quant_sim=False" for w, names in bad.items()]


def check_act_blocks(model: nn.Module) -> None:
    """Raise ConfigError listing every act_block_problems message."""
    problems = act_block_problems(model)
    if problems:
        raise ConfigError("\n".join(problems))
