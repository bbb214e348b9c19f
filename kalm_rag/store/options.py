"""Checks of store options, shared by :func:`~kalm_rag.store.open_store` and the backends' constructors.

A value may come from a URL (a string) or from a keyword argument (a number, ``None``, a string): each
check accepts both, returns the parsed value and raises :class:`~kalm_rag.errors.StoreConfigError` naming
the option and the value it refused. Nothing here touches a file or the network.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kalm_rag.errors import StoreConfigError

__all__ = [
    "MAX_SECONDS",
    "check_bool",
    "check_count",
    "check_prefix",
    "check_seconds",
    "did_you_mean",
    "parse_bytes",
    "redact_url",
]

#: The longest duration any store option accepts. SQLite turns its timeout into int32 milliseconds, so
#: anything above ~2.1e6 s would wrap around and disable waiting altogether.
MAX_SECONDS = 1_000_000.0

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?:E(?P<exp>[+-]?\d{1,3}))?(?P<unit>[KMGT]?I?B?)")
_SECRET_PARAMS = {"password", "pass", "passwd", "pwd", "secret", "token", "ssl_password", "auth", "access_token"}


def parse_bytes(value: object, name: str = "size") -> int:
    """A size in bytes from ``2GB``, ``512MiB``, ``1e9``, ``1000000`` or an int; refuses negatives and infinities.

    Args:
        value: a string (decimal ``KB/MB/GB/TB`` or binary ``KiB/MiB/GiB/TiB`` units, case-insensitive) or a
            non-negative int (a float is accepted when it is finite and whole).
        name: the option's name, for the error message.

    Returns:
        The size in bytes.

    Example:
        >>> parse_bytes("512MiB"), parse_bytes("2GB"), parse_bytes(7)
        (536870912, 2000000000, 7)
    """
    if isinstance(value, bool):
        raise StoreConfigError(f"{name} must be a size such as 2GB, 512MiB or 1000000, got {value!r}")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise StoreConfigError(f"{name} must be >= 0 bytes, got {value}")
        if value >= 2**63:
            raise StoreConfigError(f"{name} {value} is too large (at most 2**63 - 1 bytes)")
        return value
    if not isinstance(value, str):
        raise StoreConfigError(f"{name} must be a size such as 2GB, 512MiB or 1000000, got {value!r:.80}")
    text = value.strip().upper().replace(" ", "").replace("_", "")
    match = _SIZE.fullmatch(text)
    if match is None or match["unit"] not in _UNITS:
        raise StoreConfigError(
            f"cannot parse {name} {value!r:.80}: use a non-negative size such as 2GB, 512MiB or 1000000"
        )
    number = float(match["number"] + (f"E{match['exp']}" if match["exp"] else "")) * _UNITS[match["unit"]]
    if not math.isfinite(number) or number >= 2**63:
        raise StoreConfigError(f"{name} {value!r:.80} is too large (at most 2**63 - 1 bytes)")
    return int(number)


def check_seconds(
    value: object, name: str, *, allow_zero: bool = False, allow_none: bool = False, maximum: float = MAX_SECONDS
) -> float | None:
    """A finite duration in seconds, ``0 < value <= maximum`` (``0`` too when ``allow_zero``).

    Args:
        value: a number or a string holding one (``"none"`` means ``None`` when ``allow_none``).
        name: the option's name, for the error message.
        allow_zero: accept ``0``.
        allow_none: accept ``None`` (no limit).
        maximum: the largest accepted value.

    Returns:
        The duration as a float, or ``None``.
    """
    if allow_none and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = None
    low = ">= 0" if allow_zero else "> 0"
    if seconds is None or not math.isfinite(seconds):
        raise StoreConfigError(f"{name} must be a finite number of seconds {low}, got {value!r:.80}")
    if seconds < 0 or (seconds == 0 and not allow_zero) or seconds > maximum:
        raise StoreConfigError(f"{name} must be {low} and <= {maximum:g} seconds, got {value!r:.80}")
    return seconds


def check_count(value: object, name: str, *, minimum: int = 0) -> int:
    """An int ``>= minimum`` (from an int or a string of digits)."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,18}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StoreConfigError(f"{name} must be an int >= {minimum}, got {value!r:.80}")
    return value


def check_bool(value: object, name: str) -> bool:
    """A bool (from a bool or one of ``true/false/yes/no/on/off/1/0``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    raise StoreConfigError(f"{name} must be true or false, got {value!r:.80}")


def check_prefix(value: object) -> str:
    """A Redis key prefix: 1-64 letters, digits, ``_``, ``.`` or ``-``."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", value):
        raise StoreConfigError(f"prefix must be 1-64 letters, digits, '_', '.' or '-', got {value!r:.80}")
    return value


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def redact_url(url: object) -> str:
    """``url`` with its password (user info and any secret query parameter) replaced by ``***``.

    The user info ends at the *last* ``@`` of the authority (as URL parsers read it), so a password that
    itself contains ``@`` is hidden whole.

    Example:
        >>> redact_url("redis://:p@ss@cache:6379/0?password=x&db=1")
        'redis://:***@cache:6379/0?password=***&db=1'
    """
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:  # not even parseable: hide everything after the scheme
        scheme, sep, _ = text.partition("://")
        return f"{scheme}{sep}***" if sep else "***"
    netloc, masked = parts.netloc, False
    userinfo, at, host = netloc.rpartition("@")
    if at and userinfo:
        user, colon, _ = userinfo.partition(":")
        netloc, masked = (f"{user}:***@{host}" if colon else f"***@{host}"), True
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
            masked = True
    if not masked:
        return text
    head = f"{parts.scheme}://{netloc}" if "://" in text else urlunsplit((parts.scheme, netloc, "", "", ""))
    return head + parts.path + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
