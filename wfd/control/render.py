"""How `wfd ctl` shows a command's result as text (`--json` bypasses it).
"""

import json
import re
from typing import Any

# C0 controls but newline and tab, DEL and C1 controls: what a terminal acts
# on (cursor moves, colours, OSC 52 clipboard writes, a carriage return
# overwriting a line) rather than prints.
TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """`text` with each terminal control character shown as `\\xNN`, as journalctl does."""
    return TERMINAL_CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as aligned text columns, headed by the column names in capitals."""
    cells = [[c.upper() for c in columns]]
    cells += [["-" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                     for line in cells)


def _fields(data: dict[str, Any]) -> str:
    return "\n".join(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}"
                     for key, value in data.items())


def _isolation(isolation: dict[str, Any]) -> str:
    """The sandbox layers one per line, then what the start-up self-test tried."""
    lines = [f"isolation: {isolation['mode']} (executor {isolation['executor']})"]
    for name, layer in isolation["layers"].items():
        lines.append(f"  {name:<13} {'on ' if layer['active'] else 'OFF'}  {layer['detail']}")
    for name, check in isolation["self_test"].items():
        verdict = "held" if check["held"] else ("FAILED" if check["expected"] else "open")
        lines.append(f"  self-test {name:<22} {verdict}")
    return "\n".join(lines)


def render(command: str, result: Any) -> str:
    """The human-readable text for a command's result."""
    if command == "list":
        return table(result, ["name", "kind", "enabled", "version", "schedule", "next_due"])
    if command in ("executions", "replay-dead"):
        return table(result, ["id", "started_at", "trigger", "attempt", "status", "delivery",
                              "http_status", "duration_ms", "version"])
    if command == "dead":
        return table(result, ["id", "accepted_at", "attempts", "last_status",
                              "last_attempt_id"])
    if command == "versions":
        return table([{**r, "current": "*" if r["current"] else ""} for r in result],
                     ["version", "created_at", "size", "current"])
    if command in ("url", "rotate-key"):
        return result if isinstance(result, str) else result["url"]
    if command == "deploy":
        text = f"deployed {result['name']} version {result['version']}"
        return text + (f"\n{result['url']}" if "url" in result else "")
    if command in ("settings", "settings-set", "settings-unset"):
        return json.dumps(result, indent=2, sort_keys=True)
    if command == "envs":
        return table([{**e, "packages": len(e["packages"]),
                       "workflows": ", ".join(e["workflows"]) or "-",
                       "zygote": e["zygote"]["state"]} for e in result],
                     ["hash", "python", "packages", "size_mb", "workflows", "zygote"])
    if command == "envs-prune":
        return f"removed {len(result['removed'])} environment(s)" + "".join(
            f"\n{digest}" for digest in result["removed"])
    if command == "deploy" and "environment" in result:
        text = f"deployed {result['name']} version {result['version']}"
        text += f" in environment {result['environment']}"
        return text + (f"\n{result['url']}" if "url" in result else "")
    if command in ("env", "env-set", "env-unset"):
        return "\n".join(f"{key}=********" for key in result) or "(no variables)"
    if command in ("enable", "disable"):
        return f"{result['name']} {command}d"
    if command == "verify":
        if result["verify"] == "off":
            return f"{result['name']}: signatures are no longer checked"
        return f"{result['name']}: every request must be signed ({result['verify']})"
    if command == "delete":
        return f"deleted {result['deleted']}"
    if command == "rollback":
        return f"{result['name']} now runs version {result['version']}"
    if command == "import":
        return f"imported {len(result['imported'])} workflow(s): {', '.join(result['imported'])}"
    if command in ("run", "replay"):
        text = (f"execution {result['id']}: {result['status']} "
                f"({result['duration_ms']:.0f} ms)")
        if result.get("error"):
            text += f"\nerror: {result['error']}"
        if "response" in result:
            text += f"\nresponse: {result['response']['status_code']}\n{result['response']['body']}"
        return text
    if command == "status" and "isolation" in result:
        return (_fields({k: v for k, v in result.items() if k != "isolation"}) + "\n"
                + _isolation(result["isolation"]))
    if command == "logs":
        text = _fields({k: v for k, v in result.items() if k not in ("output", "traceback")})
        text += "\n--- output ---\n" + (result["output"] or "")
        if result.get("traceback"):
            text += "\n--- traceback ---\n" + result["traceback"]
        return text.rstrip("\n")
    return _fields(result) if isinstance(result, dict) else str(result)
