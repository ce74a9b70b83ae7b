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


class EncodeError(TvqError):
    """Values a quantizer cannot turn into finite parameters: not finite in fp32, or a range
    fp32 cannot resolve. Raised where the range is computed, which knows no file names: the
    caller names the file and tensor (``task`` is the index of the failing input, ``base``
    marks the RTVQ base)."""

    def __init__(self, problem: str, task: int | None = None, base: bool = False) -> None:
        super().__init__(problem)
        self.problem, self.task, self.base = problem, task, base

    def at(self, task: int | None = None, base: bool = False) -> EncodeError:
        """The same problem, located at input ``task`` (or the RTVQ base)."""
        return EncodeError(self.problem, task, base)


def where(path: object, key: str | None = None) -> str:
    """Format 'file' or 'file: tensor' for error messages."""
    return f"{path}: tensor '{key}'" if key is not None else f"{path}"
