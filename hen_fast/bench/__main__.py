"""``python -m hen_fast.bench``: the same as ``hen-fast bench``."""

import sys

from . import main

sys.exit(main())
