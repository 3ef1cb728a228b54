"""The child's side of settings: the change it reports, checked for JSON (sandbox/rules.py)."""

import pytest

from sandbox.rules import RuleError, settings_change

GIVEN = {"keep": 1, "edit": "old", "drop": [1], "nested": {"a": 1}}


@pytest.mark.parametrize(("now", "change"), [
    (dict(GIVEN), {"set": {}, "unset": []}),
    ({**GIVEN, "new": None}, {"set": {"new": None}, "unset": []}),
    ({**GIVEN, "edit": "new"}, {"set": {"edit": "new"}, "unset": []}),
    ({k: v for k, v in GIVEN.items() if k != "drop"}, {"set": {}, "unset": ["drop"]}),
    ({**GIVEN, "nested": {"a": 2}}, {"set": {"nested": {"a": 2}}, "unset": []}),
    ({}, {"set": {}, "unset": ["keep", "edit", "drop", "nested"]}),
    # Equal in Python, not the same JSON value: a change.
    ({**GIVEN, "keep": 1.0}, {"set": {"keep": 1.0}, "unset": []}),
    ({**GIVEN, "keep": True}, {"set": {"keep": True}, "unset": []}),
    ({**GIVEN, "nested": {"a": 1.0}}, {"set": {"nested": {"a": 1.0}}, "unset": []}),
    ({**GIVEN, "drop": [True]}, {"set": {"drop": [True]}, "unset": []}),
])  # fmt: skip
def test_only_what_changed_is_reported(now: dict, change: dict) -> None:
    assert settings_change(GIVEN, now) == change


def test_a_key_changed_in_place_is_reported() -> None:
    given = {"items": [1]}
    now = {"items": [1, 2]}  # the workflow's own copy, appended to
    assert settings_change(given, now) == {"set": {"items": [1, 2]}, "unset": []}


def test_size_is_not_the_childs_to_judge() -> None:
    big = {"blob": "x" * (4 << 20)}
    assert settings_change({}, big) == {"set": big, "unset": []}


@pytest.mark.parametrize(("now", "message"), [
    ([], "settings must stay a dict, got list []"),
    (None, "settings must stay a dict, got NoneType None"),
    ({3: "x"}, "settings key 3 is not a string"),
    ({"when": {1, 2}}, "settings['when'] is not JSON-serializable: Object of type set"),
    ({"ratio": float("nan")},
     "settings['ratio'] is not JSON-serializable: Out of range float values"),
    ({"keep": 1, "deep": {"x": object()}}, "settings['deep'] is not JSON-serializable"),
])  # fmt: skip
def test_unstorable_settings_are_refused_naming_the_key(now: object, message: str) -> None:
    with pytest.raises(RuleError) as exc:
        settings_change({"keep": 1}, now)
    assert str(exc.value).startswith(message)
