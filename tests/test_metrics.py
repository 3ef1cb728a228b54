"""`GET /metrics`, read with the Prometheus client's own parser after known traffic."""

import threading

import requests
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families

OK = "def workflow(_request, settings):\n    pass\n"
FAILS = "def workflow(_request, settings):\n    raise ValueError('no')\n"


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    response = requests.get(f"{base}/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def test_counters_after_known_traffic(make_daemon, name):
    daemon = make_daemon()
    ok_url = daemon.deploy(f"{name}-ok", OK)
    bad_url = daemon.deploy(f"{name}-bad", FAILS)
    assert [requests.post(ok_url, json={}).status_code for _ in range(3)] == [200] * 3
    assert [requests.post(bad_url, json={}).status_code for _ in range(2)] == [500] * 2
    assert requests.post(ok_url + "-not-the-key", json={}).status_code == 404
    assert requests.get(ok_url).status_code == 405
    daemon.ctl("run", f"{name}-ok")
    # A success is answered before its child is reaped (README "Answered
    # first, cleaned up after"), and counts as running until then.
    wait_for(lambda: daemon.ctl_json("status")["running"] == 0, what="the last child reaped")

    samples = scrape(daemon.base)
    executions = {labels: value for (metric, labels), value in samples.items()
                  if metric == "wfd_executions_total"}
    assert executions == {(("status", "success"), ("workflow", f"{name}-ok")): 4.0,
                          (("status", "error"), ("workflow", f"{name}-bad")): 2.0}
    assert samples[("wfd_execution_duration_seconds_count",
                    (("workflow", f"{name}-ok"),))] == 4.0
    assert samples[("wfd_execution_duration_seconds_sum", (("workflow", f"{name}-ok"),))] > 0
    http = {labels: value for (metric, labels), value in samples.items()
            if metric == "wfd_http_requests_total"}
    assert http.pop((("code", "200"), ("route", "healthz"))) >= 1  # the fixture's start-up
    assert http == {(("code", "200"), ("route", "catch")): 3.0,
                    (("code", "500"), ("route", "catch")): 2.0,
                    (("code", "404"), ("route", "catch")): 1.0,
                    (("code", "405"), ("route", "catch")): 1.0}
    assert samples[("wfd_queue_depth", ())] == 0
    assert samples[("wfd_running_children", ())] == 0
    assert samples[("wfd_timer_lateness_seconds_count", ())] == 0
    assert ("wfd_timer_lateness_seconds_bucket", (("le", "0.1"),)) in samples

    again = scrape(daemon.base)  # the first scrape is counted too
    assert again[("wfd_http_requests_total", (("code", "200"), ("route", "metrics")))] == 1


def test_running_children_and_queue_depth_are_live(make_daemon, name):
    daemon = make_daemon(config="global_concurrency = 1\n")
    url = daemon.deploy(name, "import time\ndef workflow(_request, settings):\n"
                              "    time.sleep(_request['s'])\n")
    threads = [threading.Thread(target=requests.post, args=(url,), kwargs={"json": {"s": 1}})
               for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_for(lambda: scrape(daemon.base)[("wfd_queue_depth", ())] == 1, what="one queued")
    assert scrape(daemon.base)[("wfd_running_children", ())] == 1
    for thread in threads:
        thread.join(30)
    # Answered before reaped (README "Answered first, cleaned up after"): it counts until then.
    wait_for(lambda: scrape(daemon.base)[("wfd_running_children", ())] == 0,
             what="the last child reaped")


def test_admin_listen_moves_metrics_and_healthz_off_the_catch_listener(make_daemon):
    daemon = make_daemon(admin=True)
    assert requests.get(f"{daemon.base}/metrics").status_code == 404
    assert requests.get(f"{daemon.base}/healthz").status_code == 404
    samples = scrape(daemon.admin_base)
    assert samples[("wfd_http_requests_total", (("code", "404"), ("route", "other")))] == 2


def test_timer_lateness_and_skipped_ticks(make_daemon, name):
    daemon = make_daemon()
    daemon.deploy(name, "import time\ndef workflow(settings):\n    time.sleep(2.2)\n",
                  "--every", "1s", kind="--pull")
    skipped_key = ("wfd_skipped_ticks_total", (("workflow", name),))
    samples = wait_for(lambda: (s := scrape(daemon.base)).get(skipped_key, 0) >= 1 and s,
                       timeout=15, what="a skipped tick in /metrics")
    fired = samples[("wfd_timer_lateness_seconds_count", ())]
    assert fired >= 2  # the run's tick and at least one skipped
    assert samples[("wfd_timer_lateness_seconds_sum", ())] / fired < 0.1  # within 100 ms
    assert daemon.ctl_json("show", name)["skipped"] >= samples[skipped_key]
