"""The daemon's side of settings: what of a change is merged, and the one size check."""

import orjson
import pytest

from wfd.store import SettingsTooLarge, changed_since, merge_settings, settings_json

GIVEN = {"k": "old", "n": 1, "obj": {"a": [1, 2]}}


@pytest.mark.parametrize(("change", "kept"), [
    ({"set": {"k": "new"}, "unset": []}, {"set": {"k": "new"}, "unset": []}),
    # Sent back as given: not a change of this execution's, dropped.
    ({"set": {"k": "old", "n": 1, "obj": {"a": [1, 2]}}, "unset": []},
     {"set": {}, "unset": []}),
    ({"set": dict(GIVEN, added=True), "unset": []}, {"set": {"added": True}, "unset": []}),
    # Removing a key it was never given would remove another execution's.
    ({"set": {}, "unset": ["k", "never-given"]}, {"set": {}, "unset": ["k"]}),
    # The same in Python, a different JSON value: kept.
    ({"set": {"n": 1.0}, "unset": []}, {"set": {"n": 1.0}, "unset": []}),
    ({"set": {"n": True}, "unset": []}, {"set": {"n": True}, "unset": []}),
    ({"set": {"obj": {"a": [1, 2.0]}}, "unset": []}, {"set": {"obj": {"a": [1, 2.0]}},
                                                      "unset": []}),
    ({"set": {"obj": {"a": [1, 2], "b": 0}}, "unset": []},
     {"set": {"obj": {"a": [1, 2], "b": 0}}, "unset": []}),
    ({"set": {}, "unset": []}, {"set": {}, "unset": []}),
])  # fmt: skip
def test_changed_since_keeps_only_real_changes(change: dict, kept: dict) -> None:
    assert changed_since(GIVEN, change) == kept


def test_a_resent_key_cannot_undo_a_concurrent_change() -> None:
    # Both executions were given GIVEN; the other one stored k = "theirs" first.
    stored = {**GIVEN, "k": "theirs", "b": 2}
    resent = {"set": {**GIVEN, "mine": 1}, "unset": ["b"]}
    merged = merge_settings(stored, changed_since(GIVEN, resent))
    assert merged == {**GIVEN, "k": "theirs", "b": 2, "mine": 1}


def test_on_the_same_key_the_merge_applied_last_wins() -> None:
    first = merge_settings(GIVEN, changed_since(GIVEN, {"set": {"k": "a"}, "unset": []}))
    second = merge_settings(first, changed_since(GIVEN, {"set": {"k": "b"}, "unset": []}))
    assert second["k"] == "b"


def test_merge_sets_and_unsets_without_touching_its_input() -> None:
    stored = {"a": 1, "b": 2}
    assert merge_settings(stored, {"set": {"c": 3, "a": 0}, "unset": ["b", "zz"]}) == {
        "a": 0, "c": 3}
    assert stored == {"a": 1, "b": 2}


def test_the_size_limit_is_exact_on_what_is_stored() -> None:
    settings = {"k": "é" * 10}  # stored as UTF-8: 2 bytes each
    size = len(orjson.dumps(settings))
    assert size == len('{"k":""}') + 20
    assert settings_json(settings, size) == orjson.dumps(settings)
    with pytest.raises(SettingsTooLarge) as exc:
        settings_json(settings, size - 1)
    assert str(exc.value) == (f"settings would be {size} bytes, over the limit of {size - 1} "
                              f"bytes (settings_kb = {(size - 1) // 1024})")
