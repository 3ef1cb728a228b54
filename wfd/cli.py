"""The `wfd` command: `wfd serve` runs the daemon, `wfd ctl` administers it.

`wfd ctl` must start fast, so this module imports the daemon's modules
(aiohttp, the store, ...) only when `serve` is chosen.
"""

import argparse
import sys


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wfd serve", description="Run the wfd daemon.")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--data-dir", help="state directory (default ./wfd-data)")
    parser.add_argument("--listen", help="HOST:PORT for catch routes (default 127.0.0.1:8080)")
    parser.add_argument("--admin-listen", help="HOST:PORT for /healthz and /metrics")
    parser.add_argument("--public-url", help="scheme and host callers use, for `wfd ctl url`")
    parser.add_argument("--team", help="the {team} part of catch URLs (default 'default')")
    parser.add_argument("--socket", help="control socket path (default DATA_DIR/wfd.sock)")
    parser.add_argument("--log-format", choices=("text", "json"))
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--isolation", choices=("strict", "best-effort", "none"),
                        help="sandbox executions (default strict; docs/isolation.md)")
    parser.add_argument("--no-require-cgroups", dest="require_cgroups", action="store_const",
                        const=False, help="let strict start without a cgroup per execution "
                        "(rlimits only for memory and processes)")
    args = parser.parse_args(argv)

    import functools

    from wfd import config as config_module
    from wfd.server import serve

    # The same file and flags again on SIGHUP: flags keep overriding the file.
    loader = functools.partial(
        config_module.load, args.config, data_dir=args.data_dir, listen=args.listen,
        admin_listen=args.admin_listen, public_url=args.public_url, team=args.team,
        socket=args.socket, log_format=args.log_format, log_level=args.log_level,
        isolation=args.isolation, require_cgroups=args.require_cgroups)
    try:
        config = loader()
    except config_module.ConfigError as exc:
        print(f"wfd serve: {exc}", file=sys.stderr)
        return 2
    return serve(config, loader)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `wfd` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ctl":
        from wfd.control.cli import main as ctl_main

        return ctl_main(argv[1:])
    if argv and argv[0] == "serve":
        return serve_main(argv[1:])
    print("usage: wfd serve [options] | wfd ctl COMMAND [options]\n"
          "  wfd serve --help, wfd ctl --help for details", file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
