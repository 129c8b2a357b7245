"""The chat template and special-token strings of a Hugging Face checkpoint folder.

transformers keeps the template in `chat_template.jinja` (newer saves) or in
tokenizer_config.json's "chat_template" (a string, or a list of named templates of
which "default" is the one apply_chat_template uses); the strings a template refers
to as bos_token, eos_token, ... are in tokenizer_config.json or special_tokens_map.json,
each a string or an AddedToken object with "content".
"""
from __future__ import annotations

import json
from pathlib import Path

from edgeinfer.errors import CheckpointError
from edgeinfer.format.constants import CHAT_TEMPLATE_FILE
from edgeinfer.runtime.chat_template import SPECIAL_TOKEN_NAMES, compile_template

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def read_chat(src: Path) -> tuple[str | None, dict[str, str]]:
    """(template source or None, special tokens) of checkpoint folder `src`. A template is
    compiled here, so a broken or hostile one stops the export with a ChatTemplateError."""
    tok_cfg = _json(src / TOKENIZER_CONFIG)
    template = None
    jinja = src / CHAT_TEMPLATE_FILE
    if jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    elif tok_cfg.get("chat_template") is not None:
        template = _default_template(tok_cfg["chat_template"], src / TOKENIZER_CONFIG)
    if template is not None:
        compile_template(template)
    special = {}
    for source in (_json(src / SPECIAL_TOKENS_MAP), tok_cfg):   # tokenizer_config.json wins, as in transformers
        for name in SPECIAL_TOKEN_NAMES:
            value = source.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[name] = value
    return template, special


def _default_template(value, path: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise CheckpointError(f"{path}: chat_template must be a string or a list of named templates with a "
                          '"default" one; fix the file or remove its chat_template to export without one')


def _json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): fix or remove it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object: fix or remove it")
    return value
