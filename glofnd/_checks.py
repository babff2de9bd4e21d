"""Argument checks shared by the NumPy and torch layers (no torch import here)."""
from __future__ import annotations

import os

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


def _memory_bytes():
    """Physical memory plus swap in bytes, or None where the platform does not say."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        with open("/proc/meminfo") as f:
            swap = next((int(line.split()[1]) * 1024 for line in f
                         if line.startswith("SwapTotal:")), 0)
    except (OSError, ValueError):
        swap = 0
    return total + swap if total > 0 else None


def check_state_fits(num_samples: int, size: int) -> None:
    """MemoryError naming ``num_samples`` when a state of ``size`` samples (16 bytes each: λ, two
    moments, a count) is more than this machine's memory and swap together. λ is written when the
    state is made, so such a state cannot merely be reserved: where the kernel grants every
    allocation (overcommit), filling it would get the process killed instead of raising."""
    need, have = 16 * size, _memory_bytes()
    if have is not None and need > have:
        raise MemoryError(f"num_samples={num_samples} needs {need / 2**30:.1f} GiB of state, "
                          f"more than this machine's {have / 2**30:.1f} GiB of memory and swap")
