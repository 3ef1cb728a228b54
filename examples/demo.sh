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
    nohup "$WFD" serve --data-dir "$DATA" --listen "$LISTEN" >>"$DATA/wfd.log" 2>&1 &
    echo $! >"$DATA/wfd.pid"
    for _ in $(seq 100); do
        curl -fsS "http://$LISTEN/healthz" >/dev/null 2>&1 && break
        kill -0 "$(cat "$DATA/wfd.pid")" 2>/dev/null || { cat "$DATA/wfd.log"; exit 1; }
        sleep 0.1
    done
    echo "wfd is serving on http://$LISTEN (log: $DATA/wfd.log, pid $(cat "$DATA/wfd.pid"))"
fi
"$WFD" ctl deploy hello examples/hello.py --catch
URL=$("$WFD" ctl url hello)
echo
echo "Try it:"
echo "  curl -X POST '$URL' -H 'Content-Type: application/json' -d '{\"name\": \"Ada\"}'"
echo "  $WFD ctl executions hello"
