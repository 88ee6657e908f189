"""``python -m driffusion.cli``: the ``driffusion`` command."""

import sys

from .main import main

sys.exit(main())
