"""Identifiers: time-ordered execution ids and secret catch keys."""

import os
import secrets
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def execution_id() -> str:
    """A 26-character id that sorts by creation time (a lowercase ULID).

    48 bits of milliseconds then 80 random bits: ids made in the same
    millisecond are unique but unordered, which is all listings need.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10))
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def catch_key() -> str:
    """A URL-safe secret with 192 random bits (the spec asks for at least 128)."""
    return secrets.token_urlsafe(24)
