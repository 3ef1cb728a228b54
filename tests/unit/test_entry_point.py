"""The cheap signature check (sandbox/runner.py) agrees with inspect on every kind of callable."""

import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from sandbox.runner import _takes_positional


class Callable2:
    def __call__(self, a: Any, b: Any) -> None: ...


def decorated(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)
    return wrapper


CALLABLES = {
    "two": lambda a, b: 0,
    "one": lambda a: 0,
    "three": lambda a, b, c: 0,
    "a default": lambda a, b, c=1: 0,
    "all defaults": lambda a=1, b=2, c=3: 0,
    "only *args": lambda *a: 0,
    "one and *args": lambda a, *rest: 0,
    "three and *args": lambda a, b, c, *rest: 0,
    "keyword-only required": lambda a, b, *, k: 0,
    "keyword-only with default": lambda a, b, *, k=1: 0,
    "keyword-only, one required": lambda a, b, *, k=1, j: 0,
    "positional-only": lambda a, /, b: 0,
    "only **kwargs": lambda **kw: 0,
    "two and **kwargs": lambda a, b, **kw: 0,
    "decorated (signature of the wrapped)": decorated(lambda a: 0),
    "partial": functools.partial(lambda a, b: 0, 1),
    "instance": Callable2(),
    "bound method": Callable2().__call__,
    "class": Callable2,
}


def by_inspect(function: Callable[..., Any], count: int) -> bool:
    try:
        inspect.signature(function).bind(*(None,) * count)
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("function", CALLABLES.values(), ids=CALLABLES.keys())
def test_it_agrees_with_inspect(function: Callable[..., Any], count: int) -> None:
    try:
        cheap = _takes_positional(function, count)
    except TypeError:  # what inspect raised for what it had to be asked
        cheap = False
    assert cheap == by_inspect(function, count)
