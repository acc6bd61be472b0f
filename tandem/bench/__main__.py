"""`python -m tandem.bench ...`, the same as `tandem bench ...`."""

import sys

from tandem.bench.cli import main

sys.exit(main())
