"""``python -m estimax.cli``: the ``estimax`` command, as ``python -m estimax``."""

import sys

from . import main

sys.exit(main())
