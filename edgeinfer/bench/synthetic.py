"""Large SYNTHETIC models: Hugging Face checkpoints at real shapes (7B-like dense
ReLU Llama, Mixtral-like MoE) with few layers, whose activations behave like a
trained model's, exported with edgeinfer's own exporter into a model folder.

Random weights would give 50% zero FFN activations, no reuse between tokens and
uniform expert usage: the wrong workload for a streaming benchmark. The weights
here are built so that (measured and printed, see `ActivationStats`):
- 70-90% of FFN activations are zero, with hot and cold neurons: each neuron's
  firing rate is drawn from a skewed distribution and met exactly on
  calibration text, through a per-neuron offset along a constant ("massive
  activation") direction of the residual stream that every token carries;
- consecutive tokens reuse neurons: local attention heads (RoPE recency: q and k
  read that constant direction) add an average of the last few tokens to the
  residual stream, so hidden states are correlated in time (LLM in a flash §3.3);
- what a layer reads lives mostly in a few hundred "semantic" directions with a
  decaying spectrum, so a rank-64 predictor is useful but not perfect;
- MoE routers prefer some experts (usage drawn from a Zipf law per layer, or fitted to
  a given per-layer usage, e.g. a trained model's).
Everything is labelled synthetic: config.json (`edgeinfer_synthetic`), the
manifest's source, bench's title and JSON. Generated models go to /tmp or out/.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeinfer.errors import EdgeInferError, UnsupportedModelError
from edgeinfer.format.constants import MANIFEST, TOKENIZER_FILE
from edgeinfer.units import fmt_bytes

DEMO_TOKENIZER = Path(__file__).resolve().parent.parent / "demo" / "tokenizer.json"   # = the llama-relu-8m fixture's
VOCAB = 8192
SEMANTIC_DIMS = 128       # directions a layer mostly reads (decaying spectrum)
READ_RANK = 48            # dimension of what a layer's gates read
GATE_NOISE = 1.0          # full-rank part of the gates (what a low-rank predictor misses)


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    experts: int = 0
    top_k: int = 0
    rope_theta: float = 10000.0
    like: str = ""
    zero_fraction: float = 0.85   # mean fraction of zero FFN activations (dense shapes)

    def describe(self) -> str:
        moe = f", {self.experts} experts top-{self.top_k}" if self.experts else ""
        return f"hidden {self.hidden}, FFN {self.ffn}{moe}, heads {self.heads}/{self.kv_heads} ({self.like})"


SHAPES = {
    "7b-like": Shape(4096, 11008, 32, 32, like="Llama-2-7B / ReluLLaMA-7B, ReLU gated FFN"),
    "7b-wide": Shape(4096, 16384, 32, 8, like="hidden 4096, FFN 16384 as OPT-6.7B, GQA 8 kv heads, ReLU gated"),
    # ~90% zeros, as the trained fixtures' OPT layers 1-5 (true_active 0.09-0.13); LLM in a
    # flash reports 95-97% for OPT-6.7B
    "7b-wide-sparse": Shape(4096, 16384, 32, 8, zero_fraction=0.90,
                            like="7b-wide with 90% zero activations (as trained OPT/ReLU models)"),
    "mistral-like-sparse": Shape(4096, 14336, 32, 8, rope_theta=1e6, zero_fraction=0.90,
                                 like="Mistral-7B shapes, ReLU gated FFN, 90% zero activations"),
    "mixtral-like": Shape(4096, 14336, 32, 8, experts=8, top_k=2, rope_theta=1e6,
                          like="Mixtral-8x7B experts, SiLU"),
    "tiny": Shape(256, 1024, 4, 2, like="a small shape for tests"),
    "tiny-moe": Shape(256, 512, 4, 2, experts=8, top_k=2, like="a small MoE shape for tests"),
}


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"synthetic: {msg}", file=sys.stderr, flush=True)


# -- the float32 reference forward used to calibrate and measure -------------------------

def _rms(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Llama rotary embedding (rotate_half convention) of x [T, heads, hd]."""
    T, _, hd = x.shape
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    a, b = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _attention(x, wq, wk, wv, wo, H, KVH, theta):
    T, d = x.shape
    hd = wq.shape[0] // H
    q = _rope((x @ wq.T).reshape(T, H, hd), theta)
    k = _rope((x @ wk.T).reshape(T, KVH, hd), theta)
    v = (x @ wv.T).reshape(T, KVH, hd)
    out = np.empty((T, H, hd), np.float32)
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    for h in range(H):
        g = h // (H // KVH)
        s = q[:, h] @ k[:, g].T / np.sqrt(hd) + mask
        s = np.exp(s - s.max(1, keepdims=True))
        out[:, h] = (s / s.sum(1, keepdims=True)) @ v[:, g]
    return out.reshape(T, H * hd) @ wo.T


# -- statistics ------------------------------------------------------------------------

def activation_stats(active: np.ndarray, window: int = 5) -> dict:
    """active [T, F] bool: the FFN statistics LLM in a flash's windowing depends on."""
    T = active.shape[0]
    freq = active.mean(0)
    prev = (active[1:] & active[:-1]).sum() / max(active[1:].sum(), 1)
    new, size = [], []
    for t in range(window, T):
        win = active[t - window:t].any(0)
        new.append((active[t] & ~win).mean())
        size.append((win | active[t]).mean())
    return {"zero_fraction": round(1 - float(active.mean()), 4),
            "reuse_previous_token": round(float(prev), 4),
            f"new_per_token_window{window}": round(float(np.mean(new)), 4) if new else None,
            f"window{window}_size": round(float(np.mean(size)), 4) if size else None,
            "hot_neurons_over_50pct": round(float((freq > 0.5).mean()), 4),
            "dead_neurons": round(float((freq == 0).mean()), 4)}


# -- the generator -----------------------------------------------------------------------

class _Builder:
    def __init__(self, shape: Shape, seed: int):
        self.s = shape
        self.rng = np.random.default_rng(seed)
        d = shape.hidden
        r = min(SEMANTIC_DIMS, d // 2)
        self.r = r
        basis, _ = np.linalg.qr(self.rng.standard_normal((d, r + 1)).astype(np.float32))
        self.u = basis[:, 0].copy()              # the constant direction every token carries
        self.P = basis[:, 1:].T.copy()           # [r, d] semantic directions
        self.spectrum = (np.arange(1, r + 1, dtype=np.float32) ** -0.7)
        self.spectrum /= np.sqrt((self.spectrum ** 2).mean())

    def randn(self, *shape, scale=1.0):
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    def semantic(self, n: int) -> np.ndarray:
        """n random vectors in the semantic space, decaying spectrum, unit rms per direction."""
        return (self.randn(n, self.r) * self.spectrum) @ self.P

    def embedding(self) -> np.ndarray:
        d = self.s.hidden
        sem = self.semantic(VOCAB) / np.sqrt(self.r)
        noise = self.randn(VOCAB, d, scale=0.2 / np.sqrt(d))
        e = sem + noise + 1.2 * self.u[None, :]  # DC: u.x stays clearly positive after RMSNorm
        return (e / np.sqrt((e * e).mean(1, keepdims=True)) * 0.02).astype(np.float32)

    def attention(self, x: np.ndarray, h_rms: float) -> dict:
        """Half the heads local (q and k read u; rotary pairs turning 0.1-0.8 rad/token
        make the score fall with distance: the last few tokens), half broad (weak q:
        a near-uniform average). v reads, o writes the semantic directions."""
        s = self.s
        d, H, KVH = s.hidden, s.heads, s.kv_heads
        hd = d // H
        inv = 1.0 / s.rope_theta ** (np.arange(0, hd, 2) / hd)
        band = ((inv > 0.1) & (inv < 0.8)).astype(np.float32) + 0.02
        w = np.concatenate([band, band])
        w /= np.linalg.norm(w)
        dc = float(np.mean(x @ self.u))
        root = np.sqrt(np.sqrt(hd)) / dc            # score = kappa * S(distance), S(0) = 1
        wk = np.zeros((KVH * hd, d), np.float32)
        wq = np.zeros((H * hd, d), np.float32)
        for g in range(KVH):
            wk[g * hd:(g + 1) * hd] = np.outer(w, self.u) * root
        for h in range(H):
            kappa = 8.0 if h % 2 == 0 else 0.5
            wq[h * hd:(h + 1) * hd] = np.outer(w, self.u) * root * kappa
        wq += self.randn(H * hd, self.r, scale=0.5 / np.sqrt(self.r) / dc) @ self.P
        wv = self.randn(KVH * hd, self.r, scale=1 / np.sqrt(self.r)) @ self.P
        wo = self.P.T @ self.randn(self.r, H * hd, scale=1 / np.sqrt(H * hd))
        wo += self.randn(d, H * hd, scale=0.05 / np.sqrt(H * hd))
        out = _attention(x, wq, wk, wv, wo, H, KVH, s.rope_theta)
        wo *= 1.0 * h_rms / np.sqrt((out * out).mean())
        return {"q": wq, "k": wk, "v": wv, "o": wo}

    def ffn(self, x: np.ndarray, calib: slice, h_rms: float, mean_rate: float) -> tuple[dict, np.ndarray, np.ndarray]:
        """Gated ReLU FFN whose neurons fire at skewed, calibrated rates."""
        d, F = self.s.hidden, self.s.ffn
        # Gates read a READ_RANK-dimensional part of the semantic space (so a rank-64
        # predictor can learn them) plus a full-rank part it cannot.
        read = self.randn(READ_RANK, self.r, scale=1 / np.sqrt(self.r)) @ self.P
        gate = self.randn(F, READ_RANK, scale=1 / np.sqrt(READ_RANK)) @ read
        gate += self.randn(F, d, scale=GATE_NOISE / np.sqrt(d))
        z = x @ gate.T
        dc = x @ self.u                                          # > 0 for every token
        ratio = z[calib] / dc[calib, None]
        a = 0.55
        rates = np.clip(self.rng.beta(a, a * (1 - mean_rate) / mean_rate, F), 0.002, 0.98)
        beta = _column_quantiles(ratio, 1 - rates)
        gate -= beta[:, None].astype(np.float32) * self.u[None, :]
        up = self.randn(F, d, scale=1 / np.sqrt(d))
        down = self.P.T @ self.randn(self.r, F, scale=1 / np.sqrt(self.r))
        down += self.randn(d, F, scale=0.05 / np.sqrt(F))
        act = np.maximum(x @ gate.T, 0) * (x @ up.T)
        out = act @ down.T
        scale = 0.5 * h_rms / np.sqrt((out * out).mean())
        down *= scale
        return {"gate": gate, "up": up, "down": down}, out * scale, act != 0

    def moe(self, x: np.ndarray, calib: slice, h_rms: float,
            target_usage: list[float] | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
        """Mixtral block: router with skewed expert usage (`target_usage`, else Zipf), SiLU experts."""
        d, F, E, K = self.s.hidden, self.s.ffn, self.s.experts, self.s.top_k
        if target_usage is None:
            target = 1.0 / np.arange(1, E + 1) ** 1.1
            target = self.rng.permutation(target / target.sum())
        else:
            target = np.asarray(target_usage, np.float64) + 0.01      # every expert used a little
            target /= target.sum()
        router = self.randn(E, self.r, scale=1 / np.sqrt(self.r)) @ self.P
        dc = x @ self.u
        bias = np.zeros(E, np.float32)
        for _ in range(60):                                      # fit the usage on calibration rows
            logits = x[calib] @ router.T + dc[calib, None] * bias
            top = np.argsort(-logits, 1)[:, :K]
            usage = np.bincount(top.ravel(), minlength=E) / top.size
            bias += 0.5 * np.log((target + 1e-3) / (usage + 1e-3)) / max(float(dc[calib].mean()), 1e-6)
        router += bias[:, None] * self.u[None, :]
        logits = x @ router.T
        top = np.argsort(-logits, 1)[:, :K]
        w = np.take_along_axis(logits, top, 1)
        w = np.exp(w - w.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        out = np.zeros_like(x)
        experts = []
        for e in range(E):
            w1 = self.randn(F, d, scale=1 / np.sqrt(d))
            w3 = self.randn(F, d, scale=1 / np.sqrt(d))
            w2 = (self.P.T @ self.randn(self.r, F, scale=1 / np.sqrt(self.r))).astype(np.float32)
            rows, slot = np.nonzero(top == e)
            if rows.size:
                g = x[rows] @ w1.T
                hmid = g / (1 + np.exp(-g)) * (x[rows] @ w3.T)
                out[rows] += w[rows, slot, None] * (hmid @ w2.T)
            experts.append({"w1": w1.astype(np.float16), "w2": w2, "w3": w3.astype(np.float16)})
        scale = 0.6 * h_rms / max(float(np.sqrt((out * out).mean())), 1e-12)
        for ex in experts:
            ex["w2"] = (ex["w2"] * scale).astype(np.float16)
        return {"router": router, "experts": experts}, out * scale, top


def _column_quantiles(m: np.ndarray, qs: np.ndarray) -> np.ndarray:
    s = np.sort(m, axis=0)
    idx = np.clip(np.round(qs * (m.shape[0] - 1)).astype(int), 0, m.shape[0] - 1)
    return s[idx, np.arange(m.shape[1])]


def _text_ids(n: int, offset_fraction: float) -> list[int]:
    from edgeinfer.export.predictors import CALIBRATION_TEXT
    from edgeinfer.runtime.tokenizer import Tokenizer
    text = CALIBRATION_TEXT.read_text()
    start = int(len(text) * offset_fraction)
    ids = Tokenizer(DEMO_TOKENIZER).encode(text[start:start + 40 * n])
    if len(ids) < n:
        raise EdgeInferError("calibration text too short for the synthetic generator")
    return ids[:n]


def write_checkpoint(folder: str | os.PathLike, shape: str = "7b-like", *, layers: int = 2, ffn: int | None = None,
                     hidden: int | None = None, experts: int | None = None,
                     expert_usage: list[list[float]] | None = None, seed: int = 0, tokens: int = 256,
                     force: bool = False, progress: bool = True) -> dict:
    """Write the synthetic checkpoint to `folder`; returns the measured statistics.

    ffn, hidden, experts override the shape's; expert_usage (MoE shapes): the fraction of
    tokens routed to each expert, one list per layer (reused cyclically over the layers),
    that the routers are fitted to instead of a Zipf law."""
    from safetensors.numpy import save_file
    if shape not in SHAPES:
        raise EdgeInferError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if layers < 1:
        raise EdgeInferError("--layers must be at least 1")
    overrides = {k: int(v) for k, v in (("ffn", ffn), ("hidden", hidden), ("experts", experts)) if v is not None}
    sh = Shape(**{**asdict(SHAPES[shape]), **overrides})
    if sh.hidden % (2 * sh.heads):
        raise EdgeInferError(f"hidden {sh.hidden} is not a multiple of 2 x the {shape} shape's {sh.heads} heads "
                             "(rotary embeddings need an even head size)")
    if sh.experts and sh.top_k > sh.experts:
        raise EdgeInferError(f"{sh.experts} experts are fewer than the {shape} shape's top-{sh.top_k} routing")
    if expert_usage is not None and (not sh.experts or any(len(u) < sh.experts for u in expert_usage)):
        raise EdgeInferError(f"expert_usage needs a MoE shape and at least {sh.experts} fractions per layer")
    folder = Path(folder)
    if folder.exists():
        if not force:
            raise EdgeInferError(f"{folder} exists; pass --force to replace it")
        shutil.rmtree(folder)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    b = _Builder(sh, seed)
    t0 = time.perf_counter()
    _say(progress, f"{shape}: {sh.describe()}, {layers} layers -> {folder}")
    embed = b.embedding()
    calib_ids = _text_ids(tokens, 0.0)
    held_ids = _text_ids(tokens, 0.6)
    hs = [embed[calib_ids], embed[held_ids]]         # residual streams: calibration, held-out
    calib = slice(0, tokens)
    n_shards = layers + 1
    weight_map = {}

    def save(tensors: dict, idx: int):
        name = f"model-{idx:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: np.ascontiguousarray(v.astype(np.float16)) for k, v in tensors.items()}, str(tmp / name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    save({"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(sh.hidden, np.float32)}, 1)
    stats = {"layers": []}
    for i in range(layers):
        p = f"model.layers.{i}."
        h_rms = float(np.sqrt(np.mean(hs[0] ** 2)))
        both = np.concatenate(hs)
        attn_in = _rms(both)
        aw = b.attention(attn_in[:tokens], h_rms)
        outs = [_attention(_rms(h), aw["q"], aw["k"], aw["v"], aw["o"], sh.heads, sh.kv_heads, sh.rope_theta)
                for h in hs]
        hs = [h + o for h, o in zip(hs, outs)]
        x = _rms(np.concatenate(hs))
        h_rms = float(np.sqrt(np.mean(hs[0] ** 2)))
        tensors = {p + "input_layernorm.weight": np.ones(sh.hidden, np.float32),
                   p + "post_attention_layernorm.weight": np.ones(sh.hidden, np.float32),
                   p + "self_attn.q_proj.weight": aw["q"], p + "self_attn.k_proj.weight": aw["k"],
                   p + "self_attn.v_proj.weight": aw["v"], p + "self_attn.o_proj.weight": aw["o"]}
        if sh.experts:
            target = None if expert_usage is None else expert_usage[i % len(expert_usage)][:sh.experts]
            mw, out, top = b.moe(x, calib, h_rms, target)
            tensors[p + "block_sparse_moe.gate.weight"] = mw["router"]
            for e, ex in enumerate(mw["experts"]):
                for k, v in ex.items():
                    tensors[p + f"block_sparse_moe.experts.{e}.{k}.weight"] = v
            usage = np.bincount(top[tokens:].ravel(), minlength=sh.experts) / top[tokens:].size
            st = {"expert_usage": [round(float(u), 3) for u in usage]}
        else:
            fw, out, active = b.ffn(x, calib, h_rms, mean_rate=1.0 - sh.zero_fraction)
            tensors.update({p + "mlp.gate_proj.weight": fw["gate"], p + "mlp.up_proj.weight": fw["up"],
                            p + "mlp.down_proj.weight": fw["down"]})
            st = activation_stats(active[tokens:])
        hs = [hs[0] + out[:tokens], hs[1] + out[tokens:]]
        st["layer"] = i
        stats["layers"].append(st)
        save(tensors, i + 2)
        _say(progress, f"layer {i}: " + ", ".join(f"{k} {v}" for k, v in st.items() if k != "layer")
             + f" ({time.perf_counter() - t0:.0f} s)")
    stats.update(_summary(stats["layers"]))
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    info = {"generator": "edgeinfer.bench.synthetic", "shape": shape, "like": sh.like, "seed": seed,
            "layers": layers, "note": "SYNTHETIC weights: shapes of a real model, statistics imitated; "
                                      "not a trained model", "stats": stats}
    (tmp / "config.json").write_text(json.dumps(_hf_config(sh, layers) | {"edgeinfer_synthetic": info}, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0,
                                                            "pad_token_id": 1}, indent=1))
    shutil.copyfile(DEMO_TOKENIZER, tmp / TOKENIZER_FILE)
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                           "pad_token": "<|pad|>"}, indent=1))
    (tmp / "README.md").write_text(f"# SYNTHETIC checkpoint ({shape})\n\nWritten by `edgeinfer bench synthetic`. "
                                   "Random weights shaped to imitate a trained model's activation statistics; "
                                   "it does not model language. Do not commit.\n")
    os.rename(tmp, folder)
    return info


def _summary(layers: list[dict]) -> dict:
    keys = [k for k in layers[0] if k != "layer" and isinstance(layers[0][k], (int, float))]
    return {f"mean_{k}": round(float(np.mean([s[k] for s in layers if s.get(k) is not None])), 4) for k in keys}


def _hf_config(sh: Shape, layers: int) -> dict:
    common = {"hidden_size": sh.hidden, "intermediate_size": sh.ffn, "num_hidden_layers": layers,
              "num_attention_heads": sh.heads, "num_key_value_heads": sh.kv_heads, "head_dim": sh.hidden // sh.heads,
              "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": sh.rope_theta, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
              "pad_token_id": 1, "torch_dtype": "float16", "attention_bias": False, "mlp_bias": False}
    if sh.experts:
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
                "num_local_experts": sh.experts, "num_experts_per_tok": sh.top_k, "sliding_window": None,
                **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "relu", **common}


def label_manifest(model_dir: Path, info: dict) -> None:
    """Mark the exported folder's manifest source as synthetic (atomic rewrite;
    manifest.json is not in its own checksummed file table)."""
    path = Path(model_dir) / MANIFEST
    m = json.loads(path.read_text())
    m.setdefault("source", {})["synthetic"] = info
    tmp = path.with_suffix(".json.partial-tmp")
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, path)


def make_synthetic(out: str | os.PathLike, *, shape: str = "7b-like", layers: int = 2, ffn: int | None = None,
                   quant: str = "int4", calibration_tokens: int = 4096, seed: int = 0, export_model: bool = True,
                   force: bool = False, progress: bool = True) -> dict:
    """Checkpoint at OUT.hf, exported model at OUT (with predictors). Returns the synthetic info."""
    out = Path(out)
    ckpt = out.with_name(out.name + ".hf")
    info = write_checkpoint(ckpt, shape, layers=layers, ffn=ffn, seed=seed, force=force, progress=progress)
    _say(progress, f"checkpoint written: {ckpt}")
    if not export_model:
        return info
    try:
        from edgeinfer.export.exporter import export
    except ImportError as exc:
        raise EdgeInferError(f"exporting needs the export extra ({exc}): pip install 'edgeinfer[export]'") from None
    moe = SHAPES[shape].experts > 0
    try:
        export(ckpt, out, quant=quant, predictors=not moe, calibration_tokens=calibration_tokens, force=force,
               progress=progress)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{exc}; the synthetic checkpoint is at {ckpt} (export it once the exporter "
                                    "supports it)") from None
    label_manifest(out, info)
    m = json.loads((out / MANIFEST).read_text())
    for st in m.get("predictors") or []:
        _say(progress, f"{st['layer']}: exported model true_active {st['true_active']}, predictor selects "
                       f"{st['predicted_active']} (recall {st['recall']}, precision {st['precision']})")
    files = ", ".join(f"{f['path']} {fmt_bytes(f['size'])}" for f in m["files"] if f["path"].endswith(".bin"))
    _say(progress, f"model written: {out} ({files})")
    print(json.dumps(info["stats"], indent=1))
    return info
