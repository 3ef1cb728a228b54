"""The package boundary of the child protocol, read from the source itself."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported(path: Path) -> set[str]:
    """Every module `path` imports, by its full dotted name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_sandbox_never_imports_wfd() -> None:
    for path in (ROOT / "sandbox").glob("*.py"):
        assert not {n for n in imported(path) if n.split(".")[0] == "wfd"}, path


def test_wfd_imports_only_the_protocol_module_of_sandbox() -> None:
    for path in (ROOT / "wfd").rglob("*.py"):
        others = {n for n in imported(path) if n.split(".")[0] == "sandbox"
                  and n not in ("sandbox", "sandbox.protocol")
                  and not n.startswith("sandbox.protocol.")}
        assert not others, path


def test_the_protocol_module_needs_only_the_standard_library() -> None:
    found = {n.split(".")[0] for n in imported(ROOT / "sandbox" / "protocol.py")}
    assert found <= sys.stdlib_module_names
