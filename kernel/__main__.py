"""`python -m kernel`: boot the agentos kernel in the foreground."""

import sys

from kernel.boot import main

sys.exit(main())
