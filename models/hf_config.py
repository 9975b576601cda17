"""The official ``config.json``: its key names, the types of its values, and the reader that maps it onto ModelArgs.

Every message names the key as ``config.json`` spells it (``hidden_size``, ``rope_scaling.factor``), because that
is the file a user edits. Values are type-checked, never coerced: ``hidden_size: 128.7`` is an error, not 128.
Keys that every released V4 config carries (SPEC §1.1) are required; only keys that the releases do not all carry
(``expert_dtype``) have a default. docs/usability.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# ModelArgs field -> its config.json key (fields absent here have no config.json key and keep their own name)
OFFICIAL: dict[str, str] = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "head_dim": "head_dim", "rope_head_dim": "qk_rope_head_dim",
    "q_lora_rank": "q_lora_rank", "o_groups": "o_groups", "o_lora_rank": "o_lora_rank",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok", "moe_inter_dim": "moe_intermediate_size",
    "n_hash_layers": "num_hash_layers", "route_scale": "routed_scaling_factor", "swiglu_limit": "swiglu_limit",
    "window_size": "sliding_window", "compress_ratios": "compress_ratios", "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim", "index_topk": "index_topk", "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta", "rope_factor": "rope_scaling.factor",
    "original_seq_len": "rope_scaling.original_max_position_embeddings", "beta_fast": "rope_scaling.beta_fast",
    "beta_slow": "rope_scaling.beta_slow", "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps", "norm_eps": "rms_norm_eps", "n_mtp_layers": "num_nextn_predict_layers",
    "score_func": "scoring_func", "expert_dtype": "expert_dtype", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id", "max_seq_len": "max_position_embeddings",  # capacity: the config's unless given
}


def official(field: str) -> str:
    return OFFICIAL.get(field, field)


def _show(v: Any) -> str:
    kind = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", float: "a float",
            type(None): "null"}.get(type(v), type(v).__name__)
    text = json.dumps(v) if isinstance(v, (str, list, dict, bool, type(None))) else repr(v)
    return f"{text} ({kind})"


def check_value(key: str, kind: str, v: Any) -> Any:
    """`v` checked against `kind` ("int", "float", "bool", "str", "tuple[int, ...]"); returns it normalised (ints of a
    float key as float, a list of ints as a tuple). Raises ConfigError naming `key`."""
    from .config import ConfigError

    def bad(want: str) -> ConfigError:
        return ConfigError(f"{key}: expected {want}, got {_show(v)}")

    if kind == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad("an integer")
        return v
    if kind == "float":
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise bad("a number")
        if not math.isfinite(v):
            raise bad("a finite number")
        return float(v)
    if kind == "bool":
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if kind == "str":
        if not isinstance(v, str):
            raise bad("a string")
        return v
    if kind.startswith("tuple[int"):
        if not isinstance(v, (list, tuple)):
            raise bad("a list of integers")
        for i, r in enumerate(v):
            if not isinstance(r, int) or isinstance(r, bool):
                raise ConfigError(f"{key}: entry {i} must be an integer, got {_show(r)}")
        return tuple(v)
    raise AssertionError(f"{key}: no check for type {kind!r}")


def read(path_or_dict: str | Path | dict, overrides: dict[str, Any]):
    """ModelArgs from the official ``config.json`` (a path to the file or its directory, or a dict)."""
    from .config import ConfigError, ModelArgs

    if isinstance(path_or_dict, dict):
        cfg, where = path_or_dict, "config.json"
    else:
        p = Path(path_or_dict)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"config.json: no such file {p}")
        try:
            cfg = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config.json: {p} is not valid JSON ({e})") from e
        where = str(p)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object of config keys, got {_show(cfg)}")

    def get(key: str, default: Any = ConfigError) -> Any:
        if key in cfg:
            return cfg[key]
        if default is ConfigError:
            raise ConfigError(f"{key}: missing from {where} (every released V4 config.json carries it)")
        return default

    rope = get("rope_scaling")
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_scaling: expected an object with type 'yarn', got {_show(rope)}")
    if rope.get("type", rope.get("rope_type")) != "yarn":
        raise ConfigError(f"rope_scaling.type: only 'yarn' is used by V4, got {rope.get('type', rope.get('rope_type'))!r}")
    if check_value("num_key_value_heads", "int", get("num_key_value_heads")) != 1:
        raise ConfigError(f"num_key_value_heads: V4 has one shared KV head, got {cfg['num_key_value_heads']}")
    if check_value("tie_word_embeddings", "bool", get("tie_word_embeddings")):
        raise ConfigError("tie_word_embeddings: V4's output head is untied, got true")
    kw: dict[str, Any] = {}
    for field, key in OFFICIAL.items():
        if key.startswith("rope_scaling."):
            sub = key.split(".", 1)[1]
            if sub not in rope:
                raise ConfigError(f"{key}: missing from {where} (every released V4 config.json carries it)")
            kw[field] = rope[sub]
        elif key == "expert_dtype":
            kw[field] = cfg.get(key) or "fp4"  # absent in the April-2026 snapshots (SPEC §1.1)
        else:
            kw[field] = get(key)
    kw.update(overrides)
    try:
        return ModelArgs(**kw)
    except ConfigError as e:
        raise ConfigError(f"{e} ({where})" if where != "config.json" else str(e)) from None
