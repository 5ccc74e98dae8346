"""``python -m saerecover.cli``: the same as the ``saerecover`` command."""

import sys

from saerecover.cli.app import main

sys.exit(main())
