"""A loaded model: manifest, tokenizer, executor; forward passes and generation."""
from __future__ import annotations

from functools import cached_property
from typing import Iterator

import numpy as np

from edgeinfer.errors import InvalidArgumentError
from edgeinfer.format.config import ModelConfig
from edgeinfer.format.manifest import Manifest
from edgeinfer.runtime.executor import Executor, RunState
from edgeinfer.runtime.generate import GenerationResult, GenerationStep, stream_generate
from edgeinfer.runtime.kv_cache import KVCache
from edgeinfer.runtime.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    SamplingConfig,
)
from edgeinfer.runtime.tokenizer import Tokenizer


class Model:
    """Returned by `edgeinfer.load`. Thread safety: each generate call owns its KV
    cache and returns its own result objects, so several threads may generate on one
    Model at once; weights are shared read-only."""

    def __init__(self, manifest: Manifest, executor: Executor, tokenizer: Tokenizer, *, resident_bytes: int,
                 plan=None, stats=None):
        self.manifest = manifest
        self.config: ModelConfig = manifest.config
        self.executor = executor
        self.tokenizer = tokenizer
        self.resident_bytes = resident_bytes
        self.plan = plan            # what is resident, what streams (edgeinfer.streaming.plan)
        self.stats = stats          # RuntimeStats: I/O, window and cache counters
        gen = manifest.generation
        self.max_context = int(gen.get("max_context", self.config.max_position_embeddings))
        self.eos_token_ids = tuple(gen.get("eos_token_ids", self.config.eos_token_ids))
        self.bos_token_id = gen.get("bos_token_id", self.config.bos_token_id)

    def close(self) -> None:
        """Close the weight files streaming reads from (resident weights stay usable)."""
        if self.plan is not None:
            self.plan.close()

    @property
    def mode(self) -> str:
        return self.plan.mode if self.plan is not None else "resident"

    @property
    def path(self):
        return self.manifest.folder

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, self.max_context)

    def forward(self, ids, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run len(ids) new tokens after the cache's; returns logits [1 or S, vocab]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise InvalidArgumentError("forward needs at least one token id")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InvalidArgumentError(f"token ids must be in 0..{self.config.vocab_size - 1} (the model's vocabulary)")
        cache.reserve(ids.size)
        pos = np.arange(cache.length, cache.length + ids.size, dtype=np.int64)
        logits = self.executor.run(ids, pos, RunState(kv=cache, last_only=not all_logits))
        cache.commit(ids.size)
        return logits

    def logits(self, ids) -> np.ndarray:
        """Logits for every position of a sequence, from an empty cache (perplexity, parity)."""
        return self.forward(ids, self.new_cache(), all_logits=True)

    def generate(self, prompt: str, *, max_new_tokens: int = DEFAULT_MAX_TOKENS,
                 temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K, top_p: float = DEFAULT_TOP_P,
                 seed: int | None = None, stop=(), repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
                 stream: bool = False) -> GenerationResult | Iterator[GenerationStep]:
        """Complete `prompt`.

        Returns a GenerationResult (str() is the new text; token_ids, finish_reason,
        prompt_tokens, ttft_s, decode_ms_per_token), or with stream=True an iterator of
        GenerationStep (str() is each text piece; the last step carries finish_reason and
        the GenerationResult as .result). Bad arguments and a prompt over the context
        window raise at the call, before any step.

        Ctrl-C during a non-streaming call returns the result so far with finish_reason
        "interrupted"; the model stays usable.
        """
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, stop=stop, repetition_penalty=repetition_penalty)
        steps = stream_generate(self, prompt, cfg)
        if stream:
            return steps
        return GenerationResult.collect(steps)

    @cached_property
    def chat_template(self):
        """The model folder's ChatTemplate, or the plain fallback (warned once, with a ChatTemplateWarning)."""
        from edgeinfer.runtime.chat import load_template
        return load_template(self)

    def chat(self, messages, *, max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stop=(),
             repetition_penalty: float | None = None,
             stream: bool = False) -> GenerationResult | Iterator[GenerationStep]:
        """Answer a conversation: `messages` is a list of {"role": "system"|"user"|"assistant",
        "content": str} dicts, rendered with the model's chat template. Returns and streams as
        generate does. Sampling arguments left None take the checkpoint's generation_config
        defaults, then edgeinfer's. For several turns without re-running earlier ones, use
        start_chat()."""
        return self.start_chat(messages).reply(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop=stop, repetition_penalty=repetition_penalty, stream=stream)

    def start_chat(self, messages=(), *, system: str | None = None):
        """A ChatSession: send(text) answers a user turn, keeping the KV cache of the turns before
        it, so each turn prefills only its own tokens; reset() starts over."""
        from edgeinfer.runtime.chat import ChatSession
        return ChatSession(self, messages, system=system)
