"""``python -m callbackworker``: the same as the ``callbackworker`` command."""

import sys

from .cli import main

sys.exit(main())
