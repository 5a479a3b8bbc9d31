"""Strict constructor arguments for our FusionBench algorithm classes.

FusionBench's ``BaseAlgorithm`` takes any extra key and only logs "Unused argument", so a typo such
as ``+method.rhoo=0.5`` would run with the default ``rho``; and Hydra passes ``method.rho=abc`` on as
the string ``'abc'``. These checks turn both into errors that name the key, before any work.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Optional, Union

#: Keys of the form ``_name_`` (``_target_``, ``_recursive_``, ``_usage_``, ``_version_``, ...) belong
#: to Hydra and FusionBench, which pass them on to ``BaseAlgorithm``.
META_KEY = re.compile(r"^_\w+_$")
NUMERIC = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}


def constructor_keys(cls: type) -> list[str]:
    """The named parameters of ``cls.__init__`` (without self and **kwargs)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def reject_unknown_keys(cls: type, kwargs: Mapping[str, Any]) -> None:
    """TypeError naming the first key of ``kwargs`` that is neither a constructor argument of ``cls``
    nor a Hydra/FusionBench ``_meta_`` key, and the closest valid key; for a key of a related class
    that ``cls`` lacks on purpose (its ``unsupported_keys``: {key: why}), the reason."""
    valid = constructor_keys(cls)
    for key in kwargs:
        if META_KEY.match(key):
            continue
        if key in getattr(cls, "unsupported_keys", {}):
            raise TypeError(f"{cls.__name__} does not support '{key}': {cls.unsupported_keys[key]}")
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise TypeError(f"{cls.__name__} has no key '{key}' ({hint}valid keys: {', '.join(valid)})")


def expected_type(annotation: Any) -> tuple[Optional[type], bool]:
    """(bool | int | float, whether None is allowed) for a scalar annotation such as
    ``float`` or ``Optional[int]``; (None, _) for any other annotation."""
    optional = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            return None, optional
        annotation = args[0]
    return (annotation if annotation in NUMERIC else None), optional


def matches(value: Any, kind: type) -> bool:
    """Whether ``value`` is a ``kind`` (a float argument also takes integers, no argument takes bools
    except bool ones)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, never a rank or a ratio to us
        return False
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def constructor_arguments(algorithm: Any) -> dict[str, Any]:
    """{key: current value} of every constructor argument of ``algorithm`` (FusionBench's
    ``auto_register_config`` keeps each as an attribute of the same name)."""
    return {key: getattr(algorithm, key, None) for key in constructor_keys(type(algorithm))}


def check_argument_types(cls: type, arguments: Mapping[str, Any]) -> None:
    """TypeError naming the first boolean/integer/number argument of ``cls``'s constructor whose
    value in ``arguments`` has another type (e.g. the string 'abc' for ``rho``)."""
    hints = typing.get_type_hints(cls.__init__)
    for key, value in arguments.items():
        kind, optional = expected_type(hints.get(key))
        if kind is None or (value is None and optional) or matches(value, kind):
            continue
        allowed = NUMERIC[kind] + (" or null" if optional else "")
        raise TypeError(f"{key} must be {allowed}, got {value!r} ({type(value).__name__})")
