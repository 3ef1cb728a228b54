"""The benchmark's baseline: the workflow called inside an aiohttp handler, no isolation.

    python bench/plain_server.py PORT WORKFLOW_FILE

Same event loop (uvloop), same JSON parsing, same function; no child
process, no store. What wfd adds on top of this is the cost of isolation
and of recording each execution.
"""

import sys
import types
from pathlib import Path

import uvloop
from aiohttp import web


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    module = types.ModuleType("workflow")
    exec(compile(Path(path).read_text(), path, "exec"), module.__dict__)
    settings: dict = {}

    async def handle(request: web.Request) -> web.Response:
        fields = {**request.headers, **await request.json()}
        result = module.workflow(fields, settings)
        return web.Response(status=result["status_code"], text=result["body"])

    app = web.Application()
    app.router.add_post("/", handle)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
