"""The package boundary of the child protocol, read from the source itself."""

import ast
import subprocess
import sys
import textwrap
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
    assert found - {"orjson"} <= sys.stdlib_module_names


def test_the_codec_keeps_its_rules_where_orjson_is_not_installed() -> None:
    """A workflow environment may lack orjson; the child's JSON must not change with it."""
    check = textwrap.dedent("""
        import sys
        sys.modules["orjson"] = None  # import orjson now fails, as in a bare environment
        from sandbox import protocol
        assert protocol.orjson is None
        big = {"n": 2**64 + 1, "s": "é", "l": [1.5, None, True]}
        assert protocol.loads(protocol.dumps(big)) == big
        text = '{"n":18446744073709551617,"s":"é","l":[1.5,null,true]}'
        assert protocol.dumps(big) == text.encode()
        for bad in (b"NaN", b"[1,", b"\\xff"):
            try:
                protocol.loads(bad)
            except protocol.CodecError:
                pass
            else:
                raise AssertionError(bad)
        try:
            protocol.loads(b"[" * 10 + b"]" * 10, max_depth=5)
        except protocol.CodecError as exc:
            assert "deeper than 5" in str(exc)
        else:
            raise AssertionError("depth")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-I", "-c", check], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == "ok\n", result.stderr
