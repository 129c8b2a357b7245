"""`edgeinfer export`: a Hugging Face checkpoint folder -> an edgeinfer model folder."""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

from edgeinfer.export.archs import Weights, arch_module
from edgeinfer.export.chat import read_chat
from edgeinfer.export.checkpoint import Checkpoint
from edgeinfer.export.config import model_config, read_hf_config
from edgeinfer.export.decoder import build_decoder
from edgeinfer.export.graph import GraphBuilder
from edgeinfer.export.writer import ModelFolderWriter

from edgeinfer import __version__
from edgeinfer.errors import CheckpointError, EdgeInferError
from edgeinfer.format.constants import CHAT_TEMPLATE_FILE, TOKENIZER_FILE
from edgeinfer.format.manifest import SAMPLING_KEYS
from edgeinfer.format.quant import (
    EXPERT_LOW_QUANTS,
    QUANT_ALIASES,
    QUANT_BITS,
    WEIGHT_QUANTS,
)
from edgeinfer.progress import Progress


def export(src: str | os.PathLike, out: str | os.PathLike, *, quant: str = "int4", group_size: int = 32,
           bundle: bool = True, predictors: bool = False, predictor_rank: int = 64,
           predictor_recall: float = 0.95, calibration_tokens: int = 16384,
           expert_low: str | None = None, force: bool = False, progress: bool = True) -> Path:
    """Export checkpoint folder `src` to model folder `out`; returns `out`.

    Every input is checked before the output is touched; the folder appears
    under its final name only once complete (see writer.py).
    expert_low: MoE models only: also store a low-precision copy of each expert ("int4",
    "int2"), nested in the high one where it can be (edgeinfer/format/experts.py).
    """
    src = Path(src)
    if QUANT_ALIASES.get(quant, quant) not in WEIGHT_QUANTS:
        raise EdgeInferError(f"unknown --quant {quant!r}; choose one of {', '.join(WEIGHT_QUANTS)}")
    if group_size not in (16, 32, 64, 128, 256):
        raise EdgeInferError(f"--group-size must be 16, 32, 64, 128 or 256, not {group_size}")
    hf = read_hf_config(src)
    cfg = model_config(hf)
    arch = arch_module(cfg.family)
    if expert_low is not None:
        _check_expert_low(expert_low, quant, cfg)
    tokenizer = src / TOKENIZER_FILE
    if not tokenizer.exists():
        raise CheckpointError(f"{src} has no {TOKENIZER_FILE} (edgeinfer needs a Hugging Face fast tokenizer file)")
    chat_template, special_tokens = read_chat(src)
    generation = _generation_defaults(src, cfg)
    ckpt = Checkpoint(src)
    bits = _weight_bits(quant)
    for dim, what in ((cfg.hidden_size, "hidden_size"), (cfg.ffn_dim, "ffn_dim"),
                      (cfg.num_heads * cfg.head_dim, "num_heads*head_dim")):
        if bits is not None and dim % group_size:
            raise EdgeInferError(f"{what}={dim} is not a multiple of --group-size {group_size}")
    writer = ModelFolderWriter(out, force=force)
    try:
        b = GraphBuilder(writer, bits=bits, group_size=group_size)
        weights = Weights(ckpt, arch.TABLE)
        with Progress(cfg.num_layers, f"export {src.name} ({quant})", enabled=progress) as bar:
            ffn = getattr(arch, "ffn", None)
            ffn = partial(ffn, expert_low=expert_low) if ffn else (_bundled if bundle else _dense)
            build_decoder(b, cfg, weights, ffn=ffn, progress=bar)
        model = b.model(doc=f"{cfg.source_architecture} exported by edgeinfer {__version__}")
        writer.copy_file(tokenizer, TOKENIZER_FILE)
        chat = {"special_tokens": special_tokens}
        if chat_template is not None:
            (writer.tmp / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
            chat["template"] = CHAT_TEMPLATE_FILE
        manifest = {
            "created_by": f"edgeinfer {__version__}",
            "source": {"folder": src.name, "architecture": cfg.source_architecture,
                       "dtype": hf.get("dtype") or hf.get("torch_dtype") or ckpt.source_dtype()},
            "config": cfg.to_dict(),
            "quantization": {"weights": quant, "group_size": group_size if bits else None,
                             "embeddings": "f16" if bits is None else "int8",
                             "scheme": "symmetric, MatMulNBits layout" if bits else "float16",
                             "expert_low": expert_low, "relative_error": b.quant_report},
            "ffn_layout": "moe" if cfg.is_moe else "bundled" if bundle else "matmul",
            "tokenizer": TOKENIZER_FILE,
            "generation": generation,
            "chat": chat,
        }
        if predictors:
            if not bundle:
                raise EdgeInferError("--predictors needs the bundled FFN layout")
            from edgeinfer.export.predictors import train_predictors
            writer.stage(model, manifest)
            windows = -(-calibration_tokens // 256)
            with Progress(windows, "train predictors", enabled=progress) as bar:
                manifest["predictors"] = train_predictors(
                    writer.tmp, b, rank=predictor_rank, recall=predictor_recall, tokens=calibration_tokens,
                    progress=bar)
            model = b.model(doc=f"{cfg.source_architecture} exported by edgeinfer {__version__}")
        return writer.commit(model, manifest)
    except BaseException:
        writer.abort()
        raise


def _check_expert_low(low: str, quant: str, cfg) -> None:
    if not cfg.is_moe:
        raise EdgeInferError(f"--expert-low applies to mixture-of-experts models; {cfg.source_architecture} has "
                             "no experts")
    if low not in EXPERT_LOW_QUANTS or QUANT_BITS[low] >= QUANT_BITS[QUANT_ALIASES.get(quant, quant)]:
        raise EdgeInferError(f"--expert-low {low} must be {' or '.join(EXPERT_LOW_QUANTS)} and below --quant {quant}")


def _weight_bits(quant: str) -> int | None:
    """Bits per quantized weight; None for float16 (the graph builder's convention)."""
    bits = QUANT_BITS[QUANT_ALIASES.get(quant, quant)]
    return None if bits == 16 else bits


def _dense(b, cfg, w, i, x, prefix):
    from edgeinfer.export import decoder
    return decoder.dense_ffn(b, cfg, w, i, x, prefix)


def _bundled(b, cfg, w, i, x, prefix):
    from edgeinfer.export import decoder
    return decoder.bundled_ffn(b, cfg, w, i, x, prefix)


def _generation_defaults(src: Path, cfg) -> dict:
    """The context window, special token ids and sampling defaults, from config.json and
    generation_config.json (whose eos_token_id may be a list: chat models end a turn with
    a token of their own, e.g. Llama 3's <|eot_id|> beside <|end_of_text|>)."""
    gen = {"max_context": cfg.max_position_embeddings, "eos_token_ids": list(cfg.eos_token_ids),
           "bos_token_id": cfg.bos_token_id}
    path = src / "generation_config.json"
    if not path.exists():
        return gen
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): fix or remove it") from None
    if not isinstance(g, dict):
        raise CheckpointError(f"{path} must hold a JSON object: fix or remove it")
    for key in SAMPLING_KEYS:
        value = g.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            gen[key] = value
    if g.get("do_sample") is False:
        gen["temperature"] = 0.0     # transformers samples only with do_sample; otherwise it is greedy
    eos = g.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not all(isinstance(t, int) and 0 <= t < cfg.vocab_size for t in eos):
        raise CheckpointError(f"{path}: eos_token_id {g.get('eos_token_id')!r} must be token ids below the "
                              f"vocabulary size {cfg.vocab_size}: fix the file")
    gen["eos_token_ids"] = sorted(set(gen["eos_token_ids"]) | set(eos))
    if isinstance(g.get("bos_token_id"), int) and gen["bos_token_id"] is None:
        gen["bos_token_id"] = g["bos_token_id"]
    return gen
