"""Expert records: how one MoE expert is stored, shared by the exporter and the runtime.

An expert is three matrices in nn.Linear layout (rows = outputs): gate [F, d], up [F, d],
down [d, F]. Each (layer, expert, precision) is ONE contiguous record, 4 KiB-aligned, so a
cache miss is one read (DESIGN.md, "Experts"). A layer's records are the rows of one
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
    --quant int8 --expert-low int2  ->  stages (2, 2, 4)   low = first 1/4
    --quant int4 --expert-low int2  ->  stages (2, 2)      low = first 1/2
    --quant int8 | int4 (no low)    ->  stages (8,) | (4,)
    --quant f16  [--expert-low b]   ->  stages (16,) [+ a separate b-bit record in experts_low]

Stage part (d_out x d_in matrices m = gate, up, down; g = group size; b = stage bits):

    [codes(gate) | codes(up) | codes(down) | scales(gate) | scales(up) | scales(down) | pad to 4 KiB]

    codes(m):  rows of m, each row d_in*b/8 bytes; per group of g values, byte j holds the
               values j + t*(g*b/8) for t = 0 .. 8/b - 1 in bits t*b .. t*b+b-1 (for 4 bits:
               value j in the low nibble, value j + g/2 in the high one, as ggml's Q4_0), so a
               kernel multiplies contiguous runs of the input; code = round(w/s) + 2**(b-1).
    scales(m): float16 [d_out, d_in/g] (little-endian bytes).
    b = 16:    [gate | up | down] as float16 values, no scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALIGN = 4096
MATRICES = ("gate", "up", "down")
STAGES = {  # (high quant, low) -> stages of the nested record
    ("int8", None): (8,), ("int4", None): (4,), ("f16", None): (16,),
    ("int8", "int4"): (4, 4), ("int8", "int2"): (2, 2, 4), ("int4", "int2"): (2, 2),
    ("f16", "int4"): (16,), ("f16", "int2"): (16,),
}
LOW_BITS = {"int4": 4, "int2": 2}
HIGH, LOW = "high", "low"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


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

    def stage_bytes(self, bits: int) -> int:
        elems = sum(n * k for n, k in self.shapes())
        if bits == 16:
            return _align(2 * elems)
        groups = sum(n * (k // self.group_size) for n, k in self.shapes())
        return _align(elems * bits // 8 + 2 * groups)

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

    def parts(self, levels: int | None = None):
        """(bits, matrix index, codes offset, scales offset, rows, cols) for each stage and matrix."""
        out = []
        for s, (b, base) in enumerate(zip(self.stages, self.stage_offsets())):
            if levels is not None and s >= levels:
                break
            at = base
            for m, (n, k) in enumerate(self.shapes()):
                out.append([b, m, at, -1, n, k])
                at += n * k * (2 if b == 16 else b) // (1 if b == 16 else 8)
            if b != 16:
                for p in out[-3:]:
                    p[3] = at
                    at += 2 * p[4] * (p[5] // self.group_size)
        return [tuple(p) for p in out]


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
        low_bits = LOW_BITS[low] if low else 0
        return cls(hidden, ffn, num_experts, group_size, stages, low_bits, low_nested=bool(low) and len(stages) > 1)


# -- encoding (export) and reference decoding (tests, the kernels' reference) ---------------
def _order(codes: np.ndarray, bits: int, g: int) -> np.ndarray:
    """Unsigned codes [n, k] -> packed bytes [n, k*bits/8] in the record's per-group order."""
    n, k = codes.shape
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    c = codes.reshape(n, k // g, per, g // per).astype(np.uint8)
    out = np.zeros((n, k // g, g // per), np.uint8)
    for t in range(per):
        out |= c[:, :, t, :] << (bits * t)
    return out.reshape(n, -1)


def _unorder(packed: np.ndarray, bits: int, g: int, k: int) -> np.ndarray:
    """Inverse of _order: packed bytes (any shape, n*k*bits/8 of them) -> codes [n, k]."""
    n = packed.size * 8 // bits // k
    if bits == 8:
        return packed.reshape(n, k)
    per = 8 // bits
    p = packed.reshape(n, k // g, g // per)
    out = np.empty((n, k // g, per, g // per), np.uint8)
    for t in range(per):
        out[:, :, t, :] = (p >> (bits * t)) & ((1 << bits) - 1)
    return out.reshape(n, k)


def encode(fmt: RecordFormat, matrices, quantize, unpack) -> tuple[np.ndarray, list[np.ndarray]]:
    """One expert's record (uint8 [record_bytes]) from float32 gate/up/down.

    Returns (record, reconstructions): the float32 matrices the first 1, 2, ... stages decode
    to (summed), for the export's error report. `quantize(w, bits, g)` / `unpack(p, bits)`
    are export/quantize.py's (MatMulNBits order; re-ordered here).
    """
    g = fmt.group_size
    rec = np.zeros(fmt.record_bytes, np.uint8)
    mats = [np.asarray(m, np.float32) for m in matrices]
    residual = mats
    recon = [np.zeros_like(m) for m in mats]
    levels = []
    for b, base in zip(fmt.stages, fmt.stage_offsets()):
        at = base
        if b == 16:
            for m in residual:
                h = m.astype(np.float16)
                rec[at:at + h.nbytes] = h.view(np.uint8).reshape(-1)
                at += h.nbytes
            recon = [r + m.astype(np.float16).astype(np.float32) for r, m in zip(recon, residual)]
            levels.append([r.copy() for r in recon])
            continue
        scales16 = []
        for j, m in enumerate(residual):
            n, k = m.shape
            packed, scales = quantize(m, b, g)
            codes = unpack(packed, b).reshape(n, k)
            s16 = scales.astype(np.float16)
            q = _order(codes, b, g)
            rec[at:at + q.nbytes] = q.reshape(-1)
            at += q.nbytes
            scales16.append(s16)
            deq = ((codes.astype(np.float32) - 2 ** (b - 1)).reshape(n, k // g, g)
                   * s16.astype(np.float32)[..., None]).reshape(n, k)
            recon[j] = recon[j] + deq
        for s16 in scales16:
            rec[at:at + s16.nbytes] = s16.view(np.uint8).reshape(-1)
            at += s16.nbytes
        residual = [m - r for m, r in zip(mats, recon)]
        levels.append([r.copy() for r in recon])
    return rec, levels


def decode(fmt: RecordFormat, record: np.ndarray, levels: int | None = None) -> list[np.ndarray]:
    """Reference decode of one record (its first `levels` stages) -> [gate, up, down] float32."""
    record = np.ascontiguousarray(record).view(np.uint8).reshape(-1)
    out = [np.zeros(s, np.float32) for s in fmt.shapes()]
    g = fmt.group_size
    for b, m, co, so, n, k in fmt.parts(levels):
        if b == 16:
            out[m] += record[co:co + 2 * n * k].view(np.float16).astype(np.float32).reshape(n, k)
            continue
        codes = _unorder(record[co:co + n * k * b // 8], b, g, k)
        s = record[so:so + 2 * n * (k // g)].view(np.float16).astype(np.float32).reshape(n, k // g, 1)
        out[m] += ((codes.astype(np.float32) - 2 ** (b - 1)).reshape(n, k // g, g) * s).reshape(n, k)
    return out
