"""``python -m saerecover.cli``: the same as the ``saerecover`` command."""

import sys

from saerecover.cli import main

sys.exit(main())
