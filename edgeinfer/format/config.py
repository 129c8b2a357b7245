"""The model's shape and options, normalised once.

The exporter builds a ModelConfig from a Hugging Face config.json (older and
newer transformers formats both land here); the manifest stores it; the runtime
reads it back with `from_dict`, which validates every field before anything is
allocated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edgeinfer.errors import ModelFormatError

FAMILIES = ("opt", "llama", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FFN_ACTIVATIONS = ("relu", "silu", "gelu")   # the FFN activation functions a model may use
# Refuse absurd shapes before allocating anything (hostile or corrupt manifests).
_LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_layers": 1024, "num_heads": 1024,
    "num_kv_heads": 1024, "head_dim": 1024, "ffn_dim": 1 << 20, "max_position_embeddings": 1 << 22,
    "num_experts": 4096, "sliding_window": 1 << 22, "experts_per_token": 64, "shared_expert_ffn_dim": 1 << 20,
}


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    activation: str
    gated: bool
    norm: str                    # "rmsnorm" | "layernorm"
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    position: str = "rotary"     # "rotary" | "learned"
    rope_theta: float = 10000.0
    rotary_dim: int = 0
    rope_scaling: dict = field(default_factory=dict)
    attention_bias: bool = False  # q/k/v biases
    output_bias: bool = False     # o_proj bias
    mlp_bias: bool = False
    qk_norm: bool = False         # per-head RMSNorm of q and k before rotary (Qwen3)
    sliding_window: int = 0       # > 0: attention sees the last sliding_window keys (Mistral)
    full_attention_layers: tuple[int, ...] = ()   # layers exempt from the window (Qwen2's max_window_layers)
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True
    shared_expert_ffn_dim: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    source_architecture: str = ""

    def window(self, layer: int) -> int:
        """The attention window of `layer` (0: the whole context)."""
        return 0 if layer in self.full_attention_layers else self.sliding_window

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["full_attention_layers"] = list(self.full_attention_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ModelFormatError("manifest 'config' must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelFormatError(f"manifest config has unknown fields: {sorted(unknown)}")
        try:
            d = dict(d)
            d["eos_token_ids"] = tuple(int(t) for t in d.get("eos_token_ids", ()))
            d["full_attention_layers"] = tuple(int(t) for t in d.get("full_attention_layers", ()))
            cfg = cls(**d)
        except TypeError as exc:
            raise ModelFormatError(f"manifest config is incomplete: {exc}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(msg):
            raise ModelFormatError(f"manifest config: {msg}")

        if self.family not in FAMILIES:
            bad(f"family {self.family!r} not one of {FAMILIES}")
        if self.activation not in FFN_ACTIVATIONS:
            bad(f"activation {self.activation!r} not one of {FFN_ACTIVATIONS}")
        if self.norm not in ("rmsnorm", "layernorm"):
            bad(f"norm {self.norm!r}")
        if self.position not in ("rotary", "learned"):
            bad(f"position {self.position!r}")
        for name, limit in _LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > limit:
                bad(f"{name}={v!r} is out of range [0, {limit}]")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) == 0:
                bad(f"{name} must be positive")
        if self.num_heads % self.num_kv_heads:
            bad(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            bad(f"rotary_dim={self.rotary_dim} must be even and <= head_dim")
        if not (0 < float(self.norm_eps) < 1):
            bad(f"norm_eps={self.norm_eps!r}")
        if any(not 0 <= i < self.num_layers for i in self.full_attention_layers):
            bad(f"full_attention_layers={list(self.full_attention_layers)} names layers outside "
                f"0..{self.num_layers - 1}")
        if self.is_moe and not (0 < self.experts_per_token <= self.num_experts):
            bad("experts_per_token must be in 1..num_experts")
