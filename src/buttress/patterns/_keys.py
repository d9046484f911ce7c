"""The key of a call, for the patterns that tell identical calls apart (cache, coalescing).

The default key is built from the arguments: each value is itself when it can be hashed, tagged
with its type (so ``f(1)``, ``f(1.0)`` and ``f(True)`` stay apart); lists and tuples become
tuples, dicts become sets of their items (keys tagged as well) and sets become frozen sets, at
any depth (so a list of chat messages is a key). A value of any other unhashable type raises a
``TypeError`` at the call that names its type and asks for a ``key=`` function: a key that
silently never matches would hide that nothing is cached or shared. Keyword arguments count by
name, in any order.

Under ``Policy.call(fn, ...)`` the function is part of the key: one policy may run several.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from buttress import _context

__all__ = ["KeyFunction", "call_key"]

KeyFunction = Callable[..., Hashable]

# Containers turned into hashable values of their own kind; any other unhashable type is refused.
_SEQUENCES = (list, tuple)


def _freeze(value: Any, pattern: str) -> Hashable:
    kind = type(value)
    if kind in _SEQUENCES:
        return (kind, tuple(_freeze(item, pattern) for item in value))
    if kind is dict:
        # Keys tagged too: {1: v} and {True: v} are equal dicts, yet not the same argument.
        return (
            dict,
            frozenset(
                (_freeze(key, pattern), _freeze(item, pattern)) for key, item in value.items()
            ),
        )
    if kind in (set, frozenset):
        return (frozenset, frozenset(_freeze(item, pattern) for item in value))
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"with_{pattern}: an argument of type {kind.__qualname__} cannot be part of the "
            f"default key (it is not hashable); pass key=... to with_{pattern} to say what "
            "makes two calls the same"
        ) from None
    return (kind, value)


def call_key(
    pattern: str, key: KeyFunction | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Hashable:
    """The key of the call ``(args, kwargs)``: ``key(*args, **kwargs)``, or the default rule."""
    if key is not None:
        made = key(*args, **kwargs)
        try:
            hash(made)
        except TypeError:
            raise TypeError(
                f"with_{pattern}: key function returned an unhashable "
                f"{type(made).__qualname__}; return a str, a number or a tuple of them"
            ) from None
    else:
        made = (
            tuple(_freeze(value, pattern) for value in args),
            frozenset((name, _freeze(value, pattern)) for name, value in kwargs.items()),
        )
    target = _context.call_target.get(None)
    return made if target is None else (target, made)
