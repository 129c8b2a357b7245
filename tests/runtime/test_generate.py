"""Generation: sampling options, streaming, stop strings, context limits, the CLI."""
from __future__ import annotations

import numpy as np
import pytest

import edgeinfer
from edgeinfer.errors import ContextLengthError
from edgeinfer.runtime.sampling import Sampler, SamplingConfig


@pytest.fixture(scope="module")
def model():
    return edgeinfer.load()   # the built-in demo model


def test_demo_model_generates_text(model):
    result = model.generate("Once upon a time", max_new_tokens=16)
    assert len(result.token_ids) > 0 and isinstance(result.text, str) and result.text.strip()
    assert str(result) == result.text


def test_stream_equals_non_stream(model):
    full = model.generate("The king said", max_new_tokens=24)
    steps = list(model.generate("The king said", max_new_tokens=24, stream=True))
    assert "".join(map(str, steps)) == full.text and len(steps) > 1
    assert [s.token for s in steps if s.token is not None] == list(full.token_ids)
    assert all(s.finish_reason is None and s.result is None for s in steps[:-1])
    last = steps[-1].result
    assert steps[-1].finish_reason == full.finish_reason == last.finish_reason
    assert (last.text, last.token_ids, last.prompt_tokens) == (full.text, full.token_ids, full.prompt_tokens)


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.9)
    a = model.generate("The king said", seed=1, **kw)
    b = model.generate("The king said", seed=1, **kw)
    c = model.generate("The king said", seed=2, **kw)
    assert a.text == b.text and a.text != c.text


def test_stop_string_ends_generation(model):
    full = model.generate("The king said", max_new_tokens=40).text
    stop = full[5:8]
    assert stop and full.index(stop) >= 1
    result = model.generate("The king said", max_new_tokens=40, stop=[stop])
    assert result.text == full[: full.index(stop)] and result.finish_reason == "stop"


def test_max_tokens_and_context_window(model):
    result = model.generate("The king said", max_new_tokens=5)
    assert len(result.token_ids) <= 5
    long = "the king " * model.max_context
    with pytest.raises(ContextLengthError, match=r"prompt has \d+ tokens; the model's context window is 512"):
        model.generate(long, max_new_tokens=4)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                                 dict(top_k=-3), dict(max_new_tokens=-1), dict(seed=-5), dict(stop=[""])])
def test_bad_generation_parameters(model, bad):
    with pytest.raises(ValueError):
        model.generate("x", **bad)


def test_top_k_one_is_greedy():
    logits = np.random.default_rng(0).normal(size=100)
    s = Sampler(SamplingConfig(temperature=1.5, top_k=1, seed=3))
    assert all(s(logits) == int(np.argmax(logits)) for _ in range(20))


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=0))
    seen = {s(logits) for _ in range(300)}
    assert seen == {0, 1}


def test_cli_generate_on_demo(capsys):
    from edgeinfer.cli import main

    assert main(["generate", "Once upon a time", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")


def test_cli_prompt_too_long_is_one_line_error(capsys):
    from edgeinfer.cli import main

    assert main(["generate", "word " * 2000, "--max-new-tokens", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert "context window" in err and "\n" not in err
