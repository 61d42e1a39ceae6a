"""Argument checks shared by the compute modules (one place, one argument order)."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["check_int"]


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` when it is an integer (not a bool) ``>= minimum``; else ``ValueError``
    naming ``name``: "``name`` must be an integer >= ``minimum``, got ``value``"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
