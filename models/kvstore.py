"""How cached KV rows and indexer keys are stored in the decode state (docs/state_layout.md, SPEC §5.1).

Two layouts of the same values:

* plain (the reference's): one float tensor per cache in the model dtype, holding the simulated values;
* compact (the paper's, where the kv / index simulation is on): the codes the simulation rounded to.
  - KV rows [.., head_dim]: ``fp8`` uint8 e4m3fn codes of the nope dims, ``scale`` uint8 E8M0 codes (one per 64
    nope dims), ``rope`` the rope dims in the model dtype (bf16/fp16: 2 bytes each; fp32 artifacts keep fp32);
  - indexer keys [.., index_head_dim]: ``fp4`` uint8 MXFP4 bytes (e2m1 codes, element 2j in the low nibble),
    ``scale`` uint8 E8M0 codes (one per 32).

The simulation rounds every stored value onto exactly these grids, so the compact layout is lossless:
``decode(encode(x))`` is the simulated value bit for bit (negative zero included), tests/test_state_compact.py.
Codes are uint8 (not float8e4m3fn tensors): ai.onnx Concat / GatherElements / Where take no float8 types, and
opset 23 has no BitCast. Encoding is therefore arithmetic on the rounded values and decoding is a Gather from a
256-entry table; both run in every back end as plain ops. A store's parts are state entries named
``{kind}_{part}`` (``kv_fp8``, ``kv_scale``, ``kv_rope``, ``index_fp4``, ``index_scale``); the plain layout keeps
the single entry ``{kind}``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import quant
from .config import INDEX_FP4_BLOCK, KV_FP8_BLOCK, ModelArgs

# ---- the 256-entry tables (decode) --------------------------------------------------------------------------


def fp8_table() -> Tensor:
    """e4m3fn code -> fp32 value for all 256 codes (127 and 255 are NaN, 128 is -0)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def e8m0_table() -> Tensor:
    """E8M0 code -> 2^(code-127) in fp32 (code 0 is the subnormal 2^-127; 255 is NaN)."""
    return quant.e8m0_decode(torch.arange(256, dtype=torch.int32).to(torch.uint8))


def e2m1_pair_table() -> Tensor:
    """MXFP4 byte -> its two values [256, 2]: (low nibble, high nibble) = (element 2j, element 2j+1)."""
    b = torch.arange(256)
    lut = quant.e2m1_lut()
    return torch.stack([lut[b & 15], lut[b >> 4]], -1)


# ---- codes of values already on a grid (encode) -------------------------------------------------------------


def negative(v: Tensor) -> Tensor:
    """The sign bit: true for negative values and -0 (1/-0 = -inf), false for +0 and positives."""
    return torch.reciprocal(v) < 0


def floor_pow2(a: Tensor) -> Tensor:
    """The largest power of two <= a, for normal positive a, exact (log2 only proposes; comparisons decide)."""
    p = torch.exp2(torch.floor(torch.log2(a)))
    p = torch.where(p > a, p * 0.5, p)
    return torch.where(p * 2 <= a, p * 2, p)


def fp8_codes(v: Tensor) -> Tensor:
    """e4m3fn values (|v| <= 448, in fp32/fp64) -> uint8 codes. Magnitude code = 8*(e+6) + |v| / 2^(e-3) with
    e = max(floor(log2 |v|), -6): the biased exponent and mantissa of a normal value, |v| * 2^9 of a subnormal."""
    a = v.abs()
    p = floor_pow2(torch.clamp_min(a, 2.0**-6))
    e6 = torch.round(torch.log2(p)) + 6  # e + 6 >= 0, exact: p is a power of two
    mag = e6 * 8 + a * (8.0 / p)
    return (mag + negative(v).to(mag.dtype) * 128).to(torch.uint8)


def e2m1_codes(v: Tensor) -> Tensor:
    """e2m1 values {0, .5, 1, 1.5, 2, 3, 4, 6} (signed) -> uint8 codes 0..15 (SPEC §7.3)."""
    a = v.abs()
    mag = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a * 0.5 + 4))
    return (mag + negative(v).to(mag.dtype) * 8).to(torch.uint8)


def e8m0_codes(s: Tensor) -> Tensor:
    """Power-of-two scales (2^-127 .. 2^127) -> uint8 E8M0 codes."""
    return (torch.round(torch.log2(s)) + quant.E8M0_BIAS).to(torch.uint8)


# ---- the stores ---------------------------------------------------------------------------------------------
class Plain(nn.Module):
    """One float tensor of simulated values (the reference's layout). sim: what rounds the written values, None,
    "kv" (FP8 on the first `nope` dims, per 64) or "index" (FP4 per 32)."""

    parts: tuple[str, ...] = ("",)

    def __init__(self, width: int, sim: str | None = None, nope: int = 0):
        super().__init__()
        self.width, self.sim, self.nope = width, sim, nope

    def encode(self, x: Tensor, dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor]:
        if self.sim == "kv":
            x = torch.cat([quant.fp8_act_qdq(x[..., :self.nope], KV_FP8_BLOCK), x[..., self.nope:]], -1)
        elif self.sim == "index":
            x = quant.fp4_act_qdq(x, INDEX_FP4_BLOCK)
        v = x.to(dtype)
        return {"": v}, v

    def decode(self, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return parts[""]


class Fp8Rows(nn.Module):
    """KV rows: FP8 e4m3 nope dims with one E8M0 scale per 64, rope dims as they are (the model dtype)."""

    parts = ("fp8", "scale", "rope")

    def __init__(self, nope: int, rope: int):
        super().__init__()
        self.nope, self.rope = nope, rope
        self.register_buffer("fp8_lut", fp8_table(), persistent=False)
        self.register_buffer("e8m0_lut", e8m0_table(), persistent=False)

    def encode(self, x: Tensor, dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor]:
        """x [..., nope + rope] (model dtype) -> (parts, the simulated values = fp8_act_qdq on the nope dims)."""
        rope = x[..., self.nope:].to(dtype)
        v, s = quant.fp8_blocks(x[..., :self.nope], KV_FP8_BLOCK)  # [..., nb, 64], [..., nb, 1]
        vals = torch.cat([(v * s).flatten(-2).to(dtype), rope], -1)
        return {"fp8": fp8_codes(v).flatten(-2), "scale": e8m0_codes(s).squeeze(-1), "rope": rope}, vals

    def decode(self, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        v = self.fp8_lut[parts["fp8"].long()].unflatten(-1, (self.nope // KV_FP8_BLOCK, KV_FP8_BLOCK))
        s = self.e8m0_lut[parts["scale"].long()].unsqueeze(-1)
        return torch.cat([(v * s).flatten(-2).to(dtype), parts["rope"].to(dtype)], -1)


class Mxfp4Keys(nn.Module):
    """Indexer keys: MXFP4 (e2m1 codes two per byte, one E8M0 scale per 32); written already Hadamard-rotated."""

    parts = ("fp4", "scale")

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.register_buffer("e2m1_lut", e2m1_pair_table(), persistent=False)
        self.register_buffer("e8m0_lut", e8m0_table(), persistent=False)

    def encode(self, x: Tensor, dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor]:
        """x [..., width] (rotated, fp32) -> (parts, the simulated values = fp4_act_qdq(x) in `dtype`)."""
        v, s = quant.fp4_blocks(x, INDEX_FP4_BLOCK)
        c = e2m1_codes(v).flatten(-2).unflatten(-1, (self.width // 2, 2)).to(torch.int32)
        packed = (c[..., 0] + c[..., 1] * 16).to(torch.uint8)
        return {"fp4": packed, "scale": e8m0_codes(s).squeeze(-1)}, (v * s).flatten(-2).to(dtype)

    def decode(self, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        v = self.e2m1_lut[parts["fp4"].long()].flatten(-2).unflatten(-1, (self.width // INDEX_FP4_BLOCK,
                                                                          INDEX_FP4_BLOCK))
        s = self.e8m0_lut[parts["scale"].long()].unsqueeze(-1)
        return (v * s).flatten(-2).to(dtype)


def kv_layout(args: ModelArgs, dtype: torch.dtype) -> list[tuple[str, int, torch.dtype]]:
    """(part, width, dtype) of a KV row's state entries (window ring and compressed entries)."""
    if args.compact_kv:
        nope = args.nope_head_dim
        return [("fp8", nope, torch.uint8), ("scale", nope // KV_FP8_BLOCK, torch.uint8),
                ("rope", args.rope_head_dim, dtype)]
    return [("", args.head_dim, dtype)]


def index_layout(args: ModelArgs, dtype: torch.dtype) -> list[tuple[str, int, torch.dtype]]:
    """(part, width, dtype) of an indexer key's state entries."""
    d = args.index_head_dim
    if args.compact_index:
        return [("fp4", d // 2, torch.uint8), ("scale", d // INDEX_FP4_BLOCK, torch.uint8)]
    return [("", d, dtype)]


def kv_store(args: ModelArgs) -> nn.Module:
    """The store of KV rows (window ring and compressed entries) for `args`."""
    if args.compact_kv:
        return Fp8Rows(args.nope_head_dim, args.rope_head_dim)
    return Plain(args.head_dim, "kv" if args.sim_kv else None, args.nope_head_dim)


def index_store(args: ModelArgs) -> nn.Module:
    """The store of indexer keys: written after the Hadamard rotation when the index simulation is on."""
    if args.compact_index:
        return Mxfp4Keys(args.index_head_dim)
    return Plain(args.index_head_dim, "index" if args.sim_index else None)


def entry_name(kind: str, part: str) -> str:
    return kind if part == "" else f"{kind}_{part}"


def read(st: dict[str, Tensor], kind: str, store: nn.Module) -> dict[str, Tensor]:
    """A layer's state by kind -> the parts of `kind` in `store`'s layout. Names the missing entry."""
    names = {p: entry_name(kind, p) for p in store.parts}
    missing = [n for n in names.values() if n not in st]
    if missing:
        raise KeyError(f"decode state: no {', '.join(missing)} for {type(store).__name__} ({kind!r}); the state has "
                       f"{sorted(st)} (a state of another layout: models/kvstore.py)")
    return {p: st[n] for p, n in names.items()}


def named(kind: str, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    return {entry_name(kind, p): t for p, t in parts.items()}


def gather_rows(parts: dict[str, Tensor], new: dict[str, Tensor], src: Tensor) -> dict[str, Tensor]:
    """Per part: row r of the result = row src[b, r] of concat([old rows, new rows]) (src [B, R] int64)."""
    B, R = src.shape
    return {p: torch.gather(torch.cat([t, new[p]], 1), 1, src.unsqueeze(-1).expand(B, R, t.shape[-1]))
            for p, t in parts.items()}
