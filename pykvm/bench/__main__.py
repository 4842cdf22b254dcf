"""``python -m pykvm.bench [--quick]``: the same as ``pykvm bench``."""

import sys

from pykvm.bench import main

sys.exit(main())
