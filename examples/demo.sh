#!/usr/bin/env bash
# Start a local wfd daemon in the background and deploy the example workflow.
# Used by `make run`; `make stop` stops the daemon again.
set -euo pipefail
cd "$(dirname "$0")/.."
WFD=.venv/bin/wfd
DATA=wfd-data
LISTEN=${WFD_LISTEN:-127.0.0.1:8080}
mkdir -p "$DATA"
if [ -f "$DATA/wfd.pid" ] && kill -0 "$(cat "$DATA/wfd.pid")" 2>/dev/null; then
    echo "wfd is already running (pid $(cat "$DATA/wfd.pid"))"
else
    touch "$DATA/wfd.log"
    logged=$(wc -l <"$DATA/wfd.log")
    # A development daemon should start on any laptop: without a writable cgroup
    # tree, strict would refuse, so the demo opts out and says what that costs.
    nohup "$WFD" serve --data-dir "$DATA" --listen "$LISTEN" --no-require-cgroups \
        >>"$DATA/wfd.log" 2>&1 &
    echo $! >"$DATA/wfd.pid"
    # Serving means *our* daemon answers on $LISTEN: another process already
    # on that port would answer /healthz too. Each start of a daemon has its
    # own `instance`; ours is the one its control socket reports.
    instance() { .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["instance"])'; }
    serving=""
    for _ in $(seq 300); do
        kill -0 "$(cat "$DATA/wfd.pid")" 2>/dev/null || { tail -n 20 "$DATA/wfd.log"; exit 1; }
        ours=$("$WFD" ctl --socket "$DATA/wfd.sock" status --json 2>/dev/null | instance) || ours=""
        answering=$(curl -fsS "http://$LISTEN/healthz" 2>/dev/null | instance) || answering=""
        if [ -n "$ours" ] && [ "$ours" = "$answering" ]; then serving=1; break; fi
        sleep 0.1
    done
    if [ -z "$serving" ]; then
        echo "wfd did not come up on http://$LISTEN (is another process using it?);" \
             "log: $DATA/wfd.log" >&2
        kill "$(cat "$DATA/wfd.pid")" 2>/dev/null || true
        exit 1
    fi
    echo "wfd is serving on http://$LISTEN (log: $DATA/wfd.log, pid $(cat "$DATA/wfd.pid"))"
    missing=$(tail -n +"$((logged + 1))" "$DATA/wfd.log" | grep 'isolation-layer-missing' || true)
    if [ -n "$missing" ]; then
        echo "Note: an isolation layer is missing on this machine (fine for trying wfd out):"
        echo "  ${missing#* WARNING }"
        echo "  A service must have it: systemd/README.md, \"cgroup versions\"."
    fi
fi
"$WFD" ctl deploy hello examples/hello.py --catch
URL=$("$WFD" ctl url hello)
echo
echo "Try it:"
echo "  curl -X POST '$URL' -H 'Content-Type: application/json' -d '{\"name\": \"Ada\"}'"
echo "  $WFD ctl executions hello"
