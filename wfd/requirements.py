"""What packages a workflow declares (SPEC 10): a PEP 723 block, or `--requirements`.

    # /// script
    # requires-python = ">=3.11"
    # dependencies = ["hrflow-connectors==4.28.0"]
    # [tool.wfd]
    # preload = ["hrflow_connectors"]
    # ///

Parsing only: resolving and building are wfd/environments.py's.
"""

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from typing import Any

# The reference regular expression of PEP 723.
BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")
MAX_REQUIREMENTS = 200


class RequirementsError(ValueError):
    """The declaration cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Requirements:
    """The packages a version declared, as stored with it."""

    dependencies: tuple[str, ...]
    requires_python: str | None = None
    preload: tuple[str, ...] | None = None  # None: found from the code's imports

    def to_json(self) -> dict[str, Any]:
        return {"dependencies": list(self.dependencies), "requires_python": self.requires_python,
                "preload": None if self.preload is None else list(self.preload)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Requirements":
        preload = data.get("preload")
        return cls(tuple(data["dependencies"]), data.get("requires_python"),
                   None if preload is None else tuple(preload))


def declared(code: str, requirements_file: str | None = None) -> Requirements | None:
    """The code's PEP 723 block merged with a requirements file; None if neither."""
    script = _script_block(code)
    lines = _requirement_lines(requirements_file) if requirements_file is not None else []
    if script is None and requirements_file is None:
        return None
    script = script or {}
    dependencies = script.get("dependencies", [])
    if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
        raise RequirementsError("`dependencies` in the script block must be a list of strings")
    requires = script.get("requires-python")
    if requires is not None and not isinstance(requires, str):
        raise RequirementsError("`requires-python` must be a string such as \">=3.11\"")
    wfd = script.get("tool", {}).get("wfd", {})
    preload = wfd.get("preload") if isinstance(wfd, dict) else None
    if preload is not None and not (isinstance(preload, list)
                                    and all(isinstance(p, str) and _MODULE.fullmatch(p)
                                            for p in preload)):
        raise RequirementsError("`[tool.wfd] preload` must be a list of module names")
    everything = tuple(dict.fromkeys([*map(str.strip, dependencies), *lines]))
    if len(everything) > MAX_REQUIREMENTS:
        raise RequirementsError(f"at most {MAX_REQUIREMENTS} requirements")
    if not everything:
        raise RequirementsError("the declaration names no package")
    return Requirements(everything, requires, None if preload is None else tuple(preload))


_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _script_block(code: str) -> dict[str, Any] | None:
    blocks = [m for m in BLOCK.finditer(code) if m.group("type") == "script"]
    if not blocks:
        return None
    if len(blocks) > 1:
        raise RequirementsError("the file has more than one `# /// script` block (PEP 723)")
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in blocks[0].group("content").splitlines(keepends=True))
    try:
        return tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise RequirementsError(f"the `# /// script` block is not valid TOML: {exc}") from None


def _requirement_lines(text: str) -> list[str]:
    """Lines of a requirements file: names and specifiers only, no pip options."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise RequirementsError(f"requirements line {number}: options such as {line.split()[0]}"
                                    " are not supported; name packages only")
        lines.append(line)
    return lines


def top_level_imports(code: str) -> list[str]:
    """The modules the file imports at its top level, for the zygote to preload.

    Only absolute imports at module level (not inside functions or
    try/except fallbacks), and not the standard library's.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    found: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    roots = [name for name in found if name.split(".")[0] not in sys.stdlib_module_names]
    return list(dict.fromkeys(roots))
