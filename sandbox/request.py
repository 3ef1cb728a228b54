"""The `_request` dict a catch workflow receives."""

from typing import Any


class RequestDict(dict[Any, Any]):
    """A real dict whose missing keys are looked up again ignoring case.

    HTTP/2 clients and proxies lowercase header names, yet workflows written
    for HrFlow read `_request["Content-Type"]`. A dict subclass keeps
    `json.dumps(_request)` and `isinstance(_request, dict)` working, while an
    exact key (a body field, say) is always found first.
    """

    def __missing__(self, key: Any) -> Any:
        if isinstance(key, str):
            folded = key.casefold()
            for candidate, value in self.items():
                if isinstance(candidate, str) and candidate.casefold() == folded:
                    return value
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except (KeyError, TypeError):
            return False
        return True
