"""One error contract: every failure a user can cause through load, generate or forward
is an EdgeInferError (argument errors also ValueError), and every warning an EdgeInferWarning."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import edgeinfer
from edgeinfer import errors
from edgeinfer.errors import EdgeInferError, InternalError, InvalidArgumentError
from edgeinfer.runtime.sampling import SamplingConfig


@pytest.fixture(scope="module")
def model():
    return edgeinfer.load()   # the built-in demo model


@pytest.mark.parametrize("kw, message", [
    (dict(verify="x"), "unknown verify mode 'x'"),
    (dict(backend="x"), "unknown backend 'x'"),
    (dict(mode="x"), "unknown mode 'x'"),
    (dict(activations="int4"), "unknown activations 'int4'"),
    (dict(window=-1), "window must be"),
    (dict(threshold="high"), "threshold must be a probability"),
    (dict(io_threads="many"), "io_threads must be"),
    (dict(windw=3), "unknown option windw; load.. takes mode, window"),
])
def test_bad_load_arguments(kw, message):
    with pytest.raises(InvalidArgumentError, match=message) as exc:
        edgeinfer.load(**kw)
    assert isinstance(exc.value, EdgeInferError) and isinstance(exc.value, ValueError)


def test_bad_forward_arguments(model):
    with pytest.raises(InvalidArgumentError, match="at least one token"):
        model.forward([], model.new_cache())
    with pytest.raises(InvalidArgumentError, match=r"token ids must be in 0\.\.\d+"):
        model.forward([model.config.vocab_size], model.new_cache())


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=-1),
                                dict(seed=-1), dict(stop=[""]), dict(repetition_penalty=0)])
def test_bad_sampling_arguments(model, kw):
    with pytest.raises(InvalidArgumentError):
        SamplingConfig(**kw)
    with pytest.raises(EdgeInferError):
        model.generate("x", **kw)


def test_bad_prompts_raise_at_the_call(model):
    with pytest.raises(InvalidArgumentError, match="prompt must be a str"):
        model.generate(b"bytes")
    with pytest.raises(errors.ContextLengthError):
        model.generate("the king " * model.max_context, stream=True)   # before any step is taken


def test_neuron_window_overflow_is_an_internal_error():
    from edgeinfer.streaming.ffn.window import NeuronWindow
    w = NeuronWindow(ffn=8, record_bytes=16, capacity=2, window=0)
    w.reserve(np.array([0, 1]))
    with pytest.raises(InternalError, match="neuron window overflow.*please report") as exc:
        w.reserve(np.array([2]))
    assert isinstance(exc.value, EdgeInferError) and isinstance(exc.value, RuntimeError)


def test_reading_a_closed_weight_file(tmp_path):
    from edgeinfer.io import WeightFile
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(8192))
    wf = WeightFile(path)
    wf.close()
    with pytest.raises(errors.ModelClosedError, match="closed.*load it again") as exc:
        wf.read(0, 10)
    assert isinstance(exc.value, EdgeInferError) and isinstance(exc.value, ValueError)


def test_one_warning_family():
    for name in ("BufferedFallbackWarning", "ActivationsWarning", "ProviderWarning", "ConstantFoldingWarning"):
        assert issubclass(getattr(errors, name), errors.EdgeInferWarning), name
    assert issubclass(errors.EdgeInferWarning, UserWarning)
    # the categories they had before stay, so existing filters keep matching
    assert issubclass(errors.BufferedFallbackWarning, RuntimeWarning)
    assert issubclass(errors.ConstantFoldingWarning, ResourceWarning)


def test_provider_aliases():
    pytest.importorskip("onnxruntime")
    from edgeinfer.runtime.executor.providers import (
        CPU,
        expand_alias,
        resolve_providers,
    )
    assert expand_alias("cuda") == "CUDAExecutionProvider" and expand_alias("tensorrt") == "TensorrtExecutionProvider"
    assert expand_alias(("cuda", {"device_id": 1})) == ("CUDAExecutionProvider", {"device_id": 1})
    assert resolve_providers("cpu") == resolve_providers(["CPUExecutionProvider"]) == [CPU]
    with pytest.raises(InvalidArgumentError, match="short one: cpu, cuda, tensorrt"):
        resolve_providers(["CUDA"])


def test_concurrent_generate_calls_get_their_own_results(model):
    """Two threads generate on one Model at once; each gets its own result, equal to a lone call's."""
    prompts = ["The king said", "Once upon a time there was"]
    alone = {p: model.generate(p, max_new_tokens=12) for p in prompts}
    got = {}
    barrier = threading.Barrier(len(prompts))

    def work(p):
        barrier.wait()
        got[p] = model.generate(p, max_new_tokens=12)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[prompts[0]] is not got[prompts[1]]
    for p in prompts:
        assert (got[p].text, got[p].token_ids, got[p].finish_reason, got[p].prompt_tokens) == (
            alone[p].text, alone[p].token_ids, alone[p].finish_reason, alone[p].prompt_tokens)
    assert not hasattr(model, "last_completion")
