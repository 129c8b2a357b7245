"""The Attention op two ways: its ONNX function body (export/functions.py) in plain
onnxruntime and the Numba kernels the runtime binds (runtime/executor/ops.py), with the
per-head q/k norm and the sliding window, over chunks that start after a cached past (what
generation alone does not cover: a multi-token step with past > 0 across the window edge)."""
from __future__ import annotations

import numpy as np
import pytest
from edgeinfer.export import functions
from onnx import TensorProto, helper

from edgeinfer import kernels

H, KVH, D, R = 4, 2, 16, 12
EPS = 1e-6


def _model(window: int, qk_norm: bool):
    names = ["q", "k", "v", "past_key", "past_value", "cos", "sin"] + (["q_norm", "k_norm"] if qk_norm else [])
    extra = {"qk_norm_epsilon": EPS} if qk_norm else {}
    node = helper.make_node("Attention", names, ["out", "present_key", "present_value"], domain=functions.DOMAIN,
                            num_heads=H, num_kv_heads=KVH, head_dim=D, rotary_dim=R, scale=D ** -0.5,
                            window=window, **extra)
    f = TensorProto.FLOAT
    graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info(n, f, None) for n in names],
                              [helper.make_tensor_value_info(n, f, None) for n in node.output])
    body = functions.attention(H, KVH, D, R, D ** -0.5, qk_norm_eps=EPS if qk_norm else None, windowed=True)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", functions.OPSET),
                                                   helper.make_opsetid(functions.DOMAIN, 1)],
                             functions=[body], ir_version=10)


def _numba(q, k, v, past_k, past_v, cos, sin, qn, kn, window):
    S, P = q.shape[0], past_k.shape[1]
    q3, k3 = q.reshape(S, H, D), k.reshape(S, KVH, D)
    if qn is not None:
        q3, k3 = kernels.rms_norm(q3, qn, EPS), kernels.rms_norm(k3, kn, EPS)
    q3, k3 = np.ascontiguousarray(q3), np.ascontiguousarray(k3)
    kernels.apply_rotary(q3, cos, sin, R)
    kernels.apply_rotary(k3, cos, sin, R)
    kc = np.concatenate([past_k, k3.transpose(1, 0, 2)], axis=1)
    vc = np.concatenate([past_v, v.reshape(S, KVH, D).transpose(1, 0, 2)], axis=1)
    return kernels.attention(q3, kc, vc, P, D ** -0.5, window).reshape(S, H * D)


@pytest.mark.parametrize("window", [0, 1, 4, 64])
@pytest.mark.parametrize("past, S", [(0, 9), (7, 5), (7, 1)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_kernel_matches_function_body(window, past, S, qk_norm):
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(past * 100 + S + window)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = r(S, H * D), r(S, KVH * D), r(S, KVH * D)
    pk, pv = r(KVH, past, D), r(KVH, past, D)
    ang = np.arange(past, past + S)[:, None] * (0.3 ** np.arange(R // 2))[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    qn, kn = (1 + 0.3 * r(D), 1 + 0.3 * r(D)) if qk_norm else (None, None)
    feed = {"q": q[None], "k": k[None], "v": v[None], "past_key": pk[None], "past_value": pv[None],
            "cos": cos[None], "sin": sin[None]}
    if qk_norm:
        feed.update(q_norm=qn, k_norm=kn)
    sess = ort.InferenceSession(_model(window, qk_norm).SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(["out"], feed)[0][0]
    got = _numba(q, k, v, pk, pv, cos, sin, qn, kn, window)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_window_hides_old_keys():
    """window=1: each query sees only its own key, so the output is its own value row."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 2, 8)).astype(np.float32)
    kc = rng.standard_normal((1, 5, 8)).astype(np.float32)
    vc = rng.standard_normal((1, 5, 8)).astype(np.float32)
    out = kernels.attention(q, kc, vc, 2, 0.5, 1)
    for s in range(3):
        np.testing.assert_allclose(out[s], np.broadcast_to(vc[0, 2 + s], (2, 8)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        kernels.attention(q, kc, vc, 2, 0.5, -1)
