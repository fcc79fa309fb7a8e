"""``python -m metagrad ...``: the ``metagrad`` command."""

import sys

from metagrad._src.cli import main

sys.exit(main())
