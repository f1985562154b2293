"""Exception hierarchy of clipdecomp.

Every error raised on purpose by clipdecomp derives from :class:`ClipDecompError`,
which is a :class:`ValueError`, so callers can catch either. Messages say what was
wrong *and* what is accepted, so they can be shown to a user as they are.
"""

from __future__ import annotations

__all__ = [
    "ClipDecompError",
    "UnsupportedModelError",
    "UnknownModelError",
    "CheckpointError",
    "InputError",
    "MissingDependencyError",
    "StoreError",
]


class ClipDecompError(ValueError):
    """Base class of all errors raised deliberately by clipdecomp."""


class UnsupportedModelError(ClipDecompError):
    """The model exists but its image tower cannot be decomposed exactly
    (ResNet / timm / Hugging Face trunk, attentional or average pooling, ...)."""


class UnknownModelError(ClipDecompError):
    """The model name is not an open_clip architecture nor a supported schema."""


class CheckpointError(ClipDecompError):
    """A weights file or model folder is missing, unreadable, unsafe to unpickle,
    or does not match the architecture."""


class InputError(ClipDecompError):
    """An argument (images, texts, layer indices, data loader, ...) is malformed."""


class MissingDependencyError(ClipDecompError):
    """An optional package needed by this model (e.g. ``transformers``) is not installed."""


class StoreError(ClipDecompError):
    """An on-disk decomposition store is inconsistent with the current run or corrupt."""
