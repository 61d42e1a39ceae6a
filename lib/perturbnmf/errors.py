"""The errors that mean "your input or parameters are wrong", under one base class.

Every step raises a :class:`Refusal` subclass when the data, a file or a parameter cannot be
used as given; its message names the parameter, column or file and the fix. The runner shows
such a message alone (no traceback) and exits with status 2; any other exception is a bug or
a machine problem and is shown with its traceback (``--debug``).
"""

from __future__ import annotations

__all__ = ["Refusal", "InputError", "ParameterError", "LibraryUnavailableError", "InsufficientMemoryError",
           "refusal_names"]


class Refusal(ValueError):
    """Input or parameters that cannot be used as given; the message says how to fix them."""


class InputError(Refusal):
    """Input data that cannot be analysed as given; the message says how to fix it."""


class ParameterError(Refusal):
    """A parameter value or parameter file that cannot be used, with the fix in the message."""


class LibraryUnavailableError(Refusal):
    """A gene-set library named by its Enrichr name could not be fetched (offline)."""


class InsufficientMemoryError(Refusal, MemoryError):
    """A dense array would not fit in the available memory; the message names the parameter to change."""


def refusal_names() -> set[str]:
    """Class names of every :class:`Refusal` (a notebook's error reaches the runner only by name)."""
    found, todo = set(), [Refusal]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return found
