"""``python -m chresilient``: the same as the ``chresilient`` command."""

import sys

from .cli import main

sys.exit(main())
