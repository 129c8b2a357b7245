"""Row-column bundles (LLM in a flash §3.2): FFN neuron i's gate row, up row and
down column, with their quantization scales, stored as one contiguous record, so
loading a neuron is one read and adjacent active neurons coalesce into one.

Record of neuron i (d = hidden size, g = group size, b = bits):
  quantized (b = 8 or 4):  [gate q | up q | down q | gate s | up s | down s | pad]
      q: d*b/8 bytes, codes q = round(w/s) + 2**(b-1), for b=4 element 2j in the low
         nibble (the MatMulNBits order); s: d/g float16 scales; gate parts only if gated
  float16 (b = 16):        [gate | up | down] as float16 values (a float16 tensor [F, k*d])
Records are padded to a multiple of 64 bytes. The whole layer's FFN is one
initializer [F, record] in ffn.bin: resident mode and plain onnxruntime decode it
with the BundledFFN function body; streaming mode reads rows of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeinfer.format.constants import find_multiple
from edgeinfer.format.quant import dequantize

RECORD_PAD = 64


@dataclass(frozen=True)
class BundleLayout:
    hidden: int
    ffn: int
    bits: int          # 8, 4, or 16 (float16, no scales)
    group_size: int
    gated: bool

    @property
    def parts(self) -> int:
        return 3 if self.gated else 2

    @property
    def q_bytes(self) -> int:       # one quantized vector
        return self.hidden * self.bits // 8

    @property
    def n_groups(self) -> int:
        return self.hidden // self.group_size

    @property
    def scale_offset(self) -> int:
        return self.parts * self.q_bytes

    @property
    def record_bytes(self) -> int:
        if self.bits == 16:
            return self.parts * self.hidden * 2
        raw = self.parts * (self.q_bytes + 2 * self.n_groups)
        return find_multiple(raw, RECORD_PAD)

    @property
    def dtype(self):
        return np.float16 if self.bits == 16 else np.uint8

    @property
    def row_shape(self) -> tuple[int, int]:
        """Shape of the bundle initializer."""
        if self.bits == 16:
            return (self.ffn, self.parts * self.hidden)
        return (self.ffn, self.record_bytes)

    def to_dict(self) -> dict:
        return {"hidden": self.hidden, "ffn": self.ffn, "bits": self.bits, "group_size": self.group_size,
                "gated": self.gated, "record_bytes": self.record_bytes}

    @classmethod
    def from_attrs(cls, a: dict) -> "BundleLayout":
        return cls(int(a["hidden"]), int(a["ffn"]), int(a["bits"]), int(a["group_size"]), bool(a["gated"]))


def encode(layout: BundleLayout, gate, up, down, quantize) -> np.ndarray:
    """gate/up [F, d] (rows), down [d, F] (nn.Linear layout; its columns are bundled).
    `quantize(w, bits, group)` is the exporter's group-wise quantizer."""
    vectors = ([gate] if layout.gated else []) + [up, np.ascontiguousarray(down.T)]
    if layout.bits == 16:
        return np.concatenate([v.astype(np.float16) for v in vectors], axis=1)
    out = np.zeros((layout.ffn, layout.record_bytes), dtype=np.uint8)
    qs, ss = [], []
    for v in vectors:
        packed, scales = quantize(v, layout.bits, layout.group_size)
        qs.append(packed.reshape(layout.ffn, -1))
        ss.append(scales.astype(np.float16).view(np.uint8).reshape(layout.ffn, -1))
    body = np.concatenate(qs + ss, axis=1)
    out[:, :body.shape[1]] = body
    return out


def decode(layout: BundleLayout, records: np.ndarray) -> list[np.ndarray]:
    """Reference decode of records [n, R] -> [gate?, up, down_cols] each float32 [n, d]."""
    n, d = records.shape[0], layout.hidden
    if layout.bits == 16:
        return [records[:, j * d:(j + 1) * d].astype(np.float32) for j in range(layout.parts)]
    out = []
    for j in range(layout.parts):
        q = records[:, j * layout.q_bytes:(j + 1) * layout.q_bytes]
        so = layout.scale_offset + j * 2 * layout.n_groups
        s = np.ascontiguousarray(records[:, so:so + 2 * layout.n_groups]).view(np.float16).astype(np.float32)
        blocks = q.reshape(n, layout.n_groups, layout.q_bytes // layout.n_groups)
        out.append(dequantize(blocks, s, layout.bits))
    return out
