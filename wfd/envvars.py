"""Which environment variables a workflow may set (SPEC 10), in one place.

The names refused are those that would change how the interpreter or the
sandbox behave for the execution: `PYTHON*` (PYTHONPATH, PYTHONSTARTUP...),
the dynamic loader's `LD_*`, `PATH`, `HOME` and `TMPDIR` (the sandbox sets
them to its own directories), and `WFD_*` (the daemon's own, such as
`WFD_WORKFLOW_DIR`).
"""

import re

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
RESERVED_PREFIXES = ("PYTHON", "LD_", "WFD_")
RESERVED_NAMES = ("PATH", "HOME", "TMPDIR")
MAX_VALUE_BYTES = 32 * 1024


class EnvError(ValueError):
    """A variable that cannot be set; the message says which rule it breaks."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise EnvError(f"invalid variable name {name!r}: letters, digits and _, "
                       "not starting with a digit")
    upper = name.upper()
    if upper in RESERVED_NAMES or upper.startswith(RESERVED_PREFIXES):
        raise EnvError(f"{name} is reserved: names starting with "
                       f"{', '.join(p + '*' for p in RESERVED_PREFIXES)} and "
                       f"{', '.join(RESERVED_NAMES)} would change how Python or the "
                       "sandbox behave")
    return name


def check_value(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise EnvError(f"the value of {name} must be a string")
    if "\0" in value or len(value.encode()) > MAX_VALUE_BYTES:
        raise EnvError(f"the value of {name} must have no NUL byte and at most "
                       f"{MAX_VALUE_BYTES} bytes")
    return value
