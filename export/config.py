"""Hugging Face config.json -> edgeinfer ModelConfig.

Both transformers formats are read: the older (`rope_theta`, `rope_scaling`,
`torch_dtype`) and the newer (`rope_parameters`, `dtype`).
"""
from __future__ import annotations

import json
from pathlib import Path

from edgeinfer.errors import CheckpointError, UnsupportedModelError
from edgeinfer.format.config import ModelConfig

# model_type -> family; one table, not if-chains.
MODEL_TYPES = {
    "opt": "opt",
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
}
_ACT = {"relu": "relu", "silu": "silu", "swish": "silu"}


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in {folder}") from None
    except ValueError as exc:
        raise CheckpointError(f"config.json is not valid JSON ({exc})") from None


def _rope(cfg: dict) -> tuple[float, dict]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):            # newer transformers
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:                                    # older
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)")
    if rope_type != "default":
        scaling["rope_type"] = rope_type
    else:
        scaling = {}
    return float(theta), scaling


def _eos(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def model_config(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    family = MODEL_TYPES.get(model_type)
    arch = (hf.get("architectures") or [""])[0]
    if family is None:
        raise UnsupportedModelError(
            f"architecture {arch or model_type!r} (model_type {model_type!r}) is not supported; "
            f"supported model types: {', '.join(sorted(MODEL_TYPES))}")
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    act_name = hf.get("hidden_act", hf.get("activation_function", "silu"))
    act = _ACT.get(act_name)
    if act is None:
        raise UnsupportedModelError(f"activation {act_name!r} is not supported ({', '.join(sorted(_ACT))})")
    common = dict(
        vocab_size=int(hf["vocab_size"]), hidden_size=hidden, num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, activation=act, max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family == "opt")),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos(hf), pad_token_id=hf.get("pad_token_id"),
        source_architecture=arch,
    )
    if family == "opt":
        if not hf.get("do_layer_norm_before", True):
            raise UnsupportedModelError("OPT with do_layer_norm_before=false (post-norm, opt-350m) is not supported")
        if hf.get("word_embed_proj_dim", hidden) != hidden:
            raise UnsupportedModelError("OPT with word_embed_proj_dim != hidden_size is not supported")
        bias = bool(hf.get("enable_bias", True))
        return ModelConfig(
            family="opt", num_kv_heads=heads, head_dim=hidden // heads, ffn_dim=int(hf["ffn_dim"]),
            gated=False, norm="layernorm", norm_eps=1e-5, position="learned", rotary_dim=0,
            attention_bias=bias, output_bias=bias, mlp_bias=bias, **common)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    theta, scaling = _rope(hf)
    rotary_dim = int(head_dim * float(hf.get("partial_rotary_factor", 1.0)))
    kw = dict(
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
        gated=True, norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rotary",
        rope_theta=theta, rotary_dim=rotary_dim, rope_scaling=scaling,
        attention_bias=bool(hf.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        output_bias=bool(hf.get("attention_bias", False)) and model_type == "llama",
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )
    if hf.get("sliding_window") and hf.get("use_sliding_window", model_type == "mistral"):
        if int(hf["sliding_window"]) < common["max_position_embeddings"]:
            raise UnsupportedModelError("sliding-window attention is not supported")
    if family == "llama":
        return ModelConfig(family="llama", ffn_dim=int(hf["intermediate_size"]), **kw, **common)
    if family == "mixtral":
        return ModelConfig(
            family="mixtral", ffn_dim=int(hf["intermediate_size"]), num_experts=int(hf["num_local_experts"]),
            experts_per_token=int(hf["num_experts_per_tok"]), norm_topk_prob=True, **kw, **common)
    return ModelConfig(  # qwen2_moe
        family="qwen2_moe", ffn_dim=int(hf["moe_intermediate_size"]), num_experts=int(hf["num_experts"]),
        experts_per_token=int(hf["num_experts_per_tok"]), norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_ffn_dim=int(hf.get("shared_expert_intermediate_size", 0)), **kw, **common)
