"""A zygote's spares wait in cgroups of their own; a job gets its workflow's limits there."""

import requests
from conftest import wait_for

# What the execution sees: its pids cgroup, and whether it could use what
# its limits allow (above a blank group's: 64 MiB, 3 processes).
USES_ITS_LIMITS = """
import subprocess
def workflow(_request, settings):
    group = [line for line in open("/proc/self/cgroup").read().splitlines()
             if ":pids:" in line or line.startswith("0::")][0]
    memory = bytearray(160 * 1024 * 1024)
    memory[::4096] = b"x" * len(memory[::4096])  # touched: charged to the group
    helpers = [subprocess.Popen(["sleep", "5"]) for _ in range(8)]
    for helper in helpers:
        helper.kill()
        helper.wait()
    return {"status_code": 200, "body": group.rsplit("/", 1)[1]}
"""


def test_an_execution_runs_with_its_workflows_limits_in_its_group(daemon, name):
    url = daemon.deploy(name, USES_ITS_LIMITS, "--memory", "256", "--processes", "32")
    executor = daemon.ctl_json("status")["executor"]
    for _ in range(3):  # the first spares may predate the zygote's blank groups
        response = requests.post(url, json={}, timeout=60)
        record = daemon.logs(response.headers["X-Wfd-Execution-Id"])
        assert (response.status_code, record["status"]) == (200, "success"), record
    if executor == "zygote":
        # A spare's own group, made before the request: nothing moved at hand-off.
        assert response.text.startswith("exec-spare-"), response.text
        # Every warm spare waits in a group of its own (status refreshes each second).
        wait_for(lambda: (status := daemon.ctl_json("status"))["spares"]
                 == status["spares_in_cgroups"] >= 1, what="every spare in its own cgroup")
    else:
        assert response.text == f"exec-{record['id']}"
