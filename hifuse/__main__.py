"""``python -m hifuse ...``: the command line (``hifuse.cli``)."""

import sys

from .cli import main

sys.exit(main())
