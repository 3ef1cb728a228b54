"""Signature verification in the daemon (SPEC 11), driven over real HTTP and `wfd ctl`.

For each scheme: a valid signature runs the workflow (which still gets the
parsed `_request`); an invalid, missing or stale one answers 401
`invalid_signature`, runs nothing, is counted in /metrics and logged
without the secret.
"""

import json
import time

import orjson
import pytest
import requests
from conftest import Daemon, wait_for
from signing import github_header, hrflow_header, standard_headers, standard_signature
from test_metrics import scrape

ECHO = """
    def workflow(_request, settings):
        return {"status_code": 200, "body": __import__("json").dumps(_request),
                "headers": {"Content-Type": "application/json"}}
    """
SECRETS = {"hrflow": "hrflow-secret-1", "standard": "whsec_c2VjcmV0LWtleS1vbmUtMjQtYnl0ZXMh",
           "github": "github-secret-1"}
ROTATED = {"hrflow": "hrflow-secret-2", "standard": "whsec_c2VjcmV0LWtleS10d28tMjQtYnl0ZXMh",
           "github": "github-secret-2"}
BODY = orjson.dumps({"type": "profile.parse.success", "profile": {"key": "k1"}})


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Daemon:
    daemon = Daemon(tmp_path_factory.mktemp("signed") / "data").start()
    yield daemon
    daemon.kill()


def set_secret(daemon: Daemon, name: str, scheme: str, secret: str) -> None:
    path = daemon.data_dir.parent / f"{name}.secret"
    path.write_text(secret + "\n")
    daemon.ctl("verify", name, scheme, "--secret-file", str(path))


def signed(scheme: str, secret: str, body: bytes = BODY, **kw) -> dict[str, str]:
    if scheme == "hrflow":
        return {"HTTP-HRFLOW-SIGNATURE": hrflow_header(secret, body)}
    if scheme == "standard":
        return standard_headers(secret, body, **kw)
    return github_header(secret, body)


def post(url: str, headers: dict[str, str], body: bytes = BODY) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("scheme", ["hrflow", "standard", "github"])
def test_valid_signature_runs_and_the_workflow_gets_the_parsed_request(shared, name, scheme):
    url = shared.deploy(name, ECHO)
    set_secret(shared, name, scheme, SECRETS[scheme])
    response = post(url, signed(scheme, SECRETS[scheme]))
    assert response.status_code == 200, response.text
    seen = response.json()
    assert seen["type"] == "profile.parse.success" and seen["profile"] == {"key": "k1"}
    assert [e["status"] for e in shared.executions(name)] == ["success"]


@pytest.mark.parametrize("scheme", ["hrflow", "standard", "github"])
@pytest.mark.parametrize("case", ["invalid", "missing", "stale"])
def test_bad_signatures_answer_401_and_run_nothing(shared, name, scheme, case):
    url = shared.deploy(name, ECHO)
    secret = SECRETS[scheme]
    set_secret(shared, name, scheme, secret)
    if case == "missing":
        headers = {}
    elif case == "invalid":
        headers = signed(scheme, secret, body=BODY + b" ")  # signed another body
        if scheme == "hrflow":  # the event is in the header: tamper with its signature
            good = signed(scheme, secret)["HTTP-HRFLOW-SIGNATURE"]
            headers = {"HTTP-HRFLOW-SIGNATURE": signed(scheme, "x")["HTTP-HRFLOW-SIGNATURE"]
                       .split(".")[0] + "." + good.split(".")[1]}
    elif scheme == "standard":  # stale: signed six minutes ago
        headers = signed(scheme, secret, timestamp=int(time.time()) - 360)
    else:  # stale: signed with the secret the workflow had before a rotation
        headers = signed(scheme, secret)
        set_secret(shared, name, scheme, ROTATED[scheme])
    response = post(url, headers)
    assert response.status_code == 401
    assert response.json() == {"status": "invalid_signature",
                               "execution_id": response.headers["X-Wfd-Execution-Id"]}
    assert shared.executions(name) == []
    samples = scrape(shared.base)
    assert samples[("wfd_invalid_signatures_total",
                    (("scheme", scheme), ("workflow", name)))] == 1
    log = wait_for(lambda: [line for line in shared.log().splitlines()
                            if "invalid-signature" in line and name in line],
                   what="the log line")
    assert len(log) == 1
    assert all(s not in shared.log() for s in (*SECRETS.values(), *ROTATED.values()))


def test_standard_rotation_two_signatures_either_secret_passes(shared, name):
    """The sender signs with its old and new secret while receivers switch over."""
    url = shared.deploy(name, ECHO)

    def rotating(msg_id: str, secrets: tuple[str, ...]) -> dict[str, str]:
        now = int(time.time())
        return {"webhook-id": msg_id, "webhook-timestamp": str(now), "webhook-signature":
                " ".join(standard_signature(s, BODY, msg_id, now) for s in secrets)}

    both = (SECRETS["standard"], ROTATED["standard"])
    set_secret(shared, name, "standard", SECRETS["standard"])
    assert post(url, rotating("msg_1", both)).status_code == 200
    set_secret(shared, name, "standard", ROTATED["standard"])
    assert post(url, rotating("msg_2", both)).status_code == 200
    assert post(url, rotating("msg_3", both[:1])).status_code == 401
    assert [e["status"] for e in shared.executions(name)] == ["success", "success"]


def test_github_signature_over_a_form_body_and_a_multipart_body(shared, name):
    url = shared.deploy(name, ECHO)
    set_secret(shared, name, "github", SECRETS["github"])
    form = b"a=1&b=two"
    response = requests.post(url, data=form, headers={
        "Content-Type": "application/x-www-form-urlencoded", **github_header(SECRETS["github"],
                                                                            form)})
    assert response.status_code == 200 and response.json()["b"] == "two"
    prepared = requests.Request("POST", url, data={"field": "v"},
                                files={"cv": ("cv.txt", b"hello", "text/plain")}).prepare()
    prepared.headers.update(github_header(SECRETS["github"], prepared.body))
    response = requests.Session().send(prepared)
    assert response.status_code == 200, response.text
    seen = response.json()
    assert seen["field"] == "v"
    assert seen["cv"] == {"filename": "cv.txt", "content_type": "text/plain", "size": 5,
                          "content": "aGVsbG8="}


def test_the_secret_is_never_shown_and_exported_only_on_request(shared, name, tmp_path):
    url = shared.deploy(name, ECHO)
    set_secret(shared, name, "github", SECRETS["github"])
    shown = shared.ctl_json("show", name)
    assert shown["delivery"]["verify"] == "github"
    listed = shared.ctl("show", name).stdout + shared.ctl("list").stdout
    assert SECRETS["github"] not in json.dumps(shown) + listed
    plain = shared.ctl_json("export")
    assert SECRETS["github"] not in json.dumps(plain)
    secret_export = tmp_path / "with.json"
    shared.ctl("export", str(secret_export), "--with-secrets")
    exported = {w["name"]: w for w in json.loads(secret_export.read_text())["workflows"]}
    assert exported[name]["delivery"]["secret"] == SECRETS["github"]
    shared.ctl("verify", name, "off")
    assert post(url, {}).status_code == 200
    assert shared.ctl_json("show", name)["delivery"]["verify"] == "off"


def test_verify_refuses_bad_usage_with_a_clear_message(shared, name, monkeypatch):
    shared.deploy(name, ECHO)
    bad = shared.data_dir.parent / f"{name}.bad"
    bad.write_text("whsec_***not base64***")
    refused = shared.ctl("verify", name, "standard", "--secret-file", str(bad), check=False)
    assert refused.returncode == 1 and "base64" in refused.stderr
    assert "not base64" not in refused.stderr
    no_secret = shared.ctl("verify", name, "github", check=False)
    assert no_secret.returncode == 2 and "--secret-file" in no_secret.stderr
    monkeypatch.delenv("WFD_TEST_UNSET", raising=False)
    unset = shared.ctl("verify", name, "github", "--secret-env", "WFD_TEST_UNSET", check=False)
    assert unset.returncode == 2 and "WFD_TEST_UNSET" in unset.stderr
    assert shared.ctl_json("show", name)["delivery"]["verify"] == "off"


def test_secret_from_the_environment_and_an_import_without_it_fails_closed(
        make_daemon, name, tmp_path, monkeypatch):
    first = make_daemon()
    url = first.deploy(name, ECHO)
    monkeypatch.setenv("WFD_TEST_SECRET", SECRETS["github"])
    first.ctl("verify", name, "github", "--secret-env", "WFD_TEST_SECRET")
    assert post(url, signed("github", SECRETS["github"])).status_code == 200
    backup = tmp_path / "backup.json"
    first.ctl("export", str(backup))
    second = make_daemon()
    second.ctl("import", str(backup))
    moved = second.ctl("url", name).stdout.strip()
    assert second.ctl_json("show", name)["delivery"]["verify"] == "github"
    assert post(moved, signed("github", SECRETS["github"])).status_code == 401
    monkeypatch.setenv("WFD_TEST_SECRET", SECRETS["github"])
    second.ctl("verify", name, "github", "--secret-env", "WFD_TEST_SECRET")
    assert post(moved, signed("github", SECRETS["github"])).status_code == 200
