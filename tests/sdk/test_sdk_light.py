"""Agents import the SDK: it must stay free of torch, transformers and kernel code."""

import subprocess
import sys


def test_import_sdk_pulls_no_torch_transformers_or_kernel() -> None:
    code = ("import sys, sdk, sdk.runner, sdk.models; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'kernel')]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
