"""``python -m vchitect.demo --sample-export …``: the demo's fresh-process export check (internal)."""

import sys

from .run import main

sys.exit(main())
