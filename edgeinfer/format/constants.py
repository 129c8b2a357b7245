"""Names and numbers of the model-folder format that the exporter writes and the runtime reads.

One definition each: the alignment of weight data, the file names in a model folder, and
the graph's input and output names (what edgeinfer's executor and plain onnxruntime both
bind).
"""
from __future__ import annotations

import re

# Every tensor and every expert record starts on a 4 KiB boundary: O_DIRECT reads need
# offsets, lengths and buffers aligned to the device's logical block, and mmap to the page.
ALIGN = 4096

MANIFEST = "manifest.json"
GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"   # the Jinja chat template, when the checkpoint has one
WEIGHTS_FILE = "weights.bin"    # read whole at load: attention, norms, embeddings, checksums
FFN_FILE = "ffn.bin"            # bundled FFN records: what a memory budget streams
EXPERTS_FILE = "experts.bin"    # MoE expert records: likewise

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
_PAST_KEY = re.compile(r"past_key_values\.(\d+)\.key$")


def past_name(layer: int, kv: str) -> str:
    """Graph input holding layer `layer`'s cached keys or values (kv = "key" | "value")."""
    return f"{PAST_PREFIX}{layer}.{kv}"


def present_name(layer: int, kv: str) -> str:
    """Graph output holding layer `layer`'s keys or values after this step."""
    return f"{PRESENT_PREFIX}{layer}.{kv}"


def past_key_layer(name: str) -> int | None:
    """The layer of a past-key input name (`past_key_values.N.key` -> N); None for other names."""
    m = _PAST_KEY.match(name)
    return int(m.group(1)) if m else None


def find_multiple(n, k: int):
    """The smallest multiple of `k` that is >= `n` (ints or integer numpy arrays)."""
    return -(-n // k) * k
