"""`_request` as a workflow gets it (sandbox/request.py): a dict that ignores case."""

import json

from sandbox.request import RequestDict


def test_missing_keys_are_found_again_ignoring_case() -> None:
    request = RequestDict({"content-type": "application/json", "Page": "2"})
    assert request["Content-Type"] == request["CONTENT-TYPE"] == "application/json"
    assert request.get("PAGE") == "2"
    assert "X-Missing" not in request and request.get("X-Missing", "none") == "none"
    assert "content-TYPE" in request


def test_an_exact_key_wins_over_one_that_differs_in_case() -> None:
    request = RequestDict({"name": "header", "Name": "body field"})
    assert (request["Name"], request["name"]) == ("body field", "header")


def test_it_stays_a_plain_dict() -> None:
    request = RequestDict({"a": 1})
    assert isinstance(request, dict)
    assert json.loads(json.dumps(request)) == {"a": 1}
    assert 3 not in request and [] not in request
