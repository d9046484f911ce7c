"""Protect the clients a service calls (httpx, requests, aiohttp, gRPC) and carry deadlines in.

Each client integration is a submodule that imports its client library, installed through the
extra of the same name (``pip install 'buttress[httpx]'``); this package imports none of them.
Inbound, :mod:`buttress.integrations.asgi` and :mod:`buttress.integrations.wsgi` read the
caller's deadline and turn rejections into 503/429 answers. See ``docs/integrations.md``.
"""

from __future__ import annotations

from buttress.integrations._core import DEFAULT_DEADLINE_HEADER, DEFAULT_MAX_HOSTS
from buttress.patterns._transient import FailedResponse

__all__ = ["DEFAULT_DEADLINE_HEADER", "DEFAULT_MAX_HOSTS", "FailedResponse"]
