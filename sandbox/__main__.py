"""Entry point of an execution process: `python -I -m sandbox`."""

import sys

from sandbox.runner import main

sys.exit(main())
