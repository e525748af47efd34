"""``python -m estimax``: the ``estimax`` command (see :mod:`estimax.cli`)."""

import sys

from .cli import main

sys.exit(main())
