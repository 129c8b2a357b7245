"""onnxruntime execution providers: which to use, and never a silent fallback.

The list comes from the caller (`providers=`, `--providers`), else the device
profile (devices/*.toml `execution_providers`, preferred first), else CPU. A
provider this onnxruntime build lacks, or one that is installed but does not
come up for a session, is dropped with a ProviderWarning naming it.
Short aliases (`cuda`, `tensorrt`, `cpu`, ...: PROVIDER_ALIASES) stand for the full
onnxruntime names, as onnxruntime-genai's `-e cuda|cpu` does.
"""
from __future__ import annotations

import warnings

from edgeinfer.errors import InvalidArgumentError, ProviderWarning

CPU = "CPUExecutionProvider"
# Short names users type (CLI --providers, load(providers=)) -> onnxruntime's names.
PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
}
# Where a provider keeps tensors, as I/O binding names the device (the rest work on host memory).
_DEVICE = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def ort_module():
    import onnxruntime
    return onnxruntime


def provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else p


def expand_alias(p):
    """A provider with its short alias (`cuda`) replaced by onnxruntime's name; options kept."""
    if isinstance(p, (tuple, list)) and p and isinstance(p[0], str):
        return (PROVIDER_ALIASES.get(p[0], p[0]), *p[1:])
    return PROVIDER_ALIASES.get(p, p) if isinstance(p, str) else p


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
    requested = [expand_alias(p) for p in requested]
    if not requested:
        raise InvalidArgumentError("providers is empty; give at least one, e.g. cpu or CPUExecutionProvider")
    available = [p for p in ort_module().get_available_providers() if p != "AzureExecutionProvider"]
    chosen, missing = [], []
    for p in requested:
        name = provider_name(p)
        if not (isinstance(name, str) and name.endswith("ExecutionProvider")):
            raise InvalidArgumentError(f"{name!r} is not an onnxruntime execution provider name: use a full name "
                                       "(e.g. CUDAExecutionProvider) or a short one: "
                                       + ", ".join(PROVIDER_ALIASES))
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
    """Never fall back silently: a ProviderWarning naming what is missing."""
    what = ", ".join(missing)
    msg = (f"onnxruntime execution provider{'s' if len(missing) > 1 else ''} {what} ({source}) "
           f"{'are' if len(missing) > 1 else 'is'} not available: this onnxruntime offers "
           f"{', '.join(available) or 'none'}; using {', '.join(map(provider_name, chosen))} "
           f"(install an onnxruntime build with {what} to use it)")
    warnings.warn(msg, ProviderWarning, stacklevel=4)


def device_of(providers) -> str:
    """Where the first provider keeps tensors ("cpu" for host-memory providers)."""
    return _DEVICE.get(provider_name(providers[0]), "cpu")
