"""The self-test's verdict: which checks count as failures."""

import pytest

from wfd.isolation import selftest


@pytest.mark.parametrize("held, expected, failed", [
    (True, True, False), (False, True, True), (False, False, False), (True, False, False)])
def test_a_check_fails_only_when_it_was_expected_to_hold(held, expected, failed):
    checks = {"data_dir_hidden": selftest.Check(held, expected, None)}
    assert selftest.failures(checks) == (["data_dir_hidden"] if failed else [])
