"""ModelArgs: the DeepSeek V4 hyper-parameters, presets, and the official config.json reader (SPEC §1).

Field names follow the reference inference code; `from_hf_config` maps the Hugging Face keys onto them.
Derived values are properties. Every dimension of the model comes from here; only the block sizes of the
checkpoint format (SPEC §1.3) are constants, and they live next to the code that uses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hf_config import check_value

FP8_BLOCK = 128  # FP8 weight tile and activation quantisation block (SPEC §1.3)
FP4_BLOCK = 32  # MXFP4 scale block along K
KV_FP8_BLOCK = 64  # FP8 simulation block of the KV nope dims
INDEX_FP4_BLOCK = 32  # FP4 simulation block in the indexer


SIM_SWITCHES = {"act": "act_quant_sim", "kv": "kv_quant_sim", "index": "index_quant_sim"}


def simulations(config: dict) -> dict[str, bool]:
    """The simulations on in a ModelArgs dict (a manifest's ``config``): each switch, or ``quant_sim`` where it is
    unset (None or absent: manifests written before the switches existed)."""
    qs = bool(config.get("quant_sim", True))
    return {k: qs if config.get(f) is None else bool(config[f]) for k, f in SIM_SWITCHES.items()}


def check_sims(switches: dict) -> dict[str, bool]:
    """`switches` ({"kv_quant_sim": False, ...}) checked: known switch names, bool values. Returns a copy."""
    for k, v in switches.items():
        if k not in SIM_SWITCHES.values():
            raise ValueError(f"quant_sims: unknown switch {k!r}; choose from {', '.join(SIM_SWITCHES.values())}")
        if not isinstance(v, bool):
            raise ValueError(f"quant_sims: {k} must be true or false, got {v!r}")
    return dict(switches)


class ConfigError(ValueError):
    """A config is missing a key or is internally inconsistent. The message names the key."""


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_hash_layers: int
    route_scale: float
    swiglu_limit: float
    window_size: int
    compress_ratios: tuple[int, ...]  # len = n_layers + n_mtp_layers; the MTP entries come last
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    original_seq_len: int
    beta_fast: float
    beta_slow: float
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    n_mtp_layers: int = 1
    score_func: str = "sqrtsoftplus"
    expert_dtype: str = "fp4"  # format of the routed experts in the checkpoint: "fp4" (MXFP4) or "fp8"
    # decode-state capacity: config.json's max_position_embeddings (1,048,576 for the release) unless given;
    # the default only serves ModelArgs built by hand. The state is allocated at it (docs/capacity.md).
    max_seq_len: int = 4096
    quant_sim: bool = True  # the reference's three simulations, all on / all off (each switch below may override)
    act_quant_sim: bool | None = None  # FP8 act rounding in front of FP8/FP4-stored linears; None: as quant_sim
    kv_quant_sim: bool | None = None  # FP8 rounding of the KV nope dims (window and compressed); None: as quant_sim
    index_quant_sim: bool | None = None  # Hadamard + FP4 rounding of indexer queries and keys; None: as quant_sim
    # decode state in the paper's layout where the kv / index simulation is on (FP8 KV codes + E8M0 scales + rope
    # dims, MXFP4 indexer keys; models/kvstore.py); None: on; False: the simulated values as floats (ascend)
    compact_state: bool | None = None
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self):
        from .hf_config import check_value, official

        for f in dataclasses.fields(self):  # types first, under the config.json names: 128.7 is not coerced to 128
            kind, v = str(f.type), getattr(self, f.name)
            if kind.endswith(" | None"):
                if v is None:
                    continue
                kind = kind[: -len(" | None")]
            object.__setattr__(self, f.name, check_value(official(f.name), kind, v))
        self.validate()

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def hc_dim(self) -> int:
        return self.hc_mult * self.dim

    @property
    def hc_mix(self) -> int:  # 4 pre + 4 post + 16 comb logits
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def o_group_dim(self) -> int:  # input width of one wo_a group
        return self.n_heads * self.head_dim // self.o_groups

    # the three simulations (SPEC §7.4), each its own switch or else quant_sim (docs/quant_sim.md)
    @property
    def sim_act(self) -> bool:
        return self.quant_sim if self.act_quant_sim is None else self.act_quant_sim

    @property
    def sim_kv(self) -> bool:
        return self.quant_sim if self.kv_quant_sim is None else self.kv_quant_sim

    @property
    def sim_index(self) -> bool:
        return self.quant_sim if self.index_quant_sim is None else self.index_quant_sim

    @property
    def compact_kv(self) -> bool:  # KV rows stored as FP8 codes (docs/state_layout.md)
        return self.sim_kv and self.compact_state is not False

    @property
    def compact_index(self) -> bool:  # indexer keys stored as MXFP4
        return self.sim_index and self.compact_state is not False

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers and layer < self.n_layers

    def with_(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    # ---- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        from .hf_config import official

        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{official(key)}: {msg}")

        for key in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                    "n_routed_experts", "n_activated_experts", "moe_inter_dim", "window_size", "hc_mult", "max_seq_len"):
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                need(v >= 0, f.name, f"must be >= 0, got {v}")
        need(len(self.compress_ratios) == self.n_layers + self.n_mtp_layers, "compress_ratios",
             f"has {len(self.compress_ratios)} entries, expected n_layers + n_mtp_layers = "
             f"{self.n_layers} + {self.n_mtp_layers}")
        for i, r in enumerate(self.compress_ratios):
            need(r in (0, 4, 128), "compress_ratios", f"entry {i} is {r}; V4 uses 0 (window only), 4 (CSA) or 128 (HCA)")
        for i in range(self.n_layers, self.n_layers + self.n_mtp_layers):
            need(self.compress_ratios[i] == 0, "compress_ratios", f"MTP entry {i} must be 0 (sliding window only)")
        need(self.n_heads % self.o_groups == 0, "o_groups",
             f"num_attention_heads={self.n_heads} is not divisible by o_groups={self.o_groups}")
        need(0 < self.rope_head_dim <= self.head_dim and self.rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {self.rope_head_dim}")
        need(self.n_activated_experts <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.n_activated_experts} > n_routed_experts={self.n_routed_experts}")
        need(self.n_shared_experts == 1, "n_shared_experts", f"V4 has exactly one shared expert, got {self.n_shared_experts}")
        need(self.n_hash_layers <= self.n_layers, "num_hash_layers", f"{self.n_hash_layers} > n_layers={self.n_layers}")
        need(self.score_func == "sqrtsoftplus", "scoring_func", f"V4 uses 'sqrtsoftplus', got {self.score_func!r}")
        need(self.expert_dtype in ("fp4", "fp8"), "expert_dtype", f"must be 'fp4' or 'fp8', got {self.expert_dtype!r}")
        if any(r > 0 for r in self.compress_ratios):
            need(self.index_n_heads > 0 and self.index_head_dim >= self.rope_head_dim, "index_head_dim",
                 f"must be >= qk_rope_head_dim={self.rope_head_dim}, got {self.index_head_dim}")
            need(self.index_topk > 0, "index_topk", "must be > 0")
            need(self.index_head_dim & (self.index_head_dim - 1) == 0, "index_head_dim",
                 f"the indexer's Hadamard rotation needs a power of two, got {self.index_head_dim}")
        need(self.rope_factor >= 1, "rope_scaling.factor", f"must be >= 1, got {self.rope_factor}")
        # The FP8 activation block depends on how each linear is stored, so DeepseekV4 checks it (act_block_problems).
        if self.sim_kv:
            need(self.nope_head_dim % KV_FP8_BLOCK == 0, "head_dim",
                 f"head_dim - qk_rope_head_dim = {self.nope_head_dim} is not a multiple of {KV_FP8_BLOCK} (KV FP8 "
                 "block; kv_quant_sim)")
        if self.sim_index:
            need(self.index_head_dim % INDEX_FP4_BLOCK == 0, "index_head_dim",
                 f"{self.index_head_dim} is not a multiple of {INDEX_FP4_BLOCK} (indexer FP4 block; index_quant_sim)")
        if self.expert_dtype == "fp4":
            need(self.dim % FP4_BLOCK == 0 and self.moe_inter_dim % FP4_BLOCK == 0, "moe_intermediate_size",
                 f"MXFP4 experts need hidden_size and moe_intermediate_size multiples of {FP4_BLOCK}")

    # ---- official config.json -------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | dict, **overrides: Any) -> ModelArgs:
        """Read the official Hugging Face ``config.json`` (a path to the file or its directory, or a dict).

        Unknown keys are ignored; a missing, mistyped or inconsistent key raises ConfigError naming it
        (models/hf_config.py).
        """
        from .hf_config import read

        return read(path_or_dict, overrides)

    def to_hf_config(self) -> dict:
        """The official ``config.json`` keys for these args (used to write synthetic checkpoints)."""
        return {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts,
            "moe_intermediate_size": self.moe_inter_dim,
            "num_hash_layers": self.n_hash_layers,
            "scoring_func": self.score_func,
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "routed_scaling_factor": self.route_scale,
            "swiglu_limit": self.swiglu_limit,
            "sliding_window": self.window_size,
            "compress_ratios": list(self.compress_ratios),
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "rope_scaling": {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
            },
            "max_position_embeddings": self.max_seq_len,  # 1,048,576 for flash / pro, as released
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.norm_eps,
            "num_nextn_predict_layers": self.n_mtp_layers,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "expert_dtype": self.expert_dtype,
            "quantization_config": {
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "scale_fmt": "ue8m0",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            },
        }



def _flash_ratios(n_layers: int) -> tuple[int, ...]:
    return (0, 0) + tuple(4 if i % 2 == 0 else 128 for i in range(2, n_layers)) + (0,)


def _pro_ratios(n_layers: int) -> tuple[int, ...]:
    return (128, 128) + tuple(4 if i % 2 == 0 else 128 for i in range(2, n_layers)) + (0,)


_COMMON = dict(
    max_seq_len=1048576,  # max_position_embeddings of both releases (SPEC §1.1)
    head_dim=512, rope_head_dim=64, n_shared_experts=1, n_activated_experts=6, n_hash_layers=3, swiglu_limit=10.0,
    window_size=128, index_n_heads=64, index_head_dim=128, rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_factor=16.0, original_seq_len=65536, beta_fast=32, beta_slow=1, vocab_size=129280,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The released V4-Flash (SPEC §1.1): 284B total, 13B active.
    "flash": dict(_COMMON, dim=4096, n_layers=43, n_heads=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
                  n_routed_experts=256, moe_inter_dim=2048, route_scale=1.5, index_topk=512,
                  compress_ratios=_flash_ratios(43)),
    # The released V4-Pro: 1.6T total (with MTP), 49B active.
    "pro": dict(_COMMON, dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
                n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5, index_topk=1024,
                compress_ratios=_pro_ratios(61)),
    # CI: every layer kind (SWA, CSA, HCA), hash and learned routing, tiny dims. Window 128 as released, so a
    # 400-token prefill crosses the window, many ratio-4 blocks and three ratio-128 blocks. YaRN is active
    # (original length 256). index_topk 16 < the ~100 visible CSA entries at T=400, so selection matters.
    "tiny": dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, head_dim=128, rope_head_dim=64, q_lora_rank=128,
                 o_groups=2, o_lora_rank=64, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                 moe_inter_dim=128, n_hash_layers=2, route_scale=1.5, swiglu_limit=10.0, window_size=128,
                 compress_ratios=(0, 4, 128, 4, 0), index_n_heads=8, index_head_dim=128, index_topk=16,
                 rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=256,
                 beta_fast=32, beta_slow=1, max_seq_len=1024),
    # Benchmarks: same layer schedule as Flash's first layers, small enough for a 2-core CPU.
    "small": dict(vocab_size=8192, dim=512, n_layers=6, n_heads=8, head_dim=256, rope_head_dim=64, q_lora_rank=256,
                  o_groups=4, o_lora_rank=128, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
                  moe_inter_dim=256, n_hash_layers=2, route_scale=1.5, swiglu_limit=10.0, window_size=128,
                  compress_ratios=(0, 0, 4, 128, 4, 128, 0), index_n_heads=16, index_head_dim=128, index_topk=64,
                  rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=4096,
                  beta_fast=32, beta_slow=1, max_seq_len=8192),
}


def preset(name: str, **overrides: Any) -> ModelArgs:
    """ModelArgs for a named preset (``flash``, ``pro``, ``tiny``, ``small``), with optional overrides.

    ``n_layers`` may be overridden alone: the layer schedule is cut to the first N layers (+ the MTP entries).
    """
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    if "n_layers" in overrides and "compress_ratios" not in overrides:
        n = check_value("num_hidden_layers", "int", overrides["n_layers"])
        n_mtp = int(overrides.get("n_mtp_layers", kw.get("n_mtp_layers", 1)))
        main = kw["compress_ratios"][: len(kw["compress_ratios"]) - 1][:n]
        if len(main) < n:
            raise ConfigError(f"n_layers: preset {name!r} has only {len(main)} layers")
        kw["compress_ratios"] = tuple(main) + (0,) * n_mtp
        kw["n_hash_layers"] = min(kw.get("n_hash_layers", 0), n)
    kw.update(overrides)
    return ModelArgs(**kw)
