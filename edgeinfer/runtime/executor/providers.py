"""onnxruntime execution providers: which to use, and never a silent fallback.

The list comes from the caller (`providers=`, `--providers`), else the device
profile (devices/*.toml `execution_providers`, preferred first), else CPU. A
provider this onnxruntime build lacks, or one that is installed but does not
come up for a session, is dropped with a warning (warnings.warn, category
ProviderWarning) and a log line on the "edgeinfer.runtime.executor" logger, both naming it.
"""
from __future__ import annotations

import logging
import warnings

from edgeinfer.errors import EdgeInferError

log = logging.getLogger("edgeinfer.runtime.executor")

CPU = "CPUExecutionProvider"
# Where a provider keeps tensors, as I/O binding names the device (the rest work on host memory).
_DEVICE = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


class ProviderWarning(UserWarning):
    """A requested onnxruntime execution provider is not available; a fallback is used."""


def ort_module():
    import onnxruntime
    return onnxruntime


def provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else p


def resolve_providers(requested=None, profile=None) -> list:
    """The execution providers to use, preferred first: `requested` (names, or
    (name, options) pairs), else the device profile's, else CPU. Those this
    onnxruntime build lacks are dropped with a warning that names them; CPU is
    always last, as the fallback for nodes the others do not take."""
    source = "requested"
    if requested is None:
        requested = list(profile.execution_providers) if profile is not None else [CPU]
        source = f"device profile {profile.name}" if profile is not None else "default"
    elif isinstance(requested, str):
        requested = [p.strip() for p in requested.split(",") if p.strip()]
    requested = list(requested)
    if not requested:
        raise EdgeInferError("providers is empty; give at least one, e.g. CPUExecutionProvider")
    available = [p for p in ort_module().get_available_providers() if p != "AzureExecutionProvider"]
    chosen, missing = [], []
    for p in requested:
        name = provider_name(p)
        if not (isinstance(name, str) and name.endswith("ExecutionProvider")):
            raise EdgeInferError(f"{name!r} is not an onnxruntime execution provider name "
                                 "(e.g. CUDAExecutionProvider, CPUExecutionProvider)")
        if name not in available:
            missing.append(name)
        elif name not in map(provider_name, chosen):
            chosen.append(p)
    if CPU not in map(provider_name, chosen):
        chosen.append(CPU)
    if missing:
        fallback_warning(missing, source, available, chosen)
    return chosen


def fallback_warning(missing, source, available, chosen) -> None:
    """Never fall back silently: a warning (warnings.warn) and a log line naming what is missing."""
    what = ", ".join(missing)
    msg = (f"onnxruntime execution provider{'s' if len(missing) > 1 else ''} {what} ({source}) "
           f"{'are' if len(missing) > 1 else 'is'} not available: this onnxruntime offers "
           f"{', '.join(available) or 'none'}; using {', '.join(map(provider_name, chosen))} "
           f"(install an onnxruntime build with {what} to use it)")
    log.warning(msg)
    warnings.warn(msg, ProviderWarning, stacklevel=4)


def device_of(providers) -> str:
    """Where the first provider keeps tensors ("cpu" for host-memory providers)."""
    return _DEVICE.get(provider_name(providers[0]), "cpu")
