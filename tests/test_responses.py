"""What the function returns decides the response (SPEC 2), and failures leak nothing."""

import time

import pytest
import requests


def returning(expression: str) -> str:
    return f"def workflow(_request, settings):\n    return {expression}\n"


def test_a_valid_dict_is_exactly_the_response(daemon, name):
    url = daemon.deploy(name, returning(
        '{"status_code": 201, "body": "{\\"id\\": 7}", '
        '"headers": {"Content-Type": "application/json", "X-Extra": "yes"}}'))
    response = requests.post(url, json={})
    assert response.status_code == 201
    assert response.text == '{"id": 7}'
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Extra"] == "yes"
    assert response.headers["X-Wfd-Execution-Id"]


def test_without_content_type_the_body_is_plain_utf8_text(daemon, name):
    url = daemon.deploy(name, returning('{"status_code": 202, "body": "caf\\u00e9"}'))
    response = requests.post(url, json={})
    assert response.status_code == 202
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.content == "café".encode()


@pytest.mark.parametrize("expression", ["None", "[1, 2]", "'done'", "42", "True"])
def test_anything_but_a_dict_gives_the_default_response(daemon, name, expression):
    url = daemon.deploy(name, returning(expression))
    response = requests.post(url, json={})
    execution_id = response.headers["X-Wfd-Execution-Id"]
    assert response.status_code == 200
    assert response.json() == {"status": "success", "execution_id": execution_id}
    assert daemon.executions(name)[0]["status"] == "success"


@pytest.mark.parametrize("expression, message", [
    ('{"status_code": "200", "body": "x"}', "status_code must be an int, got str '200'"),
    ('{"status_code": True, "body": "x"}', "status_code must be an int, got bool True"),
    ('{"status_code": 200.0, "body": "x"}', "status_code must be an int, got float 200.0"),
    ('{"status_code": 99, "body": "x"}', "status_code must be between 100 and 599, got 99"),
    ('{"status_code": 600, "body": "x"}', "status_code must be between 100 and 599, got 600"),
    ('{"body": "x"}', "the returned dict has no status_code"),
    ('{"status_code": 200}', "the returned dict has no body"),
    ('{"status_code": 200, "body": b"x"}', "body must be a str, got bytes b'x'"),
    ('{"status_code": 200, "body": {"a": 1}}', "body must be a str, got dict"),
    ('{"status_code": 200, "body": "x", "headers": [1]}', "headers must be a dict"),
    ('{"status_code": 200, "body": "x", "headers": {"X-N": 1}}',
     "headers must map str to str, got str 'X-N': int 1"),
    ('{"status_code": 200, "body": "x", "headers": {"X-A": "a\\r\\nSet-Cookie: s=1"}}',
     "header 'X-A' contains a line break or NUL"),
])
def test_a_dict_that_breaks_the_rules_fails_with_a_message(daemon, name, expression, message):
    url = daemon.deploy(name, returning(expression))
    response = requests.post(url, json={})
    execution_id = response.headers["X-Wfd-Execution-Id"]
    assert response.status_code == 500
    assert response.json() == {"status": "error", "execution_id": execution_id}
    assert "Set-Cookie" not in response.headers
    record = daemon.logs(execution_id)
    assert record["status"] == "error"
    assert record["http_status"] == 500
    assert message in record["error"]


def test_an_exception_is_500_and_the_traceback_stays_in_the_log(daemon, name):
    url = daemon.deploy(name, """
        def helper(settings):
            raise ValueError("secret-looking detail " + settings.get("token", ""))

        def workflow(_request, settings):
            print("about to fail")
            helper(settings)
        """)
    daemon.ctl("settings", name, "set", "token=tok-123")
    response = requests.post(url, json={})
    assert response.status_code == 500
    assert "secret" not in response.text and "tok-123" not in response.text
    assert "Traceback" not in response.text
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert record["error"] == "ValueError: secret-looking detail tok-123"
    assert f'File "{name}.py", line 3, in helper' in record["traceback"]
    assert 'raise ValueError("secret-looking detail "' in record["traceback"]
    assert record["output"] == "about to fail\n"
    assert "tok-123" not in daemon.log()  # the daemon's own log never has values


def test_a_timeout_is_504_and_recorded(daemon, name):
    url = daemon.deploy(name, """
        import time
        def workflow(_request, settings):
            print("started", flush=True)
            time.sleep(60)
        """, "--timeout", "1")
    started = time.monotonic()
    response = requests.post(url, json={})
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["status"] == "timeout"
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    assert record["status"] == "timeout"
    assert record["http_status"] == 504
    # Enforced within what a user would accept of a 1 s timeout, as the caller sees it.
    assert 1000 <= record["duration_ms"] < 1500
    assert elapsed < 1.5, elapsed
    assert record["output"] == "started\n"
