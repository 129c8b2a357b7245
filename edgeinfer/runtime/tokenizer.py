"""Tokenizer (Hugging Face `tokenizers` file) and an incremental detokenizer for
streaming: byte-level BPE can split a UTF-8 character across tokens, so a piece
is released only once it decodes without a replacement character at its end."""
from __future__ import annotations

from pathlib import Path

from edgeinfer.errors import InvalidArgumentError, ModelFormatError

MAX_PROMPT_CHARS = 1 << 24  # refuse absurd inputs before tokenising them


class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        if not Path(path).exists():
            raise ModelFormatError(f"tokenizer file is missing: {path}")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception on bad files
            raise ModelFormatError(f"{path} is not a valid tokenizer.json ({exc})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens=False for text that already spells its special
        tokens (a rendered chat template), as apply_chat_template tokenizes."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"prompt must be a str, not {type(text).__name__}")
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidArgumentError(f"prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}: shorten it")
        # Lone surrogates cannot be encoded as UTF-8; replace them instead of crashing.
        text = text.encode("utf-8", "replace").decode("utf-8")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece
