"""``python -m pagoda``: the ``pagoda`` command (how ``pagoda serve`` starts its children)."""

import sys

from pagoda.cli import main

sys.exit(main())
