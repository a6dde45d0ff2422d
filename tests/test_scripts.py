"""Short runs of the long campaigns in ``scripts/``: the benchmarks and the study.

``make bench`` and ``make study`` take many minutes; here each runs for a few
seconds on tiny sizes, so a change that breaks them fails the suite. The
figures are not judged (a timed assertion on a shared machine would be noise);
what is checked is that every target and design produced a measurement, the
study's report and plots were written, and no target reported an error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

def test_bench_short_run_measures_every_target(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--size", "32M", "--seconds", "1",
         "--rounds", "1", "--only", "nbdserver,raw", "--volumes", "radix,extent",
         "--workloads", "randread-4k,seqwrite-1m", "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    for workload in ("randread-4k", "seqwrite-1m"):
        for target in ("nbdserver", "vol-radix", "vol-extent", "raw"):
            assert doc["median"][workload][target]["iops"] > 0, (workload, target)
    assert "vol-radix/nbdserver" in proc.stdout
    assert not list(tmp_path.glob("*.pool")), "the volume pools were not removed"


def test_study_quick_run_writes_report_and_plots(tmp_path: Path) -> None:
    report = tmp_path / "study.md"
    data = tmp_path / "study.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "study.py"), "--quick", "--designs",
         "radix,extent,linear", "--experiments", "1,4", "--no-qcow2", "--snapshot-counts",
         "0,1", "--seconds", "1", "--region", "16M", "--dir", str(tmp_path / "work"),
         "--pools", "falloc", "--out", str(report), "--json", str(data)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(data.read_text())
    # the command shown leaves out the work directory (a path of the machine it ran on)
    assert "--dir" not in doc["machine"]["command"], doc["machine"]["command"]
    assert str(tmp_path / "work") not in report.read_text()
    for design in ("radix", "extent", "linear"):
        points = doc["results"]["snapshots"][design]
        assert set(points) == {"0", "1"}, (design, points)
        assert all(p["iops"] > 0 for p in points.values()), design
        assert design in doc["results"]["creation"]
    text = report.read_text()
    assert "radix" in text and "extent" in text and "linear" in text
    # the pools of experiments 1-3 are as --pools says (zero-filled by default)
    assert doc["machine"]["pools"] == "preallocated"
    assert "Each pool is a preallocated file" in text
    plots = list((tmp_path / "study").glob("*.png"))
    assert {p.name for p in plots} >= {"snapshots.png", "creation.png"}, plots


def test_instructions_short_run_counts_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "instr.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "instructions.py"), "--ios", "100", "--size",
         "16M", "--designs", "radix", "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(out.read_text())["instructions_per_io"]["nbdserver"]
    assert set(counts) == {"file read", "file write", "radix read", "radix write in place",
                           "radix read after a snapshot", "radix first write"}
    # Each count is a real measurement (a 4 KiB request costs the server tens of
    # thousands of instructions), not a zero or an empty dump.
    assert all(5_000 < n < 5_000_000 for n in counts.values()), counts
    assert "file read / radix read" in proc.stdout
    assert "radix read / read after a snapshot" in proc.stdout
    assert not list(tmp_path.glob("nbd-instr-*")), "the work directory was not removed"


def test_memory_short_run_reports_each_scenario(tmp_path: Path) -> None:
    """`make memory`'s two quick scenarios on radix: a row each, within the budget (the
    cache plus 32 MiB; hole READs left unread grew the server by 170 MiB before replies
    that complete at once were put under flow control)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "memory.py"), "--blockmap", "radix",
         "--scenario", "hole-reads", "--scenario", "catalog", "--cache-size", "4M",
         "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["scenario"] for r in rows] == ["hole-reads", "catalog"], proc.stderr[-2000:]
    for row in rows:
        assert row["within_budget"], row
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir()), "the pools were not removed"


def test_trim_cost_short_run_reports_each_design(tmp_path: Path) -> None:
    """`scripts/trim-cost.py` on a tiny volume: a row per design, the pool clean after."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "trim-cost.py"), "--chunks", "256",
         "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["design"] for r in rows] == ["extent", "radix", "linear"], proc.stderr[-2000:]
    for row in rows:
        assert row["check_ok"] and row["trims"] == 230, row
        assert row["user_us_per_trim"] > 0 and row["meta_pages_before"] > 0, row
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir()), "the pools were not removed"
