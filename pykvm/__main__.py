"""``python -m pykvm``: the same as the ``pykvm`` command."""

import sys

from pykvm.cli import main

sys.exit(main())
