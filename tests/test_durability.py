"""Acknowledged work survives a crash of the daemon (SPEC 4, store in WAL mode)."""

import sqlite3
from concurrent.futures import ThreadPoolExecutor

import requests


def test_kill_9_after_acknowledged_requests_loses_no_settings_change(make_daemon, name, tmp_path):
    daemon = make_daemon()
    url = daemon.deploy(name, """
        def workflow(_request, settings):
            settings[_request["key"]] = _request["value"]
        """)
    keys = [f"k{i:03d}" for i in range(60)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda k: requests.post(url, json={"key": k, "value": k.upper()}), keys))
    failed = [daemon.logs(r.headers["X-Wfd-Execution-Id"]) for r in responses
              if r.status_code != 200]
    assert failed == []
    daemon.kill()

    restarted = make_daemon(data_dir=daemon.data_dir)
    settings = restarted.ctl_json("settings", name)
    assert settings == {k: k.upper() for k in keys}
    ids = {r.headers["X-Wfd-Execution-Id"] for r in responses}
    recorded = {e["id"] for e in restarted.executions(name, limit=100)}
    assert ids <= recorded


def test_the_database_is_sqlite_in_wal_mode_with_numbered_migrations(make_daemon, name):
    daemon = make_daemon()
    daemon.deploy(name, "def workflow(_request, settings):\n    pass\n")
    with sqlite3.connect(daemon.data_dir / "wfd.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"workflows", "versions", "executions"} <= tables
    assert daemon.stop() == 0
    restarted = make_daemon(data_dir=daemon.data_dir)  # migrations are idempotent
    assert [w["name"] for w in restarted.ctl_json("list")] == [name]


def test_the_data_directory_and_socket_are_private(make_daemon):
    daemon = make_daemon()
    assert daemon.data_dir.stat().st_mode & 0o777 == 0o700
    from pathlib import Path

    assert Path(daemon.socket).stat().st_mode & 0o777 == 0o600
