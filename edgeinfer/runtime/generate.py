"""Generation as a generator of steps (prefill, then one token per decode step),
with text streaming and stop strings built on top of it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from edgeinfer.errors import ContextLengthError
from edgeinfer.runtime.sampling import Sampler, SamplingConfig
from edgeinfer.runtime.tokenizer import StreamDecoder


@dataclass
class Completion:
    """What one generate call produced, and how long it took."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = ""        # "eos" | "length" | "stop" | "context" | "interrupted"
    prefill_s: float = 0.0         # time to first token (prefill + first sample)
    decode_s: list[float] = field(default_factory=list)   # per decode step

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


def generate_step(model, prompt_ids: list[int], cfg: SamplingConfig, completion: Completion) -> Iterator[int]:
    """Yield sampled token ids; fills completion.finish_reason and timings."""
    max_ctx = model.max_context
    if len(prompt_ids) > max_ctx:
        raise ContextLengthError(f"prompt has {len(prompt_ids)} tokens; the model's context window is {max_ctx} "
                                 "tokens: shorten the prompt")
    completion.prompt_tokens = len(prompt_ids)
    if cfg.max_new_tokens == 0:
        completion.finish_reason = "length"
        return
    sampler = Sampler(cfg)
    cache = model.new_cache()
    eos = set(model.eos_token_ids)
    t0 = time.perf_counter()
    logits = model.forward(prompt_ids, cache)
    history = list(prompt_ids)
    for step in range(cfg.max_new_tokens):
        token = sampler(logits[-1], history)
        now = time.perf_counter()
        if step == 0:
            completion.prefill_s = now - t0
        else:
            completion.decode_s.append(now - t0)
        if token in eos:
            completion.finish_reason = "eos"
            return
        completion.token_ids.append(token)
        history.append(token)
        yield token
        if step + 1 == cfg.max_new_tokens:
            completion.finish_reason = "length"
            return
        if cache.length >= max_ctx:
            completion.finish_reason = "context"
            return
        t0 = time.perf_counter()
        logits = model.forward([token], cache)


def stream_text(model, prompt: str, cfg: SamplingConfig, completion: Completion) -> Iterator[str]:
    """Yield text pieces; a stop string ends generation and is not emitted."""
    ids = model.tokenizer.encode(prompt)
    if not ids:
        if model.bos_token_id is None:
            raise ValueError("prompt is empty and the model has no BOS token to start from")
        ids = [model.bos_token_id]
    decoder = StreamDecoder(model.tokenizer)
    stops = cfg.stop
    pending = ""          # decoded text not yet released (may start a stop string)
    for token in generate_step(model, ids, cfg, completion):
        pending += decoder.push(token)
        if stops:
            hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                completion.finish_reason = "stop"
                out = pending[:hit]
                completion.text += out
                if out:
                    yield out
                return
            keep = _held_back(pending, stops)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        else:
            out, pending = pending, ""
        if out:
            completion.text += out
            yield out
    pending += decoder.flush()
    if pending:
        completion.text += pending
        yield pending


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best
