"""Each workflow's persistent directory, $WFD_WORKFLOW_DIR (SPEC 10)."""

import json

import requests

FILES = """
import errno, json, os
def workflow(_request, settings):
    root = os.environ["WFD_WORKFLOW_DIR"]
    out = {"dir": root}
    if "write" in _request:
        with open(os.path.join(root, _request["write"]), "w") as handle:
            handle.write(_request.get("text", ""))
    if "fill" in _request:
        written = 0
        try:
            with open(os.path.join(root, "big"), "wb") as handle:
                while True:
                    handle.write(b"x" * (1 << 20))
                    handle.flush()
                    written += 1 << 20
        except OSError as exc:
            out["fill"] = {"errno": errno.errorcode[exc.errno], "written": written}
        os.unlink(os.path.join(root, "big"))
    if "find" in _request:  # anywhere this execution can reach, but its own directory
        out["found"] = [os.path.join(top, name)
                        for top, dirs, names in os.walk("/", onerror=lambda exc: None)
                        if not top.startswith(("/proc", "/sys", "/usr", "/dev", root))
                        for name in dirs + names if name == _request["find"]]
    out["files"] = {name: open(os.path.join(root, name)).read()
                    for name in sorted(os.listdir(root))}
    return {"status_code": 200, "body": json.dumps(out)}
"""


def call(url: str, **body: object) -> dict:
    response = requests.post(url, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_executions_of_a_workflow_share_it_and_no_other_workflow_sees_it(daemon, name):
    mine, other = daemon.deploy(name, FILES), daemon.deploy(f"{name}-other", FILES)
    first = call(mine, write="cursor", text="u41")
    assert first["dir"].startswith("/")
    assert call(mine)["files"] == {"cursor": "u41"}
    assert call(other) == {"dir": first["dir"], "files": {}}  # same path, its own content
    assert call(other, find=f"{name}-mine")["found"] == []
    call(mine, write=f"{name}-mine")
    assert call(other, find=f"{name}-mine")["found"] == []
    assert call(mine, find=f"{name}-mine")["found"] == []  # its own dir is not searched
    call(other, write="cursor", text="theirs")
    assert call(mine)["files"] == {"cursor": "u41", f"{name}-mine": ""}


def test_it_survives_redeploys_and_restarts_moves_with_export_and_goes_with_delete(
        make_daemon, name, tmp_path):
    source = make_daemon()
    url = source.deploy(name, FILES)
    call(url, write="state.json", text='{"last": 7}')
    url = source.deploy(name, FILES)  # version 2
    source.stop()
    source.start()
    assert call(url)["files"] == {"state.json": '{"last": 7}'}

    backup = tmp_path / "backup.json"
    source.ctl("export", str(backup))
    target = make_daemon(config='executor = "spawn"\n')
    target.ctl("import", str(backup))
    assert call(target.ctl("url", name).stdout.strip())["files"] == {
        "state.json": '{"last": 7}'}

    source.ctl("delete", name)
    assert call(source.deploy(name, FILES))["files"] == {}


def test_a_write_past_files_mb_fails_with_an_oserror_in_the_workflow(make_daemon, name):
    daemon = make_daemon(config="[limits]\nfiles_mb = 8\n")
    url = daemon.deploy(name, FILES)
    call(url, write="kept", text="still here")
    filled = call(url, fill=True)
    assert filled["fill"]["errno"] == "ENOSPC"
    assert 4 << 20 <= filled["fill"]["written"] <= 8 << 20
    assert filled["files"] == {"kept": "still here"}
    assert "ext4 image" in json.dumps(daemon.ctl_json("status")["workflow_files"])
