"""`python -m lgframe`: the command line (lgframe/cli.py)."""

import sys

from lgframe.cli import main

sys.exit(main())
