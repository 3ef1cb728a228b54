"""Record sizes: error and traceback capped like the output, code size per deploy, versions kept."""

import json

import requests

HUGE_ERROR = """
def workflow(_request, settings):
    raise ValueError("x" * (5 * 1024 * 1024))
"""


def test_a_huge_exception_message_is_stored_capped_with_a_note(daemon, name):
    url = daemon.deploy(name, HUGE_ERROR)
    response = requests.post(url, json={}, timeout=30)
    assert response.status_code == 500
    record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
    for field in ("error", "traceback"):
        text = record[field]
        assert text.endswith(f"\n[wfd: {field} cut here, over the 1024 KiB limit]"), text[-80:]
        assert 1024 * 1024 < len(text.encode()) < 1024 * 1024 + 100
    assert record["error"].startswith("ValueError: xxx")


def test_code_over_max_code_kb_is_refused_and_the_running_version_stays(make_daemon, name,
                                                                         tmp_path):
    daemon = make_daemon("max_code_kb = 4\n")
    daemon.deploy(name, "def workflow(_request, settings):\n    return None\n")
    big = tmp_path / "big.py"
    big.write_text("def workflow(_request, settings):\n    return None\n" + "#" * 5000 + "\n")
    result = daemon.ctl("deploy", name, str(big), "--catch", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == ("wfd ctl: deploy refused: the file is 5 KiB, over the "
                                     "limit of 4 KiB (max_code_kb)")
    assert [v["version"] for v in daemon.ctl_json("versions", name)] == [1]


def test_versions_beyond_versions_per_workflow_are_pruned_never_current_or_previous(
        make_daemon, name):
    daemon = make_daemon("[retention]\nversions_per_workflow = 1\n")
    code = "def workflow(_request, settings):\n    return {{'status_code': 200, 'body': '{}'}}\n"
    for version in range(1, 5):
        url = daemon.deploy(name, code.format(version))
    versions = daemon.ctl_json("versions", name)
    # One is kept by the setting; the one before the current is kept anyway.
    assert [(v["version"], v["current"]) for v in versions] == [(3, False), (4, True)]
    daemon.ctl("rollback", name, "3")
    assert requests.post(url, json={}, timeout=30).text == "3"
    daemon.deploy(name, code.format(5))
    assert [v["version"] for v in daemon.ctl_json("versions", name)] == [4, 5]
    exported = json.loads(daemon.ctl("export").stdout)["workflows"][0]
    assert [v["version"] for v in exported["versions"]] == [4, 5]
