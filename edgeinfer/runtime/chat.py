"""Chat: a conversation rendered by the model's template, generated with one KV cache
kept across turns.

Each turn renders the whole conversation, tokenizes it, and prefills only the tokens
after the longest prefix the cache already holds: the earlier turns (and the answers
the model generated) are not run again. Comparing token ids, rather than trusting that
the new rendering extends the old, stays exact when a template rewrites earlier turns
or an answer re-tokenizes differently: the cache is cut back to where they agree.
"""
from __future__ import annotations

import warnings
from typing import Iterator

from edgeinfer.errors import ChatTemplateError, ChatTemplateWarning, ContextLengthError
from edgeinfer.runtime.chat_template import FALLBACK_STOP, ChatTemplate, check_messages
from edgeinfer.runtime.generate import GenerationResult, GenerationStep, text_steps
from edgeinfer.runtime.sampling import DEFAULT_MAX_TOKENS, SamplingConfig


def load_template(model) -> ChatTemplate:
    """The model folder's template, or the plain fallback (with a ChatTemplateWarning, once per model)."""
    m = model.manifest
    if m.chat_template is not None:
        return ChatTemplate(m.path(m.chat_template).read_text(encoding="utf-8"), m.special_tokens)
    warnings.warn(f"{m.folder} has no chat template: chatting with a plain 'User: ... Assistant:' format "
                  "(export the model from a checkpoint whose tokenizer_config.json has a chat_template)",
                  ChatTemplateWarning, stacklevel=3)
    return ChatTemplate.plain(m.special_tokens)


def sampling_config(model, template: ChatTemplate, *, max_new_tokens: int | None = None, stop=(),
                    **overrides) -> SamplingConfig:
    """Sampling for a chat turn: what the caller gives, else the checkpoint's generation_config
    defaults (carried in the manifest), else edgeinfer's."""
    gen = model.manifest.generation
    values = {k: gen[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty") if k in gen}
    if "top_k" in values:
        values["top_k"] = int(values["top_k"])      # JSON may spell it 20.0
    values.update({k: v for k, v in overrides.items() if v is not None})
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if template.fallback:
        stop += FALLBACK_STOP
    return SamplingConfig(max_new_tokens=DEFAULT_MAX_TOKENS if max_new_tokens is None else max_new_tokens,
                          stop=stop, **values)


class ChatSession:
    """A conversation with its KV cache. `send(text)` adds a user turn and answers it;
    the answer joins the history. Not thread-safe: one session is one conversation."""

    def __init__(self, model, messages=(), *, system: str | None = None, template: ChatTemplate | None = None):
        self.model = model
        self.template = template if template is not None else model.chat_template
        self.messages: list[dict] = ([{"role": "system", "content": system}] if system else []) \
            + check_messages(messages)
        self.cache = model.new_cache()
        self.cached_ids: list[int] = []     # the tokens whose keys and values the cache holds
        self.prefilled = 0                  # tokens the last turn prefilled (the rest came from the cache)
        self._open: Iterator | None = None  # a streamed answer not yet finished

    def reset(self, *, keep_system: bool = True) -> None:
        """Forget the conversation (and the cache); keep the system message unless told not to."""
        self._close_open()
        self.messages = [m for m in self.messages[:1] if keep_system and m["role"] == "system"]
        self.cache.truncate(0)
        self.cached_ids = []

    def send(self, text: str, *, stream: bool = False, **sampling) -> GenerationResult | Iterator[GenerationStep]:
        """Add a user turn and answer it (arguments as Model.generate's)."""
        self._close_open()
        self.messages.append(check_messages([{"role": "user", "content": text}])[0])
        try:
            return self.reply(stream=stream, **sampling)
        except BaseException:
            self.messages.pop()     # a refused turn leaves the conversation as it was
            raise

    def reply(self, *, stream: bool = False, **sampling) -> GenerationResult | Iterator[GenerationStep]:
        """Answer the conversation as it stands. Checked before any step: a conversation over
        the context window raises ContextLengthError. Ctrl-C during a non-streaming call (or
        closing the stream) keeps what was answered so far; the session stays usable."""
        self._close_open()
        cfg = sampling_config(self.model, self.template, **sampling)
        ids = self._prompt_ids()
        if len(ids) >= self.model.max_context:
            raise ContextLengthError(f"the conversation has {len(ids)} tokens; the model's context window is "
                                     f"{self.model.max_context}: reset the chat (/reset) or start a new one")
        steps = self._steps(ids, cfg)
        if stream:
            self._open = steps
            return steps
        return GenerationResult.collect(steps)

    def _prompt_ids(self) -> list[int]:
        text = self.template.render(self.messages, add_generation_prompt=True)
        # A real template spells its special tokens (BOS included), as apply_chat_template tokenizes;
        # the plain fallback is text like any prompt.
        ids = self.model.tokenizer.encode(text, add_special_tokens=self.template.fallback)
        if not ids:
            raise ChatTemplateError("the chat template rendered an empty prompt for this conversation: "
                                    "give non-empty messages, or fix the model folder's template")
        return ids

    def _steps(self, ids: list[int], cfg: SamplingConfig) -> Iterator[GenerationStep]:
        keep = _common_prefix(self.cached_ids, ids)
        self.cache.truncate(keep)
        self.prefilled = len(ids) - min(keep, len(ids) - 1)
        seen: list[GenerationStep] = []
        try:
            for step in text_steps(self.model, ids, cfg, self.cache):
                seen.append(step)
                yield step
        finally:
            # Also on Ctrl-C or close(): every token the cache committed was yielded first.
            fed = ids + [s.token for s in seen if s.token is not None]
            self.cache.truncate(min(self.cache.length, len(fed)))
            self.cached_ids = fed[:self.cache.length]
            self.messages.append({"role": "assistant", "content": "".join(s.text for s in seen)})
            self._open = None

    def _close_open(self) -> None:
        if self._open is not None:
            self._open.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
