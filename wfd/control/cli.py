"""`wfd ctl`: the operator's command line, parsed into one control request.

It imports only the standard library, so a round trip costs a Python
start-up and one socket exchange. It sends one JSON request and prints the
result as text (or as JSON with `--json`).

Exit codes: 0 success; 1 the daemon refused the command (the error is one
line on stderr); 2 bad usage; 3 the daemon is not running (no socket, or
nobody listening); 4 `run` executed the workflow but the execution failed.
`logs NAME --follow` runs until Ctrl-C (exit 0) or until the daemon ends the
stream (it stops, or the client fell behind: exit 1 with the reason).
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from wfd.control.client import (
    DEFAULT_SOCKET,
    EXIT_EXECUTION_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CtlError,
    call,
    final,
    replies,
)
from wfd.control.render import escape_controls, render

LIMIT_OPTIONS = (("--timeout", "timeout_s", float), ("--memory", "memory_mb", int),
                 ("--cpu", "cpu_s", int), ("--processes", "processes", int),
                 ("--open-files", "open_files", int), ("--concurrency", "concurrency", int))


class UsageError(CtlError):
    """Arguments that parse but make no sense together."""

    exit_code = EXIT_USAGE


def parse_setting(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` stores the string VALUE; `KEY:=JSON` stores a JSON value (SPEC 10).

    HrFlow's environment properties are strings: an id such as `12345` must
    stay "12345", so nothing is parsed unless the operator asks with `:=`.
    """
    key, sep, text = item.partition("=")
    as_json = key.endswith(":")
    key = key[:-1] if as_json else key
    if not sep or not key:
        raise UsageError(f"expected KEY=VALUE or KEY:=JSON, got {item!r}")
    if not as_json:
        return key, text
    try:
        return key, json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{key}:= needs a JSON value: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="control socket (default $WFD_SOCKET or ./wfd-data/wfd.sock)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print machine-readable JSON")
    parser = argparse.ArgumentParser(prog="wfd ctl", parents=[common],
                                     description="Administer a running wfd daemon.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *names: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=help_text)
        for item in names:
            command.add_argument(item)
        return command

    add("status", "daemon status")
    add("list", "list workflows")
    deploy = add("deploy", "deploy a new version of a workflow", "name", "file")
    kind = deploy.add_mutually_exclusive_group(required=True)
    kind.add_argument("--catch", dest="kind", action="store_const", const="catch")
    kind.add_argument("--pull", dest="kind", action="store_const", const="pull")
    deploy.add_argument("--every", help="pull interval: 30s, 5m, 1h, 1d")
    deploy.add_argument("--cron", help="pull schedule: a 5-field cron expression")
    deploy.add_argument("--tz", help="IANA time zone of --cron (default UTC)")
    deploy.add_argument("--requirements", metavar="FILE",
                        help="packages the workflow needs, one requirement per line")
    for flag, dest, kind_of in LIMIT_OPTIONS:
        deploy.add_argument(flag, dest=dest, type=kind_of)
    deploy.add_argument("--async", dest="async_", action=argparse.BooleanOptionalAction,
                        help="catch: queue every request and answer 202 (--no-async: run "
                             "it and answer with its response)")
    deploy.add_argument("--retries", type=int, help="catch, async: attempts after the first "
                        "(default 3)")
    deploy.add_argument("--retry-backoff-s", type=float, help="catch, async: first retry "
                        "delay, doubling (default 10)")
    deploy.add_argument("--store-requests", action=argparse.BooleanOptionalAction,
                        help="catch: keep requests for replay (default; --no-store-requests "
                             "keeps none)")
    deploy.add_argument("--allow-net", dest="allow_net", action="append", metavar="CIDR[:PORT]",
                        help="also let executions connect there (repeatable; replaces the "
                             "workflow's allowances; 'none' removes them all); "
                             "127.0.0.1/32:PORT opens that one port of the host's loopback")
    for name in ("show", "url", "enable", "disable", "delete", "versions", "rotate-key"):
        add(name, f"{name} a workflow", "name")
    settings = add("settings", "print or change a workflow's settings", "name")
    settings.add_argument("action", nargs="?", choices=("set", "unset"))
    settings.add_argument("items", nargs="*", metavar="KEY[=VALUE|:=JSON]")
    env = add("env", "list (names only) or change a workflow's environment variables", "name")
    env.add_argument("action", nargs="?", choices=("set", "unset"))
    env.add_argument("items", nargs="*", metavar="KEY[=VALUE]")
    envs = add("envs", "workflow environments: packages, size, users, zygote; "
               "`envs prune` removes those no workflow uses")
    envs.add_argument("action", nargs="?", choices=("prune",))
    run = add("run", "execute a workflow now", "name")
    run.add_argument("--data", help="JSON body for a catch workflow")
    executions = add("executions", "recent executions of a workflow", "name")
    executions.add_argument("--limit", type=int, default=20)
    logs = add("logs", "record, output and traceback of an execution; with --follow, "
               "a workflow's executions as they end")
    logs.add_argument("target", metavar="EXECUTION_ID|NAME")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="stream NAME's executions as they end, until Ctrl-C")
    logs.add_argument("--raw", action="store_true",
                      help="print output and errors as stored, control characters included "
                           "(on a terminal they are otherwise shown escaped, as \\x1b)")
    replay = add("replay", "run a past execution's request again (trigger replay)")
    replay.add_argument("execution_id", nargs="?", metavar="EXECUTION_ID")
    replay.add_argument("--dead", metavar="NAME", help="replay every dead delivery of NAME")
    add("dead", "async deliveries of a workflow that ran out of attempts", "name")
    rollback = add("rollback", "make an earlier version current", "name")
    rollback.add_argument("version", type=int)
    export = add("export", "every workflow, version and setting as JSON")
    export.add_argument("file", nargs="?")
    export.add_argument("--with-secrets", action="store_true",
                        help="include signing secrets and the values of environment "
                             "variables (keep the file private)")
    verify = add("verify", "check the signature of a catch workflow's requests", "name")
    verify.add_argument("scheme", choices=("hrflow", "standard", "github", "off"))
    secret = verify.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", metavar="FILE", help="read the secret from FILE")
    secret.add_argument("--secret-env", metavar="VAR",
                        help="read the secret from this command's environment variable VAR")
    add("import", "import an export into this daemon", "file")
    return parser


def request_for(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Translate parsed arguments into a control command and its arguments."""
    command = args.command
    if command == "deploy":
        code = _read(args.file)
        schedule = None
        if args.kind == "pull" or args.every or args.cron:
            schedule = {"every": args.every, "cron": args.cron, "tz": args.tz}
        limits = {dest: getattr(args, dest) for _, dest, _ in LIMIT_OPTIONS}
        delivery = {"async": args.async_, "retries": args.retries,
                    "retry_backoff_s": args.retry_backoff_s,
                    "store_requests": args.store_requests}
        allow_net = args.allow_net
        if allow_net is not None and allow_net == ["none"]:
            allow_net = []
        request = {"name": args.name, "kind": args.kind, "code": code, "limits": limits,
                   "schedule": schedule, "allow_net": allow_net,
                   "delivery": {k: v for k, v in delivery.items() if v is not None}}
        if args.requirements:
            request["requirements"] = _read(args.requirements)
        return "deploy", request
    if command == "settings":
        if args.action is None:
            return "settings", {"name": args.name}
        if not args.items:
            raise UsageError(f"settings {args.action} needs at least one key")
        if args.action == "unset":
            return "settings-unset", {"name": args.name, "keys": args.items}
        values = dict(parse_setting(item) for item in args.items)
        return "settings-set", {"name": args.name, "values": values}
    if command == "env":
        if args.action is None:
            return "env", {"name": args.name}
        if not args.items:
            raise UsageError(f"env {args.action} needs at least one key")
        if args.action == "unset":
            return "env-unset", {"name": args.name, "keys": args.items}
        variables = {}
        for item in args.items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError("expected KEY=VALUE (the value is not shown here)")
            variables[key] = value
        return "env-set", {"name": args.name, "values": variables}
    if command == "export":
        return "export", {"with_secrets": args.with_secrets}
    if command == "envs":
        return ("envs-prune" if args.action else "envs"), {}
    if command == "run":
        data = None
        if args.data is not None:
            try:
                data = json.loads(args.data)
            except ValueError as exc:
                raise UsageError(f"--data is not valid JSON: {exc}") from None
        return "run", {"name": args.name, "data": data}
    if command == "executions":
        return "executions", {"name": args.name, "limit": args.limit}
    if command == "logs":
        if args.follow:
            return "follow", {"name": args.target}
        return "logs", {"execution_id": args.target}
    if command == "rollback":
        return "rollback", {"name": args.name, "version": args.version}
    if command == "replay":
        if (args.execution_id is None) == (args.dead is None):
            raise UsageError("replay takes an EXECUTION_ID or --dead NAME")
        if args.dead:
            return "replay-dead", {"name": args.dead}
        return "replay", {"execution_id": args.execution_id}
    if command == "import":
        try:
            return "import", {"data": json.loads(_read(args.file))}
        except ValueError as exc:
            raise UsageError(f"{args.file} is not JSON: {exc}") from None
    if command == "verify":
        return "verify", {"name": args.name, "scheme": args.scheme, "secret": _secret(args)}
    if command in ("status", "list"):
        return command, {}
    return command, {"name": args.name}


def _secret(args: argparse.Namespace) -> str | None:
    """The signing secret from a file or an environment variable, never from argv."""
    if args.scheme == "off":
        if args.secret_file or args.secret_env:
            raise UsageError("verify off takes no secret")
        return None
    if args.secret_file:
        secret = _read(args.secret_file).strip()
    elif args.secret_env:
        secret = os.environ.get(args.secret_env, "").strip()
        if not secret:
            raise UsageError(f"the environment variable {args.secret_env} is empty or unset")
    else:
        raise UsageError(f"verify {args.scheme} needs --secret-file FILE or --secret-env VAR")
    if not secret:
        raise UsageError(f"{args.secret_file} is empty")
    return secret


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def for_terminal(text: str, raw: bool) -> str:
    """Text as printed: a workflow's control characters escaped on a terminal (SPEC 8).

    Output and errors come from workflows; written raw to a terminal they
    could move the cursor, fake lines or set the clipboard. Piped output is
    left as stored, like journalctl does, and `--raw` forces it.
    """
    return text if raw or not sys.stdout.isatty() else escape_controls(text)


def follow(socket_path: str, name: str, as_json: bool, raw: bool = False) -> None:
    """Print each execution of `name` as it ends, until the daemon ends the stream."""
    for reply in replies(socket_path, "follow", name=name):
        if "item" not in reply:
            final(reply)
            return
        item = reply["item"]
        if "following" in item:
            print(f"following {item['following']}; Ctrl-C to stop", file=sys.stderr, flush=True)
        elif as_json:
            print(json.dumps(item), flush=True)
        else:
            print(for_terminal(render("logs", item), raw) + "\n", flush=True)


def deploy(socket_path: str, request: dict[str, Any]) -> Any:
    """Deploy, printing each step of an environment build on stderr as it happens."""
    result = None
    for reply in replies(socket_path, "deploy", **request):
        if "item" not in reply:
            answer = final(reply)
            return answer if answer is not None else result
        item = reply["item"]
        if "step" in item:
            print(item["step"], file=sys.stderr, flush=True)
        elif "deployed" in item:
            result = item["deployed"]
    return result


def main(argv: list[str] | None = None) -> int:
    """Run one `wfd ctl` command; returns the process exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    socket_path = getattr(args, "socket", None) or os.environ.get("WFD_SOCKET") or DEFAULT_SOCKET
    as_json = getattr(args, "json", False)
    try:
        command, request = request_for(args)
        if command == "follow":
            follow(socket_path, request["name"], as_json, getattr(args, "raw", False))
            return EXIT_OK
        if command == "deploy":
            result = deploy(socket_path, request)
        else:
            result = call(socket_path, command, **request)
    except CtlError as exc:
        print(f"wfd ctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # e.g. no permission on the socket
        print(f"wfd ctl: {socket_path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_OK  # how `logs --follow` is meant to end
    if command == "export" and args.file:
        Path(args.file).write_text(json.dumps(result, indent=2) + "\n")
        print(f"exported {len(result['workflows'])} workflow(s) to {args.file}")
    elif as_json or command == "export":
        print(json.dumps(result, indent=2))
    else:
        print(for_terminal(render(command, result), getattr(args, "raw", False)))
    if command in ("run", "replay") and result["status"] != "success":
        return EXIT_EXECUTION_FAILED
    if command == "replay-dead" and any(r["status"] != "success" for r in result):
        return EXIT_EXECUTION_FAILED
    return EXIT_OK
