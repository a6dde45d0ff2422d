#!/usr/bin/env python3
"""Instructions per I/O of the whole server, counted by callgrind: a benchmark free of noise.

IOPS on a shared machine swing from run to run (neighbours, the disk, the CPU
clock), so a change worth 5% of CPU per request can hide in them. valgrind's
callgrind counts the instructions the server process executes, which do not
depend on what else the machine is doing: the same code, inputs and batching
give the same count, to about half a percent here.

What it does (``make instructions``, or ``.venv/bin/python scripts/instructions.py --help``):

1. For nbdserver (this checkout) and each ``--candidate NAME=DIR`` (a copy of
   the package with a change to try), starts ``nbdserver serve`` under
   ``valgrind --tool=callgrind``, with a raw file export (random data) and one
   pool volume per ``--designs`` entry, each volume filled from the file.
2. For each workload, runs fio's nbd engine once to warm up, zeroes the
   counters (``callgrind_control -z``), runs ``--ios`` requests, and dumps the
   counters (``callgrind_control -d``): instructions / requests. Workloads:
   4 KiB random reads and writes at queue depth 16 on every export; then each
   volume is snapshotted through the running server's control socket, read
   again (*reads after a snapshot*: its whole tree is now shared, as a fork's
   is with its parent) and written again (*first writes*: fio's random map
   sends each write to a chunk not written since the snapshot, so each is a
   copy-on-write into a new chunk).
3. Prints a table: instructions per I/O for each server, and the ratios the
   project's speed targets are about, in instructions: file export / volume
   (the volume's own cost), in place / first write (the cost of a
   copy-on-write), read / read after a snapshot (what sharing costs a read),
   and candidate / nbdserver.

A count includes everything the server process runs in user space for the
requests (protocol, event loop, Python interpreter, libc); not the kernel's
share, and not time spent waiting. Under valgrind the server runs some 50
times slower, so the I/O queue stays full and requests batch as on a busy
server. Needs valgrind (Debian package valgrind) and fio.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import argtypes  # the scripts' shared argparse types
import bench  # helpers shared with scripts/bench.py

REPO = bench.REPO
MiB = bench.MiB
DESIGNS = ("radix", "extent", "linear")
START_TIMEOUT = 300.0  # seconds the server may take to listen under valgrind
WARM_UP_IOS = 200


@dataclass(frozen=True)
class Measure:
    """One counted fio run: `export` read or written (`rw`), `label` in the table."""

    label: str
    export: str
    rw: str


def log(msg: str) -> None:
    bench.log(f"instructions: {msg}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Count the instructions the server executes per 4 KiB I/O (callgrind), "
                    "for the raw file export and pool volumes; see the module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ios", type=argtypes.count(100), default=3000,
                   help="requests counted per workload, at least 100 (more: steadier, slower)")
    p.add_argument("--size", dest="size_bytes", type=bench.parse_size, default="256M",
                   metavar="SIZE", help="size of the file export and of each volume (a "
                                        "multiple of 1M, at least 16M)")
    p.add_argument("--designs", default="radix,extent",
                   help=f"volume designs, comma-separated, from {','.join(DESIGNS)}")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=DIR",
                   help="also count the nbdserver package found in DIR; repeatable")
    p.add_argument("--dir", type=argtypes.work_dir, default=REPO / "bench-results",
                   help="where the files and pools go (not tmpfs: the server uses O_DIRECT); "
                        "created if need be")
    p.add_argument("--keep", action="store_true",
                   help="keep the test file (reused by later runs of the same size)")
    p.add_argument("--json", type=bench.json_out, nargs="?", const="-", metavar="FILE",
                   help="write the counts as JSON to FILE (no FILE: stdout)")
    p.add_argument("--markdown", type=argtypes.out_file, metavar="FILE",
                   help="also write the table as Markdown")
    args = p.parse_args(argv)
    designs = [d for d in args.designs.split(",") if d]
    bad = [d for d in designs if d not in DESIGNS]
    if bad or not designs:
        p.error(f"--designs: unknown {', '.join(bad) or '(none)'}; valid: {', '.join(DESIGNS)}")
    args.design_list = designs
    args.sources = {"nbdserver": REPO}
    for spec in args.candidate:
        name, sep, src = spec.partition("=")
        path = Path(src).expanduser().resolve()
        if not sep or not name or name in args.sources:
            p.error(f"--candidate {spec!r}: want NAME=DIR with a new NAME")
        if not (path / "nbdserver" / "__main__.py").is_file():
            p.error(f"--candidate {spec!r}: {path} holds no nbdserver package")
        args.sources[name] = path
    bench.make_dir(p, "--dir", args.dir)  # last: no directory made for a refused command line
    return args


def check_tools() -> None:
    missing = [f"{tool} (Debian package {pkg})" for tool, pkg in
               (("valgrind", "valgrind"), ("callgrind_control", "valgrind"), ("fio", "fio"),
                ("qemu-img", "qemu-utils")) if shutil.which(tool) is None]
    if missing:
        raise bench.BenchError(f"missing: {', '.join(missing)}; install with `make deps`")


class CountedServer:
    """``nbdserver serve`` from package `src`, under callgrind, in `work`."""

    def __init__(self, src: Path, work: Path, file: Path, designs: list[str], size: int) -> None:
        self.src = src
        self.work = work
        self.size = size
        # (a short directory of its own: `work` may be deep, and a Unix socket's path is
        # at most 107 bytes)
        self.sock_dir = Path(tempfile.mkdtemp(prefix="nbd-instr-"))
        self.sock = self.sock_dir / "s.sock"
        pools, exports = [], [f"  - {{name: file, file: {json.dumps(str(file))}}}"]
        for d in designs:
            pool = work / f"{d}.pool"
            pools.append(f"  - {{name: {d}, path: {json.dumps(str(pool))}, "
                         f"create: {{size: {size * 5 // 2}, blockmap: {d}}}}}")
            exports.append(f"  - {{name: {d}, pool: {d}, volume: {d}, "
                           f"create: {{size: {size}}}}}")
        self.config = work / "config.yaml"
        self.config.write_text(
            f"listen: [{{unix: {json.dumps(str(self.sock))}}}]\n"
            + "pools:\n" + "\n".join(pools) + "\n"
            + "exports:\n" + "\n".join(exports) + "\n"
            + "server: {io: aio, log-level: warning}\n")
        self.pools = {d: work / f"{d}.pool" for d in designs}
        self.env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(src))
        self.log_path = work / "server.log"
        with open(self.log_path, "wb") as out:
            self.proc = bench.spawn(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/callgrind.out",
                 sys.executable, "-m", "nbdserver", "serve", "-c", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=str(src), env=self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.sock.exists():
            if self.proc.poll() is not None:  # say so now, not after the timeout
                raise bench.BenchError(f"the server under valgrind exited with status "
                                       f"{self.proc.returncode} before listening"
                                       f"{bench.log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise bench.BenchError(f"the server under valgrind did not listen within "
                                       f"{START_TIMEOUT:.0f}s{bench.log_tail(self.log_path)}")
            time.sleep(0.5)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def fio(self, export: str, rw: str, ios: int, seed: int) -> None:
        argv = ["fio", "--name=count", "--ioengine=nbd", f"--uri={self.uri(export)}",
                f"--rw={rw}", "--bs=4k", "--iodepth=16", f"--size={self.size}",
                f"--number_ios={ios}", f"--randseed={seed}", "--output-format=terse"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise bench.BenchError(f"fio on {export} failed: {proc.stderr.strip()[-500:]}")

    def count(self, m: Measure, ios: int) -> float:
        """Instructions per request of `ios` requests of measure `m`."""
        self.fio(m.export, m.rw, WARM_UP_IOS, seed=7)
        self._control("-z")
        self.fio(m.export, m.rw, ios, seed=11)
        before = set(self.work.glob("callgrind.out.*"))
        self._control("-d")
        for _ in range(100):
            dumps = sorted(set(self.work.glob("callgrind.out.*")) - before)
            if dumps and _total(dumps[-1]) is not None:
                total = _total(dumps[-1])
                for d in dumps:
                    d.unlink()
                assert total is not None
                return total / ios
            time.sleep(0.2)
        raise bench.BenchError("callgrind wrote no dump")

    def _control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], check=True,
                       capture_output=True, timeout=120)

    def snapshot(self, design: str) -> None:
        """Snapshot volume `design` through the running server's control socket."""
        subprocess.run([sys.executable, "-m", "nbdserver", "volume", "snapshot",
                        str(self.pools[design]), design, f"{design}-snap"],
                       check=True, capture_output=True, cwd=str(self.src), env=self.env,
                       timeout=600)

    def stop(self) -> None:
        bench.stop_process(self.proc)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def _total(dump: Path) -> int | None:
    """The event total of a callgrind dump (None while it is being written)."""
    with contextlib.suppress(OSError):
        m = re.search(r"^(?:summary|totals):\s+(\d+)", dump.read_text(errors="replace"),
                      re.MULTILINE)
        if m:
            return int(m.group(1))
    return None


def measures(designs: list[str]) -> tuple[list[Measure], list[Measure]]:
    """(counted before the snapshots, counted after them)."""
    before = [Measure("file read", "file", "randread"), Measure("file write", "file",
                                                                "randwrite")]
    for d in designs:
        before += [Measure(f"{d} read", d, "randread"),
                   Measure(f"{d} write in place", d, "randwrite")]
    after = [Measure(f"{d} read after a snapshot", d, "randread") for d in designs]
    after += [Measure(f"{d} first write", d, "randwrite") for d in designs]
    return before, after


def run_source(name: str, src: Path, args: argparse.Namespace, file: Path,
               workdir: Path) -> dict[str, float]:
    work = workdir / name
    work.mkdir()
    log(f"{name}: starting the server under callgrind (slow) ...")
    server = CountedServer(src, work, file, args.design_list, args.size_bytes)
    try:
        for d in args.design_list:
            subprocess.run(["qemu-img", "convert", "-n", "-t", "none", "-f", "raw", "-O", "raw",
                            str(file), server.uri(d)], check=True, timeout=3600)
        counts: dict[str, float] = {}
        before, after = measures(args.design_list)
        for m in before:
            counts[m.label] = server.count(m, args.ios)
            log(f"{name}: {m.label}: {counts[m.label]:,.0f} instructions per I/O")
        for d in args.design_list:
            server.snapshot(d)
        for m in after:
            counts[m.label] = server.count(m, args.ios)
            log(f"{name}: {m.label}: {counts[m.label]:,.0f} instructions per I/O")
        return counts
    finally:
        server.stop()


def table(results: dict[str, dict[str, float]], designs: list[str]) -> list[list[str]]:
    names = list(results)
    rows = [["I/O (4 KiB, QD16)"] + [f"{n} instr/IO" for n in names]
            + [f"{n}/nbdserver" for n in names[1:]]]
    for label in results["nbdserver"]:
        row = [label] + [f"{results[n][label]:,.0f}" for n in names]
        row += [f"{results[n][label] / results['nbdserver'][label]:.3f}" for n in names[1:]]
        rows.append(row)
    for n in names:  # the ratios of the speed targets, in instructions
        r = results[n]
        for d in designs:
            rows.append([f"{n}: file read / {d} read", f"{r['file read'] / r[f'{d} read']:.3f}"]
                        + [""] * (len(names) * 2 - 2))
            rows.append([f"{n}: file write / {d} write in place",
                         f"{r['file write'] / r[f'{d} write in place']:.3f}"]
                        + [""] * (len(names) * 2 - 2))
            rows.append([f"{n}: {d} in place / first write",
                         f"{r[f'{d} write in place'] / r[f'{d} first write']:.3f}"]
                        + [""] * (len(names) * 2 - 2))
            rows.append([f"{n}: {d} read / read after a snapshot",
                         f"{r[f'{d} read'] / r[f'{d} read after a snapshot']:.3f}"]
                        + [""] * (len(names) * 2 - 2))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_tools()
        args.dir.mkdir(parents=True, exist_ok=True)
        kind = bench.fs_type(args.dir)
        if kind in ("tmpfs", "ramfs"):
            raise bench.BenchError(f"--dir {args.dir} is on {kind}: O_DIRECT needs a real disk")
        file = args.dir / f"bench-{args.size_bytes // MiB}M.img"
        # a test file already there (kept by bench.py or --keep) is reused and left there
        made = not (file.exists() and file.stat().st_size == args.size_bytes)
        workdir = Path(tempfile.mkdtemp(prefix="nbd-instr-", dir=args.dir))
        try:
            bench.make_test_file(file, args.size_bytes)
            results = {name: run_source(name, src, args, file, workdir)
                       for name, src in args.sources.items()}
        finally:
            bench.kill_all()
            shutil.rmtree(workdir, ignore_errors=True)
            if made and not args.keep:  # also a half-written one (Ctrl-C)
                for f in (file, file.with_suffix(".partial")):
                    with contextlib.suppress(OSError):
                        f.unlink()
    except bench.BenchError as e:
        print(f"instructions: {e}", file=sys.stderr)
        return 2
    rows = table(results, args.design_list)
    rev = bench.first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    header = (f"Instructions per 4 KiB I/O at queue depth 16 (callgrind, user space, whole "
              f"server process), {args.ios} requests per workload, nbdserver {rev}, "
              f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    text = f"{header}\n\n{bench.render_text(rows)}\n"
    if args.json == "-":
        print(json.dumps({"header": header, "instructions_per_io": results}, indent=2))
        bench.log(text)
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps({"header": header,
                                                   "instructions_per_io": results}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(f"{header}\n\n{bench.render_markdown(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
