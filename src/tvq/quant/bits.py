"""The widths a code may have, on their own: configs and the CLI check them without torch."""

from __future__ import annotations

from tvq.errors import ConfigError

MIN_BITS, MAX_BITS = 1, 8


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what}={bits!r} is out of range: choose an integer from {MIN_BITS} to {MAX_BITS}")
    return bits
