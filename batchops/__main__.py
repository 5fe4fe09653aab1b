"""`python -m batchops ...` runs the `batchops` console script."""

import sys

from batchops.cli import main

sys.exit(main())
