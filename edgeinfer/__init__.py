"""edgeinfer: run large language models on devices that cannot hold them.

The public API: `load` returns a Model; `Model.generate` returns a GenerationResult (or,
with stream=True, yields GenerationSteps); failures raise EdgeInferError subclasses and
warnings are EdgeInferWarning subclasses (edgeinfer.errors)."""

__version__ = "0.1.0"

from edgeinfer.errors import EdgeInferError, EdgeInferWarning  # noqa: E402
from edgeinfer.runtime.generate import GenerationResult, GenerationStep  # noqa: E402


def load(path=None, **kwargs):
    """Load a model folder (default: the built-in demo). See edgeinfer.runtime.loader.load."""
    from edgeinfer.runtime.loader import load as _load
    return _load(path, **kwargs)


__all__ = ["load", "EdgeInferError", "EdgeInferWarning", "GenerationResult", "GenerationStep", "__version__"]
