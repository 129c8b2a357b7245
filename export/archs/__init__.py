"""One module per architecture family: a table from checkpoint tensor names to
graph roles, plus a hook where the family differs (the MoE FFN).

Roles: embed, pos_embed, final_norm(.bias), lm_head; per layer {i}: attn_norm(.bias),
q, k, v, o (.bias), ffn_norm(.bias), gate, up, down (.bias).
"""
from __future__ import annotations

from importlib import import_module

from edgeinfer.errors import CheckpointError, UnsupportedModelError
from edgeinfer.format.config import FAMILIES


def arch_module(family: str):
    """The module of `family` (one of FAMILIES: each has a module of that name here)."""
    if family not in FAMILIES:
        raise UnsupportedModelError(f"the {family} family cannot be exported by this version")
    return import_module(f".{family}", __package__)


class Weights:
    """Checkpoint tensors by role, through an architecture's name table."""

    def __init__(self, checkpoint, table: dict[str, str | tuple[str, ...]]):
        self.ckpt = checkpoint
        self.table = table

    def name(self, role: str, layer: int | None = None, **fmt) -> str | None:
        options = self.table.get(role)
        if options is None:
            return None
        for pattern in (options,) if isinstance(options, str) else options:
            name = pattern.format(i=layer, **fmt)
            if name in self.ckpt:
                return name
        return None

    def get(self, role: str, layer: int | None = None, *, optional: bool = False, **fmt):
        name = self.name(role, layer, **fmt)
        if name is None:
            if optional:
                return None
            where = f" of layer {layer}" if layer is not None else ""
            raise CheckpointError(f"checkpoint lacks the {role} tensor{where} "
                                  f"(looked for {self.table.get(role)!r})")
        return self.ckpt.get(name)
