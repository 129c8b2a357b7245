"""Expert records: how one MoE expert is stored, shared by the exporter and the runtime.

An expert is three matrices in nn.Linear layout (rows = outputs): gate [F, d], up [F, d],
down [d, F]. Each (layer, expert, precision) is ONE contiguous record, 4 KiB-aligned, so a
cache miss is one read (docs/ARCHITECTURE.md, "The model folder"). A layer's records are the rows of one
initializer in experts.bin, `experts` [E, record_bytes] (uint8; float16 [E, record_bytes/2]
for float16 experts), plus `experts_low` [E, low_record_bytes] when the low copy is stored
beside a float16 high copy.

Nested (matryoshka) precision. A quantized record is a sequence of *stages*, each a
group-wise quantization of what the stages before it left over (residual quantization):

    w  ~=  deq(stage 0) + deq(stage 1) + ...

The low precision is stage 0 alone, and it is a *prefix* of the record; the high precision
is the sum of all stages. So nothing is stored twice, a low-precision miss reads only the
prefix, and upgrading a cached low copy to high reads only the rest. Stages by export:

    --quant int8 --expert-low int4  ->  stages (4, 4)      low = first 1/2 of the record
    --quant int8 --expert-low int2  ->  stages (2, 2, 4)   low = first ~1/4
    --quant int4 --expert-low int2  ->  stages (2, 2)      low = first 1/2
    --quant int8 | int4 (no low)    ->  stages (8,) | (4,)
    --quant f16  [--expert-low b]   ->  stages (16,) [+ a separate b-bit record in experts_low]

Stage part (each matrix m = gate, up, down is [n, k] = [d_out, d_in]; g = group size;
b = stage bits), every piece starting on a 64-byte boundary, the part padded to 4 KiB:

    [codes(gate) | scales(gate) | codes(up) | scales(up) | codes(down) | scales(down) | pad]

    codes(m):  uint8 [n, k/g, g*b/8] and scales(m): float32 [n, k/g] -- exactly the
               MatMulNBits layout of edgeinfer/format/quant.py (code = round(w/s) + 2**(b-1); for
               4 bits value 2j in the low nibble), so the runtime hands views of a cached
               record straight to kernels.matmul_nbits. (float32 scales cost 1 bit per
               weight at g = 32, float16 would cost half that, but the shared kernels take
               float32 and a per-token conversion would cost more than the bytes saved.)
    b = 16:    [gate | up | down] as float16 values, no scales.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edgeinfer.format.constants import ALIGN, find_multiple
from edgeinfer.format.quant import QUANT_BITS, dequantize

PIECE_ALIGN = 64    # every piece of a stage part starts on a cache line
STAGES = {  # (high quant, low) -> stages of the nested record
    ("int8", None): (8,), ("int4", None): (4,), ("f16", None): (16,),
    ("int8", "int4"): (4, 4), ("int8", "int2"): (2, 2, 4), ("int4", "int2"): (2, 2),
    ("f16", "int4"): (16,), ("f16", "int2"): (16,),
}
HIGH, LOW = "high", "low"


def _pad_piece(n: int) -> int:
    return find_multiple(n, PIECE_ALIGN)


@dataclass(frozen=True)
class RecordFormat:
    """A record of stages; `decode`/kernels may use only its first `levels` stages."""
    hidden: int
    ffn: int
    stages: tuple[int, ...]
    group_size: int

    def shapes(self) -> tuple[tuple[int, int], ...]:
        d, f = self.hidden, self.ffn
        return ((f, d), (f, d), (d, f))

    def _pieces(self, bits: int) -> list[tuple[int, int]]:
        """(codes bytes, scales bytes) of each matrix in a stage part."""
        if bits == 16:
            return [(2 * n * k, 0) for n, k in self.shapes()]
        return [(n * k * bits // 8, 4 * n * (k // self.group_size)) for n, k in self.shapes()]

    def stage_bytes(self, bits: int) -> int:
        return find_multiple(sum(_pad_piece(c) + _pad_piece(sc) for c, sc in self._pieces(bits)), ALIGN)

    def stage_offsets(self) -> list[int]:
        out, at = [], 0
        for b in self.stages:
            out.append(at)
            at += self.stage_bytes(b)
        return out

    def prefix_bytes(self, levels: int) -> int:
        return sum(self.stage_bytes(b) for b in self.stages[:levels])

    @property
    def record_bytes(self) -> int:
        return self.prefix_bytes(len(self.stages))

    @functools.lru_cache(maxsize=256)
    def parts(self, levels: int | None = None) -> tuple[tuple[int, int, int, int, int, int], ...]:
        """(bits, matrix index, codes offset, scales offset, rows n, cols k) of each stage's matrices."""
        out = []
        stages = self.stages if levels is None else self.stages[:levels]
        for b, base in zip(stages, self.stage_offsets()):
            at = base
            for m, ((n, k), (c, sc)) in enumerate(zip(self.shapes(), self._pieces(b))):
                out.append((b, m, at, at + _pad_piece(c), n, k))
                at += _pad_piece(c) + _pad_piece(sc)
        return tuple(out)


@dataclass(frozen=True)
class ExpertLayout:
    """How a layer's experts are stored: the high record and where the low copy comes from."""
    hidden: int
    ffn: int
    num_experts: int
    group_size: int
    stages: tuple[int, ...]         # of the `experts` records
    low_bits: int = 0               # 0: no low precision
    low_nested: bool = False        # low = stage-0 prefix of `experts` (else its own `experts_low` record)

    @property
    def high(self) -> RecordFormat:
        return RecordFormat(self.hidden, self.ffn, self.stages, self.group_size)

    @property
    def low(self) -> RecordFormat | None:
        if not self.low_bits:
            return None
        if self.low_nested:
            return RecordFormat(self.hidden, self.ffn, self.stages[:1], self.group_size)
        return RecordFormat(self.hidden, self.ffn, (self.low_bits,), self.group_size)

    @property
    def high_bytes(self) -> int:
        return self.high.record_bytes

    @property
    def low_bytes(self) -> int:
        return self.low.record_bytes if self.low_bits else 0

    @property
    def stored_bytes(self) -> int:
        """Bytes of one expert on flash (both precisions)."""
        return self.high_bytes + (0 if self.low_nested else self.low_bytes)

    def format(self, precision: str) -> RecordFormat:
        return self.high if precision == HIGH else self.low

    def to_attrs(self) -> dict:
        return {"hidden": self.hidden, "ffn": self.ffn, "num_experts": self.num_experts,
                "group_size": self.group_size, "stages": list(self.stages), "low_bits": self.low_bits,
                "low_nested": int(self.low_nested), "record_bytes": self.high_bytes,
                "low_record_bytes": self.low_bytes}

    @classmethod
    def from_attrs(cls, a: dict) -> "ExpertLayout":
        return cls(int(a["hidden"]), int(a["ffn"]), int(a["num_experts"]), int(a["group_size"]),
                   tuple(int(s) for s in a["stages"]), int(a.get("low_bits", 0)), bool(a.get("low_nested", 0)))

    @classmethod
    def for_export(cls, hidden: int, ffn: int, num_experts: int, group_size: int, quant: str,
                   low: str | None) -> "ExpertLayout":
        stages = STAGES[(quant, low)]
        low_bits = QUANT_BITS[low] if low else 0
        return cls(hidden, ffn, num_experts, group_size, stages, low_bits, low_nested=bool(low) and len(stages) > 1)


# -- encoding (export) and reference decoding (tests, the kernels' reference) ---------------
def encode(fmt: RecordFormat, matrices, quantize) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """One expert's record (uint8 [record_bytes]) from float32 gate/up/down.

    Returns (record, levels): levels[j] = the float32 matrices the first j+1 stages decode
    to, for the export's error report. `quantize(w, bits, g)` is export/quantize.py's; each
    stage quantizes what the stages before it left over.
    """
    rec = np.zeros(fmt.record_bytes, np.uint8)
    mats = [np.asarray(m, np.float32) for m in matrices]
    recon = [np.zeros_like(m) for m in mats]
    levels = []
    parts = fmt.parts()
    for s, b in enumerate(fmt.stages):
        for _, m, co, so, n, k in parts[3 * s:3 * s + 3]:
            residual = mats[m] - recon[m]
            if b == 16:
                h = residual.astype(np.float16)
                rec[co:co + h.nbytes] = h.view(np.uint8).reshape(-1)
                recon[m] = recon[m] + h.astype(np.float32)
                continue
            packed, scales = quantize(residual, b, fmt.group_size)
            rec[co:co + packed.nbytes] = packed.reshape(-1)
            rec[so:so + scales.nbytes] = scales.astype(np.float32).view(np.uint8).reshape(-1)
            recon[m] = recon[m] + dequantize(packed, scales, b)
        levels.append([r.copy() for r in recon])
    return rec, levels


def views(fmt: RecordFormat, record: np.ndarray, levels: int | None = None):
    """Per matrix, the (bits, codes [n, k/g, g*b/8] | float16 [n, k], scales [n, k/g] | None)
    of each stage: zero-copy views into `record` (uint8)."""
    g = fmt.group_size
    out = ([], [], [])
    for b, m, co, so, n, k in fmt.parts(levels):
        if b == 16:
            out[m].append((b, record[co:co + 2 * n * k].view(np.float16).reshape(n, k), None))
        else:
            nb = k // g
            out[m].append((b, record[co:co + n * k * b // 8].reshape(n, nb, g * b // 8),
                           record[so:so + 4 * n * nb].view(np.float32).reshape(n, nb)))
    return out


def decode(fmt: RecordFormat, record: np.ndarray, levels: int | None = None) -> list[np.ndarray]:
    """Reference decode of one record (its first `levels` stages) -> [gate, up, down] float32."""
    record = np.ascontiguousarray(record).view(np.uint8).reshape(-1)
    out = []
    for stages in views(fmt, record, levels):
        w = 0
        for b, codes, scales in stages:
            w = w + (codes.astype(np.float32) if b == 16 else dequantize(codes, scales, b))
        out.append(w)
    return out

