"""The ops' environment switches (``DIFFRL_FAST_CHECKS``, ``DIFFRL_FAST_BACKEND``), read at every eager op call.

``os.environ.get`` of a variable that is not set raises and catches two KeyErrors inside ``os.environ``
(about 1 microsecond, a noticeable share of a small fused call). ``getenv`` reads the mapping that
``os.environ`` keeps, which its setters and deleters (and so ``monkeypatch.setenv``) update, and falls back
to ``os.environ.get`` where that mapping is not there.
"""
from __future__ import annotations

import os
from typing import Optional

_DATA = getattr(os.environ, "_data", None)
_KEYS: dict[str, object] = {}


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``, without the exception round trip for an unset variable."""
    if not isinstance(_DATA, dict):
        return os.environ.get(name)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.environ.encodekey(name)  # type: ignore[attr-defined]
    value = _DATA.get(key)
    return None if value is None else os.environ.decodevalue(value)  # type: ignore[attr-defined]
