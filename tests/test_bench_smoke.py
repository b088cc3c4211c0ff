"""The benchmarks still run: each model benchmark's small form, which prints its table and writes
nothing (figures come from full runs on a named machine, bench/RESULTS.md)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"


@pytest.mark.parametrize(("name", "flags", "expect"), [
    ("training", ["--small"], "this trainer (`fit`, product defaults)"),
    ("scoring", ["--small"], "I/O floor s (best of 3)"),
    ("gpu", ["--cpu"], "max |score difference|"),
])
def test_a_small_benchmark_prints_its_table_and_writes_nothing(name, flags, expect):
    before = hashlib.sha256(RESULTS.read_bytes()).hexdigest()
    out = subprocess.run([sys.executable, "-m", "bench", name, *flags], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout
    assert "|---|" in out.stdout
    assert hashlib.sha256(RESULTS.read_bytes()).hexdigest() == before
