"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus), seeded."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeinfer.errors import InvalidArgumentError

# The defaults of Model.generate and `edgeinfer generate`, defined here only.
DEFAULT_MAX_TOKENS = 64
DEFAULT_TEMPERATURE = 0.0         # greedy
DEFAULT_TOP_K = 0                 # off
DEFAULT_TOP_P = 1.0               # off
DEFAULT_REPETITION_PENALTY = 1.0  # off


@dataclass(frozen=True)
class SamplingConfig:
    """Validated once; a bad value raises InvalidArgumentError (a ValueError) naming the parameter."""
    max_new_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE   # 0 = greedy
    top_k: int = DEFAULT_TOP_K                 # 0 = off
    top_p: float = DEFAULT_TOP_P               # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise InvalidArgumentError(msg)

        check(isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
              and 0 <= self.max_new_tokens <= 1 << 20, f"max_new_tokens must be an integer in 0..{1 << 20}")
        check(_finite(self.temperature) and 0 <= self.temperature <= 100, "temperature must be in [0, 100]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0")
        check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        check(_finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
              "repetition_penalty must be in (0, 10]")
        check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), "seed must be an integer >= 0")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        check(all(isinstance(s, str) and s for s in stop), "stop must be non-empty strings")
        object.__setattr__(self, "stop", stop)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        cfg = self.cfg
        logits = np.asarray(logits, dtype=np.float64)
        if cfg.repetition_penalty != 1.0 and history:
            idx = np.unique(np.asarray(history))
            v = logits[idx]
            logits = logits.copy()
            logits[idx] = np.where(v > 0, v / cfg.repetition_penalty, v * cfg.repetition_penalty)
        if cfg.temperature < 1e-4:      # below this, sampling is greedy (and 1/T would overflow)
            return int(np.argmax(logits))
        z = logits / cfg.temperature
        if cfg.top_k and cfg.top_k < z.size:
            kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
            z = np.where(z < kth, -np.inf, z)
        z = z - z.max()
        p = np.exp(z)
        p /= p.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, cfg.top_p)) + 1]
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return int(self.rng.choice(p.size, p=p))
