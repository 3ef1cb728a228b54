"""An example catch workflow: greets the caller and counts its calls in settings."""

import json


def workflow(_request, settings):
    settings["calls"] = settings.get("calls", 0) + 1
    who = _request.get("name", "world")
    return {
        "status_code": 200,
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps({"hello": who, "calls": settings["calls"]}),
    }
