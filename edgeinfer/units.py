"""Sizes: memory budgets read from "40%" (of the model's weight bytes), "3MB", "2GB",
"512MiB" or bytes, and the one formatter of byte counts for people."""
from __future__ import annotations

import math
import re

from edgeinfer.errors import BudgetError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*$")


def parse_budget(spec, model_bytes: int) -> int | None:
    """Budget in bytes; None means unlimited."""
    if spec is None:
        return None
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not math.isfinite(spec) or spec <= 0:
            raise BudgetError(f"memory budget must be positive, got {spec!r}")
        return int(spec)
    m = _RE.match(str(spec))
    if not m:
        raise BudgetError(f"cannot read memory budget {spec!r}: use e.g. 40%, 300MB, 2GB or a byte count")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise BudgetError(f"memory budget {spec!r} must be in (0%, 100%]")
        return int(model_bytes * value / 100)
    if unit not in _UNITS:
        raise BudgetError(f"unknown unit {m.group(2)!r} in memory budget {spec!r} (use %, KB, MB, GB, KiB, MiB, GiB)")
    if value <= 0:
        raise BudgetError(f"memory budget must be positive, got {spec!r}")
    return int(value * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: "512 B", "4 KiB", "1.5 MiB", "7.6 GiB" (whole multiples of
    the unit without a decimal, so chunk sizes read as they are written)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
