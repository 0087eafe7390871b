"""agentos's kernel: the privileged process (`python -m kernel`)."""

VERSION = "0.1.0"
