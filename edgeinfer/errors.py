"""One exception family and one warning family.

Every error edgeinfer raises on purpose is an EdgeInferError; every message says what
went wrong and what to do, and the CLI prints it as one line and exits non-zero.
Every warning is an EdgeInferWarning, raised with warnings.warn and not also logged,
so one `warnings.simplefilter(..., EdgeInferWarning)` controls them all.
"""


class EdgeInferError(Exception):
    """Base class of every error edgeinfer raises on purpose."""


class InvalidArgumentError(EdgeInferError, ValueError):
    """An argument of the API or the CLI is out of range or of the wrong kind.
    Also a ValueError, so code written against plain Python conventions still catches it."""


class ModelFormatError(EdgeInferError):
    """A model folder is missing, malformed, corrupted or from an unknown format version."""


class ChecksumError(ModelFormatError):
    """Bytes read from a weight file do not match the checksum in the manifest."""


class UnsupportedModelError(EdgeInferError):
    """The checkpoint's architecture or one of its options is not supported."""


class CheckpointError(EdgeInferError):
    """A source checkpoint is missing files, truncated or inconsistent."""


class ContextLengthError(EdgeInferError):
    """A prompt (or prompt plus generation) does not fit the context window."""


class ChatTemplateError(EdgeInferError):
    """A model's chat template is invalid, unsafe, or refuses the conversation."""


class BudgetError(EdgeInferError):
    """The memory budget cannot hold what must stay resident."""


class StorageError(EdgeInferError):
    """A read from a weight file failed after retries."""


class ModelClosedError(EdgeInferError, ValueError):
    """A streamed weight was read after Model.close()."""


class DeviceProfileError(EdgeInferError):
    """A device profile is unknown or malformed."""


class InternalError(EdgeInferError, RuntimeError):
    """An invariant of edgeinfer itself broke: a bug, to be reported with the message."""


class EdgeInferWarning(UserWarning):
    """Base class of every warning edgeinfer raises: something runs, but not as asked."""


class BufferedFallbackWarning(EdgeInferWarning, RuntimeWarning):
    """Reads go through the page cache because page-cache bypass is unavailable."""


class ActivationsWarning(EdgeInferWarning):
    """activations="int8" was asked for, and some MatMulNBits nodes keep float32 activations."""


class ProviderWarning(EdgeInferWarning):
    """A requested onnxruntime execution provider is not available; a fallback is used."""


class ConstantFoldingWarning(EdgeInferWarning, ResourceWarning):
    """onnxruntime constant folding is turned off for a session whose folded weights would not
    fit memory; the session dequantizes on every call instead (slow)."""


class ChatTemplateWarning(EdgeInferWarning):
    """A model folder has no chat template: chat uses a plain "Role: text" fallback."""


class ContextLimitWarning(EdgeInferWarning):
    """The exported model's context is shorter than the checkpoint's (a position encoding that
    is only reproduced exactly up to some length, e.g. LongRoPE's short factors)."""
