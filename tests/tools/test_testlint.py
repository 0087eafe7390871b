"""tools/testlint.py: a test that cannot fail is reported; one that checks, or says why, is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SAMPLE = '''
import pytest

def expect_even(n):
    assert n % 2 == 0

def via_helper(n):
    expect_even(n)

def test_asserts():
    assert 1

def test_raises():
    with pytest.raises(ValueError):
        int("x")

def test_through_two_helpers():
    via_helper(2)

def test_silent():
    int("1")

# no-assert: the fixture checks the log
def test_excused():
    pass

def test_empty_excuse():  # no-assert:
    pass

class TestGroup:
    def test_method_silent(self):
        pass
'''


def test_reports_exactly_the_tests_that_check_nothing(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "testlint.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    named = sorted(line.split(": ")[1].split()[0] for line in out.stdout.splitlines())
    assert named == ["test_empty_excuse", "test_method_silent", "test_silent"]


def test_the_suite_passes_its_own_check() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "testlint.py")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
