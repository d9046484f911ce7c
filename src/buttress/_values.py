"""Value types shared by every pattern's options and by settings, defined once.

Durations, rates and growth factors are bounded where they enter (a decorator argument, a settings
key) so that no call can overflow on them; :class:`RedisURL` masks its password in every repr and
:func:`redact` is the one redaction helper. The bounds and why: ``docs/internals.md`` (Values).
"""

from __future__ import annotations

import re
from typing import Annotated, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import AfterValidator, Field, PlainSerializer

__all__ = [
    "MAX_FACTOR",
    "MAX_RATE",
    "MAX_SECONDS",
    "MIN_RATE",
    "MIN_SECONDS",
    "GrowthFactor",
    "PositiveSeconds",
    "Rate",
    "RedisURL",
    "Seconds",
    "StateURL",
    "redact",
    "redact_text",
    "shown",
]

MIN_SECONDS: Final = 0.001
MAX_SECONDS: Final = 7 * 24 * 3600.0
MIN_RATE: Final = 1e-6
MAX_RATE: Final = 1e9
MAX_FACTOR: Final = 100.0

# A duration that must be positive: a time limit, how long a circuit stays open, a window.
PositiveSeconds = Annotated[float, Field(ge=MIN_SECONDS, le=MAX_SECONDS, allow_inf_nan=False)]
# A duration where 0 means "do not wait": a delay, a queue or token wait.
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
# Events per second.
Rate = Annotated[float, Field(ge=MIN_RATE, le=MAX_RATE, allow_inf_nan=False)]
# How much a delay grows per attempt.
GrowthFactor = Annotated[float, Field(ge=1, le=MAX_FACTOR, allow_inf_nan=False)]

# The schemes a state_url may have (the valkey ones name the same protocol).
_URL_SCHEMES: Final = frozenset(
    {
        "redis",
        "rediss",
        "unix",
        "redis+sentinel",
        "redis+cluster",
        "valkey",
        "valkeys",
        "valkey+sentinel",
        "valkey+cluster",
    }
)


def redact(url: str) -> str:
    """``url`` fit to show: its password and ``password=`` query values replaced by ``***``.

    A value that is not a ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``,
    ``redis+cluster://`` or ``valkey`` URL is not shown at all: it may be a secret typed in the
    wrong place.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _URL_SCHEMES or not rest:
        return "<not a redis://, rediss:// or unix:// URL>"
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{host}"
        query = parts.query
        if "password" in query.lower():
            query = urlencode(
                [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(query)],
                safe="*",
            )
    except ValueError:
        return "<unparsable URL>"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# scheme://userinfo@ anywhere in a text (a URL quoted in an error message).
_USERINFO: Final = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]*@", re.IGNORECASE)


def redact_text(text: str) -> str:
    """``text`` with the user information of every URL in it (``user:password@``) masked.

    For free text, where a URL cannot be told from its surroundings reliably: the whole user
    part goes (a user name alone may be a token), whatever the scheme.
    """
    return _USERINFO.sub(r"\g<scheme>***@", text)


class RedisURL(str):
    """A Redis URL: the full URL as a string, with its password masked in ``repr()``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact(self))


def _as_redis_url(value: str) -> RedisURL:
    # Checked when settings load (not on the first call); the message never repeats the value,
    # which may be a password typed in the wrong place.
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in _URL_SCHEMES or not rest:
        raise ValueError(
            "must be a redis://, rediss:// or unix:// URL, or redis+sentinel://, "
            "redis+cluster:// (valkey:// forms too)"
        )
    return RedisURL(value)


# The annotation of every ``state_url``: validated as a string of one of the schemes above, kept
# as a RedisURL (usable as is by its user), dumped to JSON redacted, like pydantic's SecretStr.
StateURL = Annotated[
    str,
    AfterValidator(_as_redis_url),
    PlainSerializer(redact, return_type=str, when_used="json"),
]


def shown(value: object) -> object:
    """``value`` as it may be printed: a :class:`RedisURL` redacted, anything else unchanged."""
    return redact(value) if isinstance(value, RedisURL) else value
