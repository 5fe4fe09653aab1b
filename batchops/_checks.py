"""Argument checks shared by the pure-Python parts of batchops (data, tuning).

Each check takes the argument's name as the messages should say it, with the caller in front
where the caller wants it there (``"find_batch_size: trials"``), and returns the value converted.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_real"]


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int: a TypeError for anything but an integer (bools included), a
    ValueError below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_real(name: str, value: Any, *, finite: bool = False, expected: str = "a real number") -> float:
    """``value`` as a float: a TypeError for anything but a real number (bools included), whose
    message says the value must be ``expected``; with ``finite``, a ValueError for inf and nan."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
