"""One exception type for every bad input, so the CLI can print one line and exit non-zero."""

from __future__ import annotations


class TvqError(Exception):
    """A user-facing error: the message names the file, the tensor and the problem."""


class CheckpointError(TvqError):
    """A checkpoint is missing, unreadable, or disagrees with the others."""


class PackError(TvqError):
    """A pack is missing, truncated, tampered with, or of an unknown version."""


class ConfigError(TvqError):
    """A configuration file or option is invalid."""


def where(path: object, key: str | None = None) -> str:
    """Format 'file' or 'file: tensor' for error messages."""
    return f"{path}: tensor '{key}'" if key is not None else f"{path}"
