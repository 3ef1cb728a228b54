"""What a catch workflow's return value means, as the child checks it (sandbox/rules.py)."""

import pytest

from sandbox.rules import RuleError, response

LIMIT = 100


@pytest.mark.parametrize("value", [None, "text", 200, ["status_code"], ("a", 1), True])
def test_anything_but_a_dict_means_the_default_response(value: object) -> None:
    assert response(value, LIMIT) is None


@pytest.mark.parametrize(("value", "expected"), [
    ({"status_code": 201, "body": "made"}, {"status_code": 201, "body": "made", "headers": {}}),
    ({"status_code": 202, "body": "", "headers": None}, {"status_code": 202, "body": "",
                                                         "headers": {}}),
    ({"status_code": 599, "body": "x" * LIMIT, "headers": {"X-A": "1"}, "extra": "ignored"},
     {"status_code": 599, "body": "x" * LIMIT, "headers": {"X-A": "1"}}),
])  # fmt: skip
def test_a_valid_dict_is_exactly_the_response(value: dict, expected: dict) -> None:
    assert response(value, LIMIT) == expected


@pytest.mark.parametrize(("value", "message"), [
    ({"body": "x"}, "the returned dict has no status_code"),
    ({"status_code": "200", "body": "x"}, "status_code must be an int, got str '200'"),
    ({"status_code": True, "body": "x"}, "status_code must be an int, got bool True"),
    ({"status_code": 200.0, "body": "x"}, "status_code must be an int, got float 200.0"),
    ({"status_code": 99, "body": "x"}, "status_code must be between 100 and 599, got 99"),
    ({"status_code": 600, "body": "x"}, "status_code must be between 100 and 599, got 600"),
    ({"status_code": 200}, "the returned dict has no body"),
    ({"status_code": 200, "body": b"x"}, "body must be a str, got bytes b'x'"),
    ({"status_code": 200, "body": {"a": 1}}, "body must be a str, got dict {'a': 1}"),
    ({"status_code": 200, "body": "é" * 51}, f"body is 102 bytes, over the limit of {LIMIT}"),
    ({"status_code": 200, "body": "", "headers": ["X-A"]}, "headers must be a dict, got list"),
    ({"status_code": 200, "body": "", "headers": {"X-N": 1}},
     "headers must map str to str, got str 'X-N': int 1"),
    ({"status_code": 200, "body": "", "headers": {"X-A": "a\r\nSet-Cookie: x"}},
     "header 'X-A' contains a line break or NUL"),
    ({"status_code": 200, "body": "", "headers": {"X-A\n": "a"}},
     "header 'X-A\\n' contains a line break or NUL"),
    ({"status_code": 200, "body": "", "headers": {"X-A": "a\0"}},
     "header 'X-A' contains a line break or NUL"),
])  # fmt: skip
def test_a_dict_that_breaks_a_rule_is_refused_naming_it(value: dict, message: str) -> None:
    with pytest.raises(RuleError) as exc:
        response(value, LIMIT)
    assert str(exc.value).startswith(message)


def test_a_long_value_is_cut_in_the_message() -> None:
    with pytest.raises(RuleError) as exc:
        response({"status_code": "2" * 100, "body": ""}, LIMIT)
    assert str(exc.value) == f"status_code must be an int, got str '{'2' * 36}..."
