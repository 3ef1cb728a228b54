"""`wfd ctl export` / `import`: a whole daemon's workflows moved to a fresh data dir."""

import json

import requests


def code(text: str) -> str:
    """A catch workflow that answers `text`."""
    return ("def workflow(_request, settings):\n"
            f"    return {{'status_code': 200, 'body': {text!r}}}\n")


def test_export_then_import_reproduces_every_workflow_version_and_setting(
        make_daemon, name, tmp_path):
    source = make_daemon()
    for suffix, versions in (("a", 3), ("b", 1), ("c", 2)):
        for version in range(1, versions + 1):
            source.deploy(f"{name}-{suffix}", code(f"{suffix}{version}"),
                          "--timeout", str(5 + version),
                          *(("--allow-net", "10.9.0.0/16:443") if suffix == "c" else ()))
    source.ctl("rollback", f"{name}-a", "2")
    source.ctl("settings", f"{name}-a", "set", 'NESTED:={"k": [1, 2.5, null]}', "TOKEN=t")
    source.ctl("settings", f"{name}-c", "set", "N:=3")
    source.ctl("disable", f"{name}-b")
    exported = source.ctl("export").stdout  # to stdout, as in `wfd ctl export > backup`
    dump = tmp_path / "backup.json"
    dump.write_text(exported)

    target = make_daemon()
    target.ctl("import", str(dump))
    assert json.loads(target.ctl("export").stdout) == json.loads(exported)
    for suffix in "abc":
        workflow = f"{name}-{suffix}"
        assert target.ctl_json("versions", workflow) == source.ctl_json("versions", workflow)
        assert target.ctl_json("settings", workflow) == source.ctl_json("settings", workflow)
        shown, original = target.ctl_json("show", workflow), source.ctl_json("show", workflow)
        assert shown["effective_limits"] == original["effective_limits"]
        assert shown["network"] == original["network"]
    assert target.ctl_json("show", f"{name}-c")["allow_net"] == ["10.9.0.0/16:443"]
    moved = target.ctl("url", f"{name}-a").stdout.strip()
    assert moved == source.ctl("url", f"{name}-a").stdout.strip().replace(
        source.base, target.base)
    assert requests.post(moved, json={}).text == "a2"  # the rolled-back version runs
    assert requests.post(target.ctl("url", f"{name}-b").stdout.strip(),
                         json={}).status_code == 404  # still disabled


def test_an_export_whose_current_version_is_missing_is_refused_whole(make_daemon, name,
                                                                      tmp_path):
    source = make_daemon()
    source.deploy(f"{name}-ok", code("ok"))
    source.deploy(f"{name}-broken", code("x"))
    data = json.loads(source.ctl("export").stdout)
    broken = next(w for w in data["workflows"] if w["name"] == f"{name}-broken")
    broken["version"] = 9
    dump = tmp_path / "bad.json"
    dump.write_text(json.dumps(data))
    target = make_daemon()
    result = target.ctl("import", str(dump), check=False)
    assert result.returncode == 1
    assert result.stderr == (f"wfd ctl: {name}-broken: current version 9 is not among its "
                             "versions\n")
    assert target.ctl_json("list") == []
