"""`python -m wfd` is the `wfd` command."""

import sys

from wfd.cli import main

sys.exit(main())
