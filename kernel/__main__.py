"""`python -m kernel`: boot the agentos kernel in the foreground."""

from kernel.boot import exit_now, main

exit_now(main())
