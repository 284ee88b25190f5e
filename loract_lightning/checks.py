"""Argument checks shared by every public entry point, so each bad value gets the same message."""

from __future__ import annotations


def check_int(name: str, value: object, minimum: int = 0, allow_none: bool = False) -> None:
    """Raise ``ValueError("<name> must be an int >= <minimum>, got <value>")`` unless ``value`` is one
    (bools are not ints here); ``allow_none`` also accepts None and says so in the message."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = ("None or " if allow_none else "") + f"an int >= {minimum}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_fraction(name: str, value: object) -> None:
    """Raise unless ``value`` is a number strictly between 0 and 1: a TypeError for a non-number,
    a ValueError for one out of range, both saying ``<name> must be a number in (0, 1), got ...``."""
    message = f"{name} must be a number in (0, 1), got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(message)
    if not 0 < value < 1:
        raise ValueError(message)


def check_choice(name: str, value: object, choices: object) -> None:
    """Raise ``ValueError("<name> must be one of <choices>, got <value>")`` unless ``value`` is in ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_flag(name: str, value: object) -> None:
    """Raise ``TypeError("<name> must be True or False, got <value>")`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
