"""``python -m moerail``: the ``moerail`` command."""

import sys

from .cli import main

sys.exit(main())
