"""``python -m adakd``: the same as the ``adakd`` command."""

import sys

from .cli import main

sys.exit(main())
