"""A plain script (no Agent class) that exits with the status given as its argument."""

import sys

print("plain script running", flush=True)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
