"""One exception family. Every message says what went wrong and what to do;
the CLI prints it as one line and exits non-zero."""


class EdgeInferError(Exception):
    """Base class of every error edgeinfer raises on purpose."""


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


class BudgetError(EdgeInferError):
    """The memory budget cannot hold what must stay resident."""


class StorageError(EdgeInferError):
    """A read from a weight file failed after retries."""


class DeviceProfileError(EdgeInferError):
    """A device profile is unknown or malformed."""
