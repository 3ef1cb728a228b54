"""What a workflow may return and store: the rules of SPEC sections 2 and 4."""

import json
from typing import Any

from sandbox import protocol


class RuleError(Exception):
    """A returned value or a settings change breaks a rule; the message names it."""


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def response(value: Any, max_body_bytes: int) -> dict[str, Any] | None:
    """The HTTP response a catch workflow asked for, or None for the default one.

    Anything that is not a dict means "use the default response"; a dict must
    be a complete, valid response, so a typo fails loudly instead of sending
    the caller something half-right.
    """
    if not isinstance(value, dict):
        return None
    if "status_code" not in value:
        raise RuleError("the returned dict has no status_code")
    status = value["status_code"]
    if type(status) is not int:
        raise RuleError(f"status_code must be an int, got {_describe(status)}")
    if not 100 <= status <= 599:
        raise RuleError(f"status_code must be between 100 and 599, got {status}")
    if "body" not in value:
        raise RuleError("the returned dict has no body")
    body = value["body"]
    if not isinstance(body, str):
        raise RuleError(f"body must be a str, got {_describe(body)}")
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > max_body_bytes:
        raise RuleError(f"body is {size} bytes, over the limit of {max_body_bytes}")
    headers = value.get("headers") or {}
    if not isinstance(headers, dict):
        raise RuleError(f"headers must be a dict, got {_describe(headers)}")
    for name, text in headers.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise RuleError("headers must map str to str, got "
                            f"{_describe(name)}: {_describe(text)}")
        if any(c in name + text for c in "\r\n\0"):
            raise RuleError(f"header {name!r} contains a line break or NUL")
    return {"status_code": status, "body": body, "headers": headers}


def settings_change(given: dict[str, Any], now: Any, max_depth: int = 64) -> dict[str, Any]:
    """The keys a workflow added, changed or removed, checked for JSON.

    Only the difference is returned, so the daemon can merge it key by key:
    two executions that touch different keys both keep their changes. The
    size limit is the daemon's to check, at the merge: only there is the
    whole stored object known.
    """
    if not isinstance(now, dict):
        raise RuleError(f"settings must stay a dict, got {_describe(now)}")
    changed = {}
    for key, value in now.items():
        if not isinstance(key, str):
            raise RuleError(f"settings key {key!r} is not a string")
        if key in given and given[key] == value and _same_json(given[key], value):
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RuleError(f"settings[{key!r}] is not JSON-serializable: {exc}") from None
        if protocol.depth(value, max_depth) + 1 > max_depth:
            raise RuleError(f"settings[{key!r}] is nested deeper than the limit of "
                            f"{max_depth} levels")
        changed[key] = value
    removed = [key for key in given if key not in now]
    return {"set": changed, "unset": removed}


def _same_json(a: Any, b: Any) -> bool:
    """Two values Python calls equal, compared as JSON at every depth.

    1, 1.0 and True are equal in Python but three different JSON values;
    a change between them, even nested, must reach the store.
    """
    try:
        return protocol.dumps(a) == protocol.dumps(b)
    except protocol.CodecError:  # not JSON at all: the caller's own check says why
        return False
