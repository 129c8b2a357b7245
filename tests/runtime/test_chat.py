"""Chat: templates render as transformers' apply_chat_template renders them, hostile
templates are refused, a session prefills only each new turn, the demo model chats
with the plain fallback."""
from __future__ import annotations

import io
import json
import shutil
import warnings

import pytest

import edgeinfer
from edgeinfer.errors import ChatTemplateError, ChatTemplateWarning, ContextLengthError, ModelFormatError
from edgeinfer.runtime.chat_template import MAX_RENDERED_CHARS, ChatTemplate
from edgeinfer.runtime.generate import GenerationResult, GenerationStep

from conftest import MODELS

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Llama 3.1's shape: today's date through strftime_now, the system message pulled out of the
# loop, loop controls ({% continue %}).
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] == 'ipython' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Template sources keep their real line structure, long lines included.
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

TEMPLATES = {
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama3.1": (LLAMA31, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2.5": (QWEN25, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "phi3": (PHI3, {"bos_token": "<s>", "eos_token": "<|endoftext|>"}),
    "gemma": (GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}),
}
NO_SYSTEM = ("mistral", "gemma")

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
TURNS = [{"role": "user", "content": "  What is 2 + 2?  "},
         {"role": "assistant", "content": "4, and <b>bold</b> & 'quoted' — ünïcode."},
         {"role": "user", "content": "And 3 + 3?\nThink step by step."}]


def _hf_tokenizer(special: dict):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(MODELS / "llama-relu-8m" / "tokenizer.json"),
                                                **special)


def _conversations(name):
    convs = [TURNS, TURNS[:1]]
    if name not in NO_SYSTEM:
        convs += [[SYSTEM, *TURNS]]
    return convs


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_transformers_apply_chat_template(name, add_generation_prompt):
    source, special = TEMPLATES[name]
    hf = _hf_tokenizer(special)
    ours = ChatTemplate(source, special)
    for conv in _conversations(name):
        expect = hf.apply_chat_template(conv, chat_template=source, tokenize=False,
                                        add_generation_prompt=add_generation_prompt)
        got = ours.render(conv, add_generation_prompt=add_generation_prompt)
        assert got == expect
        assert TURNS[0]["content"].strip() in got


def test_tools_and_tojson_render_as_transformers():
    """tojson as transformers defines it: no HTML escaping, non-ASCII kept, its keyword arguments."""
    hf = _hf_tokenizer(TEMPLATES["qwen2.5"][1])
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather at <place> & time",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string", "description": "Zürich"}}}}}]
    conv = [TURNS[0], {"role": "assistant", "content": "",
                       "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
            {"role": "tool", "content": "{\"temp\": 21}"}]
    expect = hf.apply_chat_template(conv, tools=tools, chat_template=QWEN25, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(QWEN25, TEMPLATES["qwen2.5"][1]).render(conv, tools=tools) == expect
    assert "<place> & time" in expect and "Zürich" in expect
    src = "{{ messages | tojson(indent=2, sort_keys=True) }}|{{ messages | tojson }}"
    assert ChatTemplate(src).render(TURNS) == hf.apply_chat_template(TURNS, chat_template=src, tokenize=False)


def test_template_refusing_a_conversation_raises_its_message():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate(*TEMPLATES["mistral"]).render([TURNS[0], TURNS[0]])
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        ChatTemplate(*TEMPLATES["gemma"]).render([SYSTEM, *TURNS])


HOSTILE = {
    "dunder class": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "function globals": "{{ raise_exception.__globals__['os'] }}",
    "open": "{{ open('/etc/passwd').read() }}",
    "cycler": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner": "{% set j = joiner() %}{{ j }}",
    "template reference": "{{ self._TemplateReference__context }}",
    "attr filter": "{{ messages | attr('__class__') }}",
    "subscript dunder": "{{ ''['__class__'] }}",
    "namespace private": "{% set ns = namespace(_x=1) %}{{ ns }}",
    "namespace store": "{% set ns = namespace(a=1) %}{% set ns._secret = 2 %}",
    "include file": "{% include '/etc/passwd' %}",
    "import": "{% import 'os' as os %}",
    "format string": "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "mutation": "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "memory bomb": "{% set s = 'a' * 100000000 %}{{ s }}",
    "output bomb": "{% for i in range(100000) %}{{ messages[0]['content'] * 1000 }}{% endfor %}",
    "syntax": "{% for m in messages %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_refused(name):
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(HOSTILE[name]).render([{"role": "user", "content": "hi" * 10}])
    assert "root:" not in str(info.value)       # nothing of /etc/passwd leaks into the message
    assert len(str(info.value)) < 1000


def test_sandbox_refuses_internals_even_past_the_static_check():
    """The static check is an early, clear refusal; the sandbox is what enforces it."""
    from edgeinfer.runtime.chat_template import _environment
    for source in ("{{ messages.__class__ }}", "{{ messages | attr('__class__') }}"):
        with pytest.raises(Exception, match="unsafe"):
            _environment().from_string(source).render(messages=[])


def test_output_bound_is_the_tokenizers_prompt_limit():
    from edgeinfer.runtime.tokenizer import MAX_PROMPT_CHARS
    assert MAX_RENDERED_CHARS == MAX_PROMPT_CHARS


def test_messages_must_be_role_content_dicts():
    t = ChatTemplate(*TEMPLATES["phi3"])
    for bad in ("hello", [{"role": "user"}], [{"role": "user", "content": 3}], [("user", "hi")]):
        with pytest.raises(edgeinfer.errors.InvalidArgumentError):
            t.render(bad)


# ---- model folders: export carries the template, a session reuses its cache ----

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """llama-relu-8m exported from a checkpoint with a ChatML template and a chat model's
    generation_config (two EOS ids, sampling defaults)."""
    from edgeinfer.export.exporter import export
    root = tmp_path_factory.mktemp("chat")
    src = root / "src"
    shutil.copytree(MODELS / "llama-relu-8m", src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = QWEN25
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = json.loads((src / "generation_config.json").read_text())
    gen.update(eos_token_id=[0, 1], do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    (src / "generation_config.json").write_text(json.dumps(gen))
    folder = export(src, root / "out", quant="f16", progress=False)
    return folder


def test_export_carries_template_special_tokens_and_generation_config(chat_model):
    m = edgeinfer.load(chat_model)
    raw = json.loads((chat_model / "manifest.json").read_text())
    assert (chat_model / raw["chat"]["template"]).read_text() == QWEN25
    assert raw["chat"]["special_tokens"] == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                             "pad_token": "<|pad|>"}
    assert m.eos_token_ids == (0, 1)
    assert {k: m.manifest.generation[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")} == \
        {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(MODELS / "llama-relu-8m")
    expect = hf.apply_chat_template([SYSTEM, *TURNS], chat_template=QWEN25, tokenize=True,
                                    add_generation_prompt=True)
    expect = expect["input_ids"] if isinstance(expect, dict) or hasattr(expect, "keys") else expect
    session = m.start_chat([SYSTEM, *TURNS])
    assert session._prompt_ids() == list(expect)      # tokenized as apply_chat_template tokenizes


def test_export_refuses_a_hostile_template_before_writing(tmp_path):
    from edgeinfer.export.exporter import export
    src = tmp_path / "src"
    shutil.copytree(MODELS / "llama-relu-8m", src)
    (src / "chat_template.jinja").write_text(HOSTILE["cycler"])
    with pytest.raises(ChatTemplateError, match="__globals__"):
        export(src, tmp_path / "out", quant="f16", progress=False)
    assert not (tmp_path / "out").exists()


def test_session_prefills_only_the_new_turn(chat_model):
    m = edgeinfer.load(chat_model)
    fed: list[list[int]] = []
    forward = m.forward

    def counting(ids, cache, **kw):
        fed.append(list(ids))
        return forward(ids, cache, **kw)

    m.forward = counting
    session = m.start_chat(system="Answer briefly.")
    r1 = session.send("Who art thou?", max_new_tokens=12, temperature=0)
    assert isinstance(r1, GenerationResult)
    convo1 = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who art thou?"}]
    ids1 = m.tokenizer.encode(m.chat_template.render(convo1), add_special_tokens=False)
    assert fed[0] == ids1                                   # turn 1 prefills its whole prompt
    assert session.cached_ids == (ids1 + list(r1.token_ids))[:session.cache.length]

    fed.clear()
    r2 = session.send("And whence comest thou?", max_new_tokens=8, temperature=0)
    convo2 = [*convo1, {"role": "assistant", "content": r1.text},
              {"role": "user", "content": "And whence comest thou?"}]
    ids2 = m.tokenizer.encode(m.chat_template.render(convo2), add_special_tokens=False)
    reused = len(ids2) - len(fed[0])
    assert fed[0] == ids2[reused:]                          # only the tail is prefilled ...
    assert reused >= len(ids1)                              # ... everything of turn 1 comes from the cache
    text1, text2 = m.chat_template.render(convo1), m.chat_template.render(convo2)
    assert text2.startswith(text1 + r1.text)               # ChatML extends the conversation as it was
    new_turn = m.tokenizer.encode(text2[len(text1 + r1.text):], add_special_tokens=False)
    assert 0 < len(fed[0]) <= len(new_turn) + 1              # + 1: a merge across the answer's end
    assert session.prefilled == len(fed[0]) and r2.prompt_tokens == len(ids2)

    # The cached answer is the answer a fresh, full prefill gives (same greedy tokens).
    m.forward = forward
    fresh = m.chat(convo2, max_new_tokens=8, temperature=0)
    assert fresh.token_ids == r2.token_ids


def test_interrupted_answer_keeps_the_session(chat_model):
    m = edgeinfer.load(chat_model)
    session = m.start_chat()
    steps = session.send("Speak.", stream=True, max_new_tokens=16, temperature=0)
    got = [next(steps) for _ in range(3)]
    assert all(isinstance(s, GenerationStep) for s in got)
    steps.close()                                            # what Ctrl-C in the CLI does
    assert session.messages[-1] == {"role": "assistant", "content": "".join(s.text for s in got)}
    assert len(session.cached_ids) == session.cache.length

    calls = {"n": 0}
    forward = m.forward

    def interrupt_on_third(ids, cache, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(ids, cache, **kw)

    m.forward = interrupt_on_third
    r = session.send("Again.", max_new_tokens=16, temperature=0)
    assert r.finish_reason == "interrupted" and r.new_tokens == 2
    assert len(session.cached_ids) == session.cache.length
    m.forward = forward
    r = session.send("Once more.", max_new_tokens=4, temperature=0)
    assert r.finish_reason in ("length", "eos", "stop")
    assert [msg["role"] for msg in session.messages] == ["user", "assistant"] * 3


def test_conversation_over_the_context_window_is_refused_and_kept():
    m = edgeinfer.load(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatTemplateWarning)
        session = m.start_chat()
    session.send("Hello.", max_new_tokens=2)
    before = list(session.messages)
    with pytest.raises(ContextLengthError, match="/reset"):
        session.send("word " * (m.max_context + 10), max_new_tokens=2)
    assert session.messages == before
    session.reset()
    assert session.messages == [] and session.cache.length == 0


def test_demo_model_chats_with_the_fallback_and_says_so_once():
    m = edgeinfer.load(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = m.chat([{"role": "user", "content": "Good morrow."}], max_new_tokens=8)
        steps = list(m.chat([{"role": "user", "content": "Good morrow."}], max_new_tokens=8, stream=True))
    assert [type(w.message) for w in caught] == [ChatTemplateWarning]
    assert m.chat_template.fallback
    assert m.chat_template.render([{"role": "user", "content": "Hi"}]) == "User: Hi\n\nAssistant:"
    assert isinstance(r, GenerationResult) and "\nUser:" not in r.text
    assert steps[-1].result.token_ids == r.token_ids       # greedy: streaming and not give the same answer
    assert m.chat_template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hail."}],
                                  add_generation_prompt=False) == "User: Hi\n\nAssistant: Hail.\n\n"


def test_fallback_session_reuses_the_whole_previous_answer():
    from edgeinfer.runtime.chat import _common_prefix
    m = edgeinfer.load(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatTemplateWarning)
        session = m.start_chat()
    session.send("Tell me of the king.", max_new_tokens=24)
    cached = list(session.cached_ids)
    session.send("And the queen?", max_new_tokens=4)
    assert len(cached) > 24 and _common_prefix(cached, session.cached_ids) == len(cached)
    assert session.prefilled < len(m.tokenizer.encode("\n\nUser: And the queen?\n\nAssistant:")) + 2


def test_manifest_refuses_a_template_outside_the_file_table_and_bad_eos(tmp_path):
    from edgeinfer.format.manifest import read_manifest
    demo = tmp_path / "demo"
    shutil.copytree(edgeinfer.load(None).path, demo)
    raw = json.loads((demo / "manifest.json").read_text())
    for key, value, match in (("chat", {"template": "../../etc/passwd"}, "not in the manifest's file table"),
                              ("generation", {"eos_token_ids": [10 ** 9]}, "eos_token_ids"),
                              ("generation", {"temperature": -1}, "temperature"),
                              ("chat", {"special_tokens": {"bos_token": "x" * 5000}}, "special_tokens")):
        (demo / "manifest.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ModelFormatError, match=match):
            read_manifest(demo)


def test_cli_chat_keeps_the_session_and_resets(monkeypatch, capsys):
    from edgeinfer.cli import main
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n/reset\nWho goes there?\n/exit\nnot read\n"))
    assert main(["chat", "-n", "4"]) == 0
    out, err = capsys.readouterr()
    assert "no chat template" in err and "[conversation reset]" in err
    assert len(out.strip("\n").split("\n")) >= 2 and "not read" not in out
