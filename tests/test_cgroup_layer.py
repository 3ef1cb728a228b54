"""The cgroup layer as a user of the daemon sees it: required by strict, shared safely.

Real daemons on this host's cgroup v1 tree. A host without a writable tree is
made for real: the daemon runs in its own mount namespace where
/sys/fs/cgroup is an empty read-only tmpfs. Root only (CI's main pass).
"""

from __future__ import annotations

import requests

# The daemon's own mount namespace, in which no cgroup tree is visible.
NO_CGROUPS = ("unshare", "--mount", "sh", "-c",
              'mount -t tmpfs -o ro none /sys/fs/cgroup && exec "$@"', "no-cgroups")
# The daemon as pid 1 of a PID namespace of its own, with its own /proc, as in a container.
OWN_PID_NAMESPACE = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc")

SHOW_CGROUP = '''
def workflow(_request, settings):
    with open("/proc/self/cgroup") as f:
        return {"status_code": 200, "body": f.read()}
'''


def cgroup_layer(daemon) -> dict:
    return daemon.ctl_json("status")["isolation"]["layers"]["cgroup"]


def test_strict_without_a_cgroup_tree_refuses_to_start_and_says_how_to_get_one(make_daemon):
    daemon = make_daemon(start=False, prefix=NO_CGROUPS)
    assert daemon.spawn().wait(30) == 1
    log = daemon.log()
    assert "cannot-start" in log and "needs a cgroup per execution" in log
    assert "no cgroup v1 pids hierarchy" in log  # why, on this host
    assert "Delegate=yes" in log and "require_cgroups = false" in log


def test_opting_out_starts_serves_and_says_what_is_missing(make_daemon, name):
    daemon = make_daemon("[isolation]\nmode = \"strict\"\nrequire_cgroups = false\n",
                         prefix=NO_CGROUPS)
    assert cgroup_layer(daemon)["active"] is False
    log = daemon.log()
    assert "isolation-layer-missing layer=cgroup" in log and "fall back to rlimits" in log
    url = daemon.deploy(name, SHOW_CGROUP)
    reply = requests.post(url, json={}, timeout=30)
    assert reply.status_code == 200 and "exec-" not in reply.text


def test_the_flag_opts_out_too(make_daemon):
    daemon = make_daemon(extra_args=("--no-require-cgroups",), prefix=NO_CGROUPS)
    assert cgroup_layer(daemon)["active"] is False


def test_a_daemon_in_another_pid_namespace_leaves_a_live_daemons_groups_alone(
    make_daemon, name,
):
    host = make_daemon()
    url = host.deploy(name, SHOW_CGROUP)
    assert "exec-" in requests.post(url, json={}, timeout=30).text
    # To the contained daemon, the host daemon's pid is no process at all.
    contained = make_daemon(prefix=OWN_PID_NAMESPACE)
    assert cgroup_layer(contained)["active"] is True
    assert cgroup_layer(contained)["detail"] != cgroup_layer(host)["detail"]
    reply = requests.post(url, json={}, timeout=30)
    assert reply.status_code == 200 and "exec-" in reply.text
    contained_url = contained.deploy(name, SHOW_CGROUP)
    assert "exec-" in requests.post(contained_url, json={}, timeout=30).text
