"""`python -m tierkv` runs the `tierkv` command."""

import sys

from .cli import main

sys.exit(main())
