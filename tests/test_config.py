"""ModelArgs: presets, the official config.json reader, and one clear error per bad key."""

from __future__ import annotations

import json

import pytest

from dsv4.models import ConfigError, ModelArgs, preset


def flash_cfg() -> dict:
    return preset("flash").to_hf_config()


def test_flash_and_pro_presets_have_the_released_schedule():
    f, p = preset("flash"), preset("pro")
    assert len(f.compress_ratios) == 44 and f.compress_ratios[:4] == (0, 0, 4, 128) and f.compress_ratios[-2:] == (4, 0)
    assert sum(r == 4 for r in f.compress_ratios) == 21 and sum(r == 128 for r in f.compress_ratios) == 20
    assert p.compress_ratios[:3] == (128, 128, 4) and sum(r == 128 for r in p.compress_ratios) == 31
    assert (f.index_topk, p.index_topk, f.route_scale, p.route_scale) == (512, 1024, 1.5, 2.5)
    assert (p.n_heads, p.o_groups, p.n_routed_experts, p.moe_inter_dim) == (128, 16, 384, 3072)
    t = preset("tiny")
    assert set(t.compress_ratios[:t.n_layers]) == {0, 4, 128} and 0 < t.n_hash_layers < t.n_layers


def test_from_hf_config_round_trip_and_unknown_keys(tmp_path):
    cfg = flash_cfg() | {"some_future_key": 1, "transformers_version": "5.0"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelArgs.from_hf_config(tmp_path) == preset("flash")
    assert ModelArgs.from_hf_config(tmp_path / "config.json", max_seq_len=8192).max_seq_len == 8192
    no_expert_dtype = {k: v for k, v in cfg.items() if k != "expert_dtype"}  # absent in April-2026 snapshots
    assert ModelArgs.from_hf_config(no_expert_dtype).expert_dtype == "fp4"


def test_capacity_is_the_configs_max_position_embeddings_unless_given():
    """max_seq_len = max_position_embeddings (1,048,576 for the release, SPEC §1.1), not a 4096 default."""
    assert ModelArgs.from_hf_config(flash_cfg()).max_seq_len == 1048576 == preset("pro").max_seq_len
    assert ModelArgs.from_hf_config(flash_cfg() | {"max_position_embeddings": 65536}).max_seq_len == 65536
    assert ModelArgs.from_hf_config(flash_cfg(), max_seq_len=4096).max_seq_len == 4096
    assert preset("tiny").to_hf_config()["max_position_embeddings"] == 1024  # a synthetic config carries its own
    with pytest.raises(ConfigError, match="max_position_embeddings: expected an integer, got 1.5"):
        ModelArgs.from_hf_config(flash_cfg() | {"max_position_embeddings": 1.5})
    with pytest.raises(ConfigError, match="max_position_embeddings: must be > 0, got 0"):
        ModelArgs.from_hf_config(flash_cfg(), max_seq_len=0)


@pytest.mark.parametrize("change,key", [
    (lambda c: c.pop("hidden_size"), "hidden_size: missing"),
    (lambda c: c.pop("compress_ratios"), "compress_ratios: missing"),
    (lambda c: c.update(compress_ratios=c["compress_ratios"][:-1]), "compress_ratios: has 43 entries, expected"),
    (lambda c: c.update(o_groups=7), "o_groups: num_attention_heads=64 is not divisible by o_groups=7"),
    (lambda c: c.update(compress_ratios=[3] + c["compress_ratios"][1:]), "compress_ratios: entry 0 is 3"),
    (lambda c: c.update(num_key_value_heads=8), "num_key_value_heads"),
    (lambda c: c.update(scoring_func="softmax"), "scoring_func"),
    (lambda c: c.update(num_experts_per_tok=300), "num_experts_per_tok"),
    (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings"),
    (lambda c: c.update(qk_rope_head_dim=600), "qk_rope_head_dim"),
    (lambda c: c["compress_ratios"].__setitem__(-1, 4), "compress_ratios: MTP entry 43 must be 0"),
])
def test_bad_config_names_the_key(change, key):
    cfg = flash_cfg()
    change(cfg)
    with pytest.raises(ConfigError, match=key):
        ModelArgs.from_hf_config(cfg)


def test_bad_file_and_preset_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json: no such file"):
        ModelArgs.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    # the FP8 activation block depends on how each linear is stored: the model checks it, not the config
    assert preset("tiny", dim=160).dim == 160 and preset("tiny", dim=160, quant_sim=False).dim == 160
    with pytest.raises(ConfigError, match="head_dim - qk_rope_head_dim = 96 is not a multiple of 64"):
        preset("tiny", rope_head_dim=32)  # the KV simulation's block does not depend on storage
    assert preset("tiny", rope_head_dim=32, kv_quant_sim=False).rope_head_dim == 32


@pytest.mark.parametrize("key,value,msg", [
    ("hidden_size", 128.7, r"hidden_size: expected an integer, got 128.7 \(a float\)"),
    ("hidden_size", 128.0, "hidden_size: expected an integer, got 128.0"),
    ("hidden_size", "abc", r'hidden_size: expected an integer, got "abc" \(a string\)'),
    ("num_hidden_layers", [4], r"num_hidden_layers: expected an integer, got \[4\] \(a list\)"),
    ("num_experts_per_tok", True, "num_experts_per_tok: expected an integer, got true"),
    ("rope_theta", "1e4", "rope_theta: expected a number"),
    ("swiglu_limit", None, r"swiglu_limit: expected a number, got null"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps: expected a finite number"),
    ("compress_ratios", [4.5] * 44, "compress_ratios: entry 0 must be an integer, got 4.5"),
    ("compress_ratios", "0,4", "compress_ratios: expected a list of integers"),
    ("hidden_size", -4096, "hidden_size: must be > 0, got -4096"),
    ("moe_intermediate_size", -2048, "moe_intermediate_size: must be > 0"),
    ("num_hash_layers", -1, "num_hash_layers: must be >= 0, got -1"),
    ("swiglu_limit", -10.0, "swiglu_limit: must be >= 0"),
])
def test_config_values_are_type_checked_under_their_official_names(key, value, msg):
    """A value of the wrong type or sign is an error naming the config.json key; nothing is coerced."""
    cfg = flash_cfg() | {key: value}
    with pytest.raises(ConfigError, match=msg):
        ModelArgs.from_hf_config(cfg)


@pytest.mark.parametrize("key", ["swiglu_limit", "rope_scaling", "num_nextn_predict_layers", "num_hash_layers",
                                 "scoring_func", "eos_token_id", "bos_token_id", "num_key_value_heads",
                                 "tie_word_embeddings", "rope_scaling.factor", "rope_scaling.beta_fast",
                                 "rope_scaling.original_max_position_embeddings", "max_position_embeddings"])
def test_keys_every_release_carries_are_required(key, tmp_path):
    """A missing swiglu_limit used to turn the clamp off silently; now it is an error naming key and file."""
    cfg = flash_cfg()
    if "." in key:
        del cfg["rope_scaling"][key.split(".")[1]]
    else:
        del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"^{key}: missing from {tmp_path / 'config.json'}"):
        ModelArgs.from_hf_config(tmp_path)


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object of config keys"):
        ModelArgs.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(flash_cfg() | {"hidden_size": 100}))
    with pytest.raises(ConfigError, match=rf"moe_intermediate_size: MXFP4 experts need hidden_size.*\({tmp_path}"):
        ModelArgs.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="rope_scaling.type: only 'yarn'"):
        ModelArgs.from_hf_config(flash_cfg() | {"rope_scaling": {"type": "linear", "factor": 2.0}})


def test_preset_overrides_are_type_checked_too():
    with pytest.raises(ConfigError, match="hidden_size: expected an integer, got 128.7"):
        preset("tiny", dim=128.7)
    assert preset("tiny").beta_fast == 32.0 and isinstance(preset("tiny").beta_fast, float)
