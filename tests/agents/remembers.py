"""Fails its first run after leaving a mark in its home; a later run that finds the mark
succeeds: whether its home survived the restart."""

import json
import os
import sys

mark = os.path.join(os.environ["HOME"], "mark")
if not os.path.exists(mark):
    with open(mark, "w") as f:
        f.write("first run")
    sys.exit(1)
with open(mark) as f:
    print(json.dumps({"found": f.read()}), flush=True)
