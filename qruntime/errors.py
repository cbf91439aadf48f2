"""Every error a user can cause is a subclass of QRuntimeError.

The message always names the file or tensor involved and says how to fix it; the CLI prints it
as one line and exits with status 2.
"""


class QRuntimeError(Exception):
    """Base class of every user-facing qruntime error."""


class ModelNotFoundError(QRuntimeError):
    """The path given does not exist."""


class NotAModelError(QRuntimeError):
    """The path exists but holds no checkpoint qruntime recognizes."""


class UnsafeCheckpointError(QRuntimeError):
    """A pickle-based checkpoint (.bin/.pt/.pth): refused, never unpickled."""


class CorruptFileError(QRuntimeError):
    """A file is truncated, malformed, or its contents do not match its header."""


class ChecksumMismatchError(CorruptFileError):
    """A shard's sha256 differs from the one recorded when it was written."""


class UnsupportedArchitectureError(QRuntimeError):
    """The model family or one of its features (rope type, sliding window...) is not supported."""


class UnsupportedFormatError(QRuntimeError):
    """The checkpoint format, format version or tensor type is not supported."""


class ShapeMismatchError(QRuntimeError):
    """A tensor's shape disagrees with the model config."""


class MissingTensorError(ShapeMismatchError):
    """A tensor the model config requires is absent from the checkpoint."""


class InvalidOptionError(QRuntimeError, ValueError):
    """An option value is out of range or inconsistent with others."""


class OutputExistsError(QRuntimeError):
    """The output path exists and --force was not given."""


class MissingDependencyError(QRuntimeError, ImportError):
    """A library the operation needs is missing or older than the version it needs."""
