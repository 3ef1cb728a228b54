"""The stage trace (wfd/stages.py): off costs nothing visible, the child's word is filtered."""

import time

from wfd import stages


def test_stamps_go_nowhere_when_not_traced():
    stages.stamp("parsed")
    stages.child({"compiled": 1.0})
    assert not stages.active()


def test_only_known_child_stages_with_float_values_are_kept():
    with stages.traced("exec-1", enabled=True) as trace:
        assert stages.active()
        now = time.monotonic()
        stages.child({"compiled": now, "received": 0.0, "returned": "soon",
                      "isolated": True, "bogus": now})
        stages.child(["not", "a", "dict"])
    assert trace is not None
    assert set(trace.stamps) == {"received", "compiled"}
    assert not stages.active()  # reset when the request is done


def test_offsets_are_milliseconds_since_received_in_path_order():
    trace = stages.Trace("exec-2")
    start = trace.stamps["received"]
    trace.stamps.update(committed=start + 0.004, parsed=start + 0.001)
    assert list(trace.offsets_ms().items()) == [("received", 0.0), ("parsed", 1.0),
                                                ("committed", 4.0)]
