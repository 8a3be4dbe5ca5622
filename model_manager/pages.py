"""Page tokens of the registry's listings: opaque to callers, each carrying the last key of the page it ends."""

from __future__ import annotations

import base64

from chassis.errors import InvalidArgument


def token(kind: str, key: str) -> str:
    """The token of the page after the one ending at `key`, in the listing `kind`."""
    return base64.urlsafe_b64encode(f"{kind}:{key}".encode()).decode().rstrip("=")


def last_key(field: str, kind: str, value: str) -> str:
    """The key a token carries; INVALID_ARGUMENT if it is not a token of the listing `kind`."""
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        text = ""
    prefix, _, key = text.partition(":")
    if prefix != kind or not key or "\x00" in key or len(key) > 256:
        raise InvalidArgument(f"{field}: expected the next_page_token of a previous call, got {value[:80]!r}")
    return key


def last_number(field: str, kind: str, value: str) -> int:
    """The numeric key a token carries (a version number or an audit id)."""
    key = last_key(field, kind, value)
    if not key.isdigit() or int(key) >= 2**63:
        raise InvalidArgument(f"{field}: expected the next_page_token of a previous call, got {value[:80]!r}")
    return int(key)
