"""`python -m tilert`."""

import sys

from tilert.cli import main

sys.exit(main())
