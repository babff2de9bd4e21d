"""Argument checks shared by the NumPy and torch layers (no torch import here)."""
from __future__ import annotations

import numpy as np


def _is_int(value) -> bool:
    """True for Python and NumPy integers, not for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _real(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    """value as a float inside the interval; TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range") from None
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if not np.isfinite(v) or below or above:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {lb}{lo}, {hi}{rb}, got {v}")
    return v
