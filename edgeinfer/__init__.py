"""edgeinfer: run large language models on devices that cannot hold them."""

__version__ = "0.1.0"

from edgeinfer.errors import EdgeInferError  # noqa: E402


def load(path=None, **kwargs):
    """Load a model folder (default: the built-in demo). See edgeinfer.runtime.loader.load."""
    from edgeinfer.runtime.loader import load as _load
    return _load(path, **kwargs)


__all__ = ["load", "EdgeInferError", "__version__"]
