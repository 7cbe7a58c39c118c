"""``python -m pagoda``: the ``pagoda`` command (how ``pagoda serve`` starts its children)."""

import sys

from pagoda.entrypoints.cli import main

sys.exit(main())
