"""Chat templates: the Jinja2 template a model folder ships, rendered in a sandbox.

A template comes from a model folder, so it is untrusted input. It is compiled in
Jinja2's ImmutableSandboxedEnvironment (no underscore attributes, no mutation of the
data it is given, ranges bounded) with the globals and filters Hugging Face templates
are written against (transformers' chat_template_utils: raise_exception, strftime_now,
tojson without HTML escaping, loopcontrols, trim_blocks, lstrip_blocks), so that a
template renders here as `tokenizer.apply_chat_template` renders it. On top of the
sandbox, a template that names Python internals is refused before it runs, even in a
branch a given conversation would not take, and string or list repetition and the
rendered output are bounded so that a template cannot exhaust memory.
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from datetime import datetime

from edgeinfer.errors import ChatTemplateError, InvalidArgumentError

MAX_TEMPLATE_CHARS = 1 << 20      # the largest Hub templates are tens of KB
MAX_RENDERED_CHARS = 1 << 24      # the tokenizer's own prompt limit (runtime/tokenizer.py)
MAX_MESSAGES = 1 << 16
# Names a template has no business reaching: Jinja's helper objects whose attributes lead
# to Python internals (cycler, joiner, self: the TemplateReference), builtins that would
# touch files or code were they ever exposed, and the frame of the render itself.
_FORBIDDEN_NAMES = frozenset({"self", "cycler", "joiner", "lipsum", "open", "eval", "exec", "compile",
                              "getattr", "setattr", "globals", "locals", "vars", "import", "__import__",
                              "builtins", "__builtins__", "os", "sys", "subprocess"})

# Used when a model folder has no template: plain "Role: text" turns, which any base
# model continues; FALLBACK_STOP keeps the model from writing the user's next turn. An
# answer is rendered right after "Assistant:", exactly as it was generated after the
# generation prompt, so the next turn finds the whole answer in the session's cache.
FALLBACK_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
                     "Assistant:{{ message['content'] }}{% else %}"
                     "{{ message['role'] | capitalize }}: {{ message['content'] }}{% endif %}{{ '\\n\\n' }}"
                     "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
FALLBACK_STOP = ("\nUser:", "\nSystem:")

# The special tokens transformers passes to every template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template and the special-token strings it is rendered with."""
    source: str
    special_tokens: dict = field(default_factory=dict)
    fallback: bool = False          # the plain template used when the model folder has none

    def __post_init__(self):
        object.__setattr__(self, "_template", compile_template(self.source))

    @classmethod
    def plain(cls, special_tokens: dict | None = None) -> ChatTemplate:
        return cls(FALLBACK_TEMPLATE, dict(special_tokens or {}), fallback=True)

    def render(self, messages, *, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text of `messages` ([{"role", "content"}, ...]); ends with the assistant's
        header when add_generation_prompt. Extra keyword arguments reach the template as
        apply_chat_template passes them (tools, documents, enable_thinking, ...)."""
        from jinja2.exceptions import TemplateError
        context = {"tools": None, "documents": None, **self.special_tokens, **_plain(kwargs),
                   "messages": check_messages(messages), "add_generation_prompt": add_generation_prompt}
        out, n = [], 0
        try:
            # generate() yields the text as it renders, so an oversized output stops early.
            for piece in self._template.generate(**context):
                n += len(piece)
                if n > MAX_RENDERED_CHARS:
                    raise ChatTemplateError(f"the chat template rendered more than {MAX_RENDERED_CHARS} characters: "
                                            "it is broken or hostile; fix or remove the model folder's template")
                out.append(piece)
        except TemplateError as exc:
            raise ChatTemplateError(_render_message(exc)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError) as exc:
            raise ChatTemplateError(f"the chat template failed on this conversation ({type(exc).__name__}: {exc}); "
                                    "check the messages' roles and order against the model's template") from None
        return "".join(out)


def check_messages(messages) -> list[dict]:
    """Messages as plain dicts with a str role and str content (copies: a template never
    sees the caller's objects)."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise InvalidArgumentError('messages must be a list of {"role": ..., "content": ...} dicts')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidArgumentError(f'message {i} must be a dict with a str "role" and a str "content", '
                                       f"not {m!r:.80}")
        out.append(_plain(m))
        if len(out) > MAX_MESSAGES:
            raise InvalidArgumentError(f"a conversation holds at most {MAX_MESSAGES} messages")
    return out


def compile_template(source: str):
    """Parse, check and compile `source` in the sandbox; a ChatTemplateError says why not."""
    import jinja2
    from jinja2 import nodes
    if not isinstance(source, str) or not source:
        raise ChatTemplateError("the chat template must be a non-empty string")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"the chat template has {len(source)} characters, over the limit of "
                                f"{MAX_TEMPLATE_CHARS}: it is not a chat template")
    env = _environment()
    try:
        tree = env.parse(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from None
    for node in tree.find_all((nodes.Name, nodes.Getattr, nodes.Getitem, nodes.NSRef, nodes.Keyword, nodes.Filter,
                               nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        reason = _forbidden(node, nodes)
        if reason:
            raise ChatTemplateError(f"refused the chat template: it {reason} (line {node.lineno}); a chat template "
                                    "only formats messages, so this one is broken or hostile: do not use this "
                                    "model folder's template")
    return env.from_string(tree)


def _forbidden(node, nodes) -> str | None:
    if isinstance(node, (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        return "loads other templates (files)"
    if isinstance(node, nodes.Name) and (node.name in _FORBIDDEN_NAMES or node.name.startswith("_")):
        return f"reaches for {node.name!r}"
    if isinstance(node, (nodes.Getattr, nodes.NSRef)) and node.attr.startswith("_"):
        return f"reads the private attribute {node.attr!r}"
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) \
            and node.arg.value.startswith("_"):
        return f"reads the private attribute {node.arg.value!r}"
    if isinstance(node, nodes.Keyword) and node.key.startswith("_"):
        return f"passes the private name {node.key!r}"
    if isinstance(node, nodes.Filter) and node.name == "attr":
        return "uses the attr filter (attribute access by name)"
    return None


def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        # Repetition is the one operator that turns a short template into gigabytes.
        intercepted_binops = frozenset({"*", "**"})

        def unsafe_undefined(self, obj, attribute):
            # Jinja's sandbox renders an unsafe attribute as an empty Undefined; a probe for
            # internals is refused instead, so a hostile template cannot pass unnoticed.
            raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a "
                                                  f"{type(obj).__name__} object is unsafe")

        def call_binop(self, context, op, left, right):
            if op == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise jinja2.exceptions.SecurityError("exponent too large in a chat template")
            if op == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) \
                            and len(seq) * count > MAX_RENDERED_CHARS:
                        raise jinja2.exceptions.SecurityError("repetition too large in a chat template")
            return operator.mul(left, right) if op == "*" else operator.pow(left, right)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    for name in ("cycler", "joiner", "lipsum"):
        env.globals.pop(name, None)
    return env


def _raise_exception(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Hugging Face's tojson: plain json.dumps, no HTML escaping (Jinja's own escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(str(fmt))


def _plain(value):
    """JSON-like copies of what the template sees (no subclass methods reach the sandbox)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (int, float)):
        return float(value) if isinstance(value, float) else int(value)
    raise InvalidArgumentError(f"chat template arguments must be JSON-like values, not {type(value).__name__}")


def _render_message(exc) -> str:
    from jinja2.exceptions import SecurityError, UndefinedError
    if isinstance(exc, SecurityError):
        return (f"refused the chat template: it tried an unsafe operation ({exc}); do not use this model "
                "folder's template")
    if isinstance(exc, UndefinedError):
        return f"the chat template uses something undefined ({exc}); the template does not fit this runtime"
    # raise_exception(...) in the template: its own message says what is wrong with the conversation.
    return f"the chat template refused the conversation: {exc}"
