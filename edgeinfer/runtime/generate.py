"""Generation as a generator of steps (prefill, then one token per decode step), with
text streaming and stop strings built on top of it.

Results are values, as mlx-lm's stream_generate yields GenerationResponse: each call
builds its own GenerationStep objects and one GenerationResult, so calls running at
once on one Model never share or overwrite each other's results.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from edgeinfer.errors import ContextLengthError, InvalidArgumentError
from edgeinfer.runtime.kv_cache import KVCache
from edgeinfer.runtime.sampling import Sampler, SamplingConfig
from edgeinfer.runtime.tokenizer import StreamDecoder

# Why a generation ended:
#   eos          the model sampled an end-of-sequence token (not part of the output)
#   length       max_new_tokens were generated
#   stop         a stop string appeared (it and what follows are not part of the output)
#   context      the context window is full
#   interrupted  Ctrl-C (KeyboardInterrupt) during the call
FINISH_REASONS = ("eos", "length", "stop", "context", "interrupted")


@dataclass(frozen=True)
class GenerationResult:
    """What one generate call produced, and how long it took. str() is the new text."""
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str             # one of FINISH_REASONS
    ttft_s: float                  # time to first token: prefill + first sample (0 when nothing was sampled)
    decode_s: tuple[float, ...]    # seconds of each decode step after the first token

    def __str__(self) -> str:
        return self.text

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_ms_per_token(self) -> float:
        """Mean decode time per token in ms; nan when no decode step ran."""
        return sum(self.decode_s) / len(self.decode_s) * 1e3 if self.decode_s else math.nan

    @classmethod
    def from_steps(cls, steps: Iterable[GenerationStep], finish_reason: str) -> GenerationResult:
        """The result of the steps seen so far: the whole call's when the last step is final,
        or a partial one (e.g. finish_reason "interrupted" after Ctrl-C)."""
        steps = list(steps)
        return cls(text="".join(s.text for s in steps),
                   token_ids=tuple(s.token for s in steps if s.token is not None),
                   prompt_tokens=steps[0].prompt_tokens if steps else 0,
                   finish_reason=finish_reason,
                   ttft_s=steps[0].seconds if steps else 0.0,
                   decode_s=tuple(s.seconds for s in steps[1:]))

    @classmethod
    def collect(cls, steps: Iterable[GenerationStep]) -> GenerationResult:
        """Run `steps` to the end and return the call's result; Ctrl-C returns the result so
        far with finish_reason "interrupted"."""
        seen: list[GenerationStep] = []
        try:
            for step in steps:
                seen.append(step)
        except KeyboardInterrupt:
            return cls.from_steps(seen, "interrupted")
        return seen[-1].result


@dataclass(frozen=True)
class GenerationStep:
    """One sample of a streamed generation. str() is the text it releases, so
    `print(step, end="")` prints the stream."""
    text: str                      # text released now: "" while it may begin a stop string or ends mid-character
    token: int | None              # the token sampled; None when nothing joins the output (EOS, max_new_tokens=0)
    prompt_tokens: int
    seconds: float                 # prefill + first sample on the first step, one decode step after
    finish_reason: str | None = None          # on the last step only: one of FINISH_REASONS
    result: GenerationResult | None = None    # on the last step only: the whole call

    def __str__(self) -> str:
        return self.text


def stream_generate(model, prompt: str, cfg: SamplingConfig) -> Iterator[GenerationStep]:
    """Steps completing `prompt`; the last one carries finish_reason and the GenerationResult.
    The prompt is checked here, before the first step: a bad one raises at the call."""
    ids = prompt_ids(model, prompt)
    if len(ids) > model.max_context:
        raise ContextLengthError(f"prompt has {len(ids)} tokens; the model's context window is "
                                 f"{model.max_context} tokens: shorten the prompt")
    return text_steps(model, ids, cfg)


def prompt_ids(model, prompt: str) -> list[int]:
    ids = model.tokenizer.encode(prompt)
    if not ids:
        if model.bos_token_id is None:
            raise InvalidArgumentError("prompt is empty and the model has no BOS token to start from: "
                                       "give a non-empty prompt")
        ids = [model.bos_token_id]
    return ids


def generate_step(model, prompt_ids: list[int], cfg: SamplingConfig,
                  cache: KVCache | None = None) -> Iterator[tuple[int, float, str | None]]:
    """Yield (token, seconds, finish_reason) per sample: the first from the prefill, then one
    per decode step. finish_reason is None except on the last: "eos" (the token is EOS),
    "length" or "context".

    A given `cache` already holds the keys and values of prompt_ids[:cache.length] (a chat
    session's earlier turns): only the rest is prefilled, and the cache keeps every token
    this call feeds (all sampled tokens but the last)."""
    if cfg.max_new_tokens == 0:
        return
    max_ctx = model.max_context
    sampler = Sampler(cfg)
    cache = model.new_cache() if cache is None else cache
    # The last prompt token's logits are needed: at least one token is always prefilled.
    cache.truncate(min(cache.length, len(prompt_ids) - 1))
    eos = set(model.eos_token_ids)
    t0 = time.perf_counter()
    logits = model.forward(prompt_ids[cache.length:], cache)
    history = list(prompt_ids)
    for step in range(cfg.max_new_tokens):
        token = sampler(logits[-1], history)
        seconds = time.perf_counter() - t0
        if token in eos:
            yield token, seconds, "eos"
            return
        history.append(token)
        reason = "length" if step + 1 == cfg.max_new_tokens else "context" if cache.length >= max_ctx else None
        yield token, seconds, reason
        if reason:
            return
        t0 = time.perf_counter()
        logits = model.forward([token], cache)


def text_steps(model, ids: list[int], cfg: SamplingConfig, cache: KVCache | None = None) -> Iterator[GenerationStep]:
    """Token samples turned into text pieces; a stop string ends generation and is not emitted."""
    decoder = StreamDecoder(model.tokenizer)
    stops = cfg.stop
    pending = ""          # decoded text not yet released (may start a stop string)
    steps: list[GenerationStep] = []

    def make(text: str, token: int | None, seconds: float, reason: str | None = None) -> GenerationStep:
        s = GenerationStep(text, token, len(ids), seconds, reason)
        if reason is not None:
            s = replace(s, result=GenerationResult.from_steps([*steps, s], reason))
        steps.append(s)
        return s

    for token, seconds, reason in generate_step(model, ids, cfg, cache):
        if reason == "eos":
            yield make(pending + decoder.flush(), None, seconds, "eos")
            return
        pending += decoder.push(token)
        if stops:
            hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                yield make(pending[:hit], token, seconds, "stop")
                return
            keep = _held_back(pending, stops)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        else:
            out, pending = pending, ""
        if reason is not None:          # the last step releases what was held back
            yield make(out + pending + decoder.flush(), token, seconds, reason)
            return
        yield make(out, token, seconds)
    yield make("", None, 0.0, "length")   # max_new_tokens=0: nothing sampled


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best
