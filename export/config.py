"""Hugging Face config.json -> edgeinfer ModelConfig.

Both transformers formats are read: the older (`rope_theta`, `rope_scaling`,
`torch_dtype`) and the newer (`rope_parameters`, `dtype`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from edgeinfer.errors import CheckpointError, ContextLimitWarning, UnsupportedModelError
from edgeinfer.format.config import ModelConfig

# model_type -> family; one table, not if-chains.
MODEL_TYPES = {
    "opt": "opt",
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "olmoe": "olmoe",
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


_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def _rope(cfg: dict) -> tuple[float, dict, float]:
    """(theta, scaling, partial_rotary_factor); scaling is {} for plain rotary."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):            # newer transformers
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:                                    # older
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg.get("rope_scaling") or {})
    partial = float(scaling.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
    if rope_type == "su":                    # Phi-3's early name for longrope
        rope_type = "longrope"
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported ({', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), {}, partial
    scaling["rope_type"] = rope_type
    if rope_type == "longrope":
        # Phi-3 keeps these at the top level; the factor defaults to the context ratio (as transformers).
        scaling.setdefault("original_max_position_embeddings",
                           cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")))
        if scaling.get("factor") is None:
            scaling["factor"] = cfg.get("max_position_embeddings", 1) / scaling["original_max_position_embeddings"]
        if not isinstance(scaling.get("short_factor"), list):
            raise CheckpointError("longrope scaling needs a short_factor list in config.json")
    return float(theta), scaling, partial


def _windows(hf: dict, model_type: str, num_layers: int, max_positions: int) -> tuple[int, tuple[int, ...]]:
    """(sliding_window, full_attention_layers): 0 when no layer has a window narrower than
    the context. Per-layer types come from layer_types where the config lists them."""
    window = int(hf.get("sliding_window") or 0)
    if not window or not hf.get("use_sliding_window", model_type in ("mistral", "phi3")):
        return 0, ()
    types = hf.get("layer_types")
    if types is None and model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        start = int(hf.get("max_window_layers", num_layers))
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    types = types or ["sliding_attention"] * num_layers
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedModelError(f"layer_types {sorted(unknown)} are not supported "
                                    "(sliding_attention, full_attention)")
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    if window >= max_positions or len(full) == num_layers:
        return 0, ()
    return window, full


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
    theta, scaling, partial = _rope(hf)
    rotary_dim = int(head_dim * partial)
    if scaling.get("rope_type") == "longrope":
        # transformers switches every position to the long factors once the sequence passes the
        # original context (recomputing the cache); the short factors are exact up to there.
        original = int(scaling["original_max_position_embeddings"])
        if common["max_position_embeddings"] > original:
            warnings.warn(f"{arch or model_type}: LongRoPE is exported with its short factors, exact up to the "
                          f"original context of {original} tokens; the model's context is limited to {original} "
                          f"(not {common['max_position_embeddings']})", ContextLimitWarning, stacklevel=3)
            common["max_position_embeddings"] = original
    if scaling.get("rope_type") == "longrope" and len(scaling["short_factor"]) != rotary_dim // 2:
        raise CheckpointError(f"longrope short_factor has {len(scaling['short_factor'])} values; "
                              f"the rotary dimension {rotary_dim} needs {rotary_dim // 2}")
    window, full_layers = _windows(hf, model_type, common["num_layers"], common["max_position_embeddings"])
    kw = dict(
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
        gated=True, norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rotary",
        rope_theta=theta, rotary_dim=rotary_dim, rope_scaling=scaling,
        attention_bias=bool(hf.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        output_bias=bool(hf.get("attention_bias", False)) and model_type == "llama",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=window, full_attention_layers=full_layers,
    )
    if family in ("llama", "qwen3", "phi3"):
        return ModelConfig(family=family, ffn_dim=int(hf["intermediate_size"]), qk_norm=family == "qwen3",
                           **kw, **common)
    if family == "mixtral":
        return ModelConfig(
            family="mixtral", ffn_dim=int(hf["intermediate_size"]), num_experts=int(hf["num_local_experts"]),
            experts_per_token=int(hf["num_experts_per_tok"]), norm_topk_prob=True, **kw, **common)
    if hf.get("clip_qkv") is not None:
        raise UnsupportedModelError(f"clip_qkv={hf['clip_qkv']} (clamped q/k/v projections) is not supported")
    return ModelConfig(  # qwen2_moe, qwen3_moe, olmoe
        family=family, qk_norm=family == "qwen3_moe",
        ffn_dim=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),   # OLMoE has only the latter
        num_experts=int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]),   # newer name
        experts_per_token=int(hf["num_experts_per_tok"]), norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_ffn_dim=int(hf.get("shared_expert_intermediate_size", 0)), **kw, **common)
