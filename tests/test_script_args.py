"""The scripts' arguments: a bad value is a one-line usage error naming the option
(exit 2), before any work starts; never a hang, a traceback, or a run reported as a
failure of the server (scripts/argtypes.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CASES = [
    ("crash-test", ["--campaign-iterations", "0"], "--campaign-iterations: must be at least 1"),
    ("crash-test", ["--volume-size", "0"], "--volume-size: must be at least 1"),
    ("crash-test", ["--pool-size", "16"], "--pool-size: must be at least 32 times --volume-size"),
    ("crash-test", ["--max-seconds", "inf"], "--max-seconds: must be a finite number"),
    ("fuzz.py", ["--concurrency", "0"], "--concurrency: must be at least 1"),
    ("fuzz.py", ["--cases", "-3"], "--cases: must be at least 1"),
    ("soak-model.py", ["--examples", "0"], "--examples: must be at least 1"),
    ("soak-model.py", ["--dir", "README.md"], "--dir: README.md exists and is not a directory"),
    ("bench.py", ["--size", "inf"], "argument --size:"),
    ("bench.py", ["--markdown", "/nonexistent/x.md"], "--markdown: no directory /nonexistent"),
    ("instructions.py", ["--size", "foo"], "argument --size:"),
    ("memory.py", ["--cache-size", "0"], "argument --cache-size:"),
    ("study.py", ["--vm-rounds", "0"], "--vm-rounds: must be at least 1"),
    ("study.py", ["--render", "README.md"], "argument --render: README.md is not JSON"),
]


@pytest.mark.parametrize("script,args,message", CASES,
                         ids=[f"{c[0]}{c[1][0]}" for c in CASES])
def test_a_bad_argument_is_a_one_line_usage_error(script: str, args: list[str],
                                                  message: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stdout
