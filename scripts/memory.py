#!/usr/bin/env python3
"""How much memory the server holds beyond its page cache, under loads that used to
make it grow without bound.

Each scenario starts a real ``nbdserver serve`` with a small ``server.cache-size``
on a pool in a local file, sets the scenario up, then samples the server's
resident memory (VmRSS, every 20 ms) while the load runs, and reports the peak
growth over the memory it had just before. What each load is:

- ``hole-reads``: one client sends 20,000 READs of 60 KiB over an empty thin
  volume in one go and reads none of the replies for three seconds (the replies
  complete at once: no I/O);
- ``cold-status``: a thin volume with one 4 KiB chunk written every 2 MiB (one
  radix leaf each); the server restarts (nothing cached) and eight clients ask
  32 BLOCK_STATUS over 1 GiB each at once;
- ``trim``: a fully written 1 GiB volume is trimmed in one request;
- ``catalog``: opening a pool made with ``--max-volumes 65536`` (a 16 MiB
  catalog) holding three volumes;
- ``check``: ``nbdserver pool check`` of 1 GiB written, through the running server.

    scripts/memory.py                        # radix and extent, 8 MiB cache
    scripts/memory.py --blockmap radix --cache-size 4M --json

Growth is reported in MiB beside the cache size; ``--json`` prints one object
per scenario. A scenario over its budget (cache size plus 32 MiB) is marked, and
the script exits 1 if any is. The machine's noise is a few MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]
try:
    import nbdserver  # noqa: F401
except ImportError:  # run by a Python outside the project's virtualenv: use that one
    VENV_PYTHON = REPO / ".venv" / "bin" / "python"
    if VENV_PYTHON.exists() and Path(sys.executable).resolve() != VENV_PYTHON.resolve():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    raise

import argtypes  # noqa: E402  # the scripts' shared argparse types (scripts/ is on sys.path)
from conftest import NbdServerProcess  # noqa: E402
from nbdclient import (  # noqa: E402
    raw_handshake,
    raw_socket,
    raw_structured_handshake,
    recv_exact,
    request,
)

from nbdserver.config import MIN_CACHE_SIZE  # noqa: E402
from nbdserver.protocol import constants as c  # noqa: E402
from nbdserver.sizes import format_size  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BUDGET_OVER_CACHE = 32 * MiB


class Sampler:
    """Peak VmRSS of a process, sampled in a thread while a load runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = rss(pid)
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss(self.pid))
            except OSError:
                return
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.base


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def structured_socket(srv: NbdServerProcess, export: str) -> socket.socket:
    """A raw socket in transmission with structured replies and base:allocation."""
    assert srv.socket_path is not None
    s = raw_socket(srv.socket_path)
    raw_structured_handshake(s, export)
    return s


def write_blocks(srv: NbdServerProcess, export: str, offsets: list[int], data: bytes) -> None:
    """WRITE `data` at each offset, 32 in flight, then FLUSH (simple replies)."""
    assert srv.socket_path is not None
    s = raw_socket(srv.socket_path, timeout=120)
    raw_handshake(s, export)
    for i in range(0, len(offsets), 32):
        batch = offsets[i:i + 32]
        s.sendall(b"".join(request(c.CMD_WRITE, k, off, len(data)) + data
                           for k, off in enumerate(batch)))
        for _ in batch:
            magic, err, _cookie = struct.unpack(">IIQ", recv_exact(s, 16))
            assert magic == c.SIMPLE_REPLY_MAGIC and err == 0, err
    s.sendall(request(c.CMD_FLUSH, 1))
    assert struct.unpack(">IIQ", recv_exact(s, 16))[1] == 0
    s.close()


def drain(s: socket.socket, seconds: float) -> None:
    s.settimeout(seconds)
    try:
        while s.recv(1 << 20):
            pass
    except OSError:
        pass


class Run:
    def __init__(self, workdir: Path, design: str, cache: int) -> None:
        self.workdir = workdir
        self.design = design
        self.cache = cache
        self.count = 0

    def server(self, volumes: dict[str, str], *, max_volumes: int | None = None,
               pool: Path | None = None) -> NbdServerProcess:
        self.count += 1
        work = self.workdir / f"{self.design}-{self.count}"
        path = pool or work / "pool.img"
        if pool is None:
            args = [sys.executable, "-m", "nbdserver", "pool", "create", str(path),
                    "--size", "4G", "--blockmap", self.design]
            if max_volumes:
                args += ["--max-volumes", str(max_volumes)]
            work.mkdir(parents=True)
            subprocess.run(args, check=True, capture_output=True)
        exports = [{"name": name, "pool": "main", "volume": name, "create": {"size": size}}
                   for name, size in volumes.items()]
        srv = NbdServerProcess(work, exports, pools=[{"name": "main", "path": str(path)}],
                               server={"cache-size": self.cache}, tcp=False)
        return srv.start(timeout=60)


def hole_reads(run: Run) -> tuple[int, str]:
    srv = run.server({"v": "8G"})
    try:
        s = raw_socket(srv.socket_path or "")
        raw_handshake(s, "v")
        blob = b"".join(request(c.CMD_READ, i, (i % 8000) * MiB, 60 * KiB)
                        for i in range(20000))
        with Sampler(srv.pid) as m:
            s.setblocking(False)
            sent, deadline = 0, time.monotonic() + 3
            while time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    sent += s.send(blob[sent:sent + 65536]) if sent < len(blob) else 0
                time.sleep(0.01)
        s.close()
        return m.growth, f"{sent // 28} requests taken in 3 s"
    finally:
        srv.cleanup()


def cold_status(run: Run) -> tuple[int, str]:
    srv = run.server({"v": "4G"})
    pool = Path(srv.config["pools"][0]["path"])
    write_blocks(srv, "v", list(range(0, 4 * GiB, 2 * MiB)), b"\xab" * 4096)
    srv.stop()
    srv = run.server({"v": "4G"}, pool=pool)
    try:
        socks = [structured_socket(srv, "v") for _ in range(8)]
        with Sampler(srv.pid) as m:
            for s in socks:
                s.sendall(b"".join(request(c.CMD_BLOCK_STATUS, i, (i % 4) * GiB, GiB)
                                   for i in range(32)))
            for s in socks:
                drain(s, 2.0)
        for s in socks:
            s.close()
        return m.growth, "8 clients x 32 requests over 1 GiB"
    finally:
        srv.cleanup()


def written_gib(run: Run) -> NbdServerProcess:
    """A server exporting 'v', a 1 GiB volume written whole."""
    srv = run.server({"v": "1G"})
    write_blocks(srv, "v", list(range(0, GiB, MiB)), b"\xcd" * MiB)
    return srv


def trim(run: Run) -> tuple[int, str]:
    srv = written_gib(run)
    try:
        s = raw_socket(srv.socket_path or "", timeout=600)
        raw_handshake(s, "v")
        with Sampler(srv.pid) as m:
            t = time.monotonic()
            s.sendall(request(c.CMD_TRIM, 1, 0, GiB))
            assert struct.unpack(">IIQ", recv_exact(s, 16))[1] == 0
            took = time.monotonic() - t
        s.close()
        return m.growth, f"1 GiB trimmed in {took:.1f} s"
    finally:
        srv.cleanup()


def catalog(run: Run) -> tuple[int, str]:
    small = run.server({"a": "1G", "b": "1G", "c": "1G"})
    base = rss(small.pid)
    small.cleanup()
    big = run.server({"a": "1G", "b": "1G", "c": "1G"}, max_volumes=65536)
    try:
        return rss(big.pid) - base, "--max-volumes 65536 against 4096, at rest"
    finally:
        big.cleanup()


def check(run: Run) -> tuple[int, str]:
    srv = written_gib(run)
    try:
        pool = srv.config["pools"][0]["path"]
        with Sampler(srv.pid) as m:
            t = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "nbdserver", "pool", "check", pool,
                                  "--json"], capture_output=True, text=True, timeout=600)
            took = time.monotonic() - t
        report = json.loads(out.stdout)
        assert out.returncode == 0, out.stderr
        return m.growth, f"{report['data_chunks_referenced']:,} chunks in {took:.1f} s"
    finally:
        srv.cleanup()


SCENARIOS: dict[str, Callable[[Run], tuple[int, str]]] = {
    "hole-reads": hole_reads, "cold-status": cold_status, "trim": trim,
    "catalog": catalog, "check": check,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blockmap", action="append", choices=["radix", "extent"],
                   help="design (repeatable; default both; linear's origins are thick)")
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                   help="scenario (repeatable; default all)")
    p.add_argument("--cache-size", type=argtypes.size(MIN_CACHE_SIZE), default="8M",
                   help=f"server.cache-size, at least {format_size(MIN_CACHE_SIZE)} "
                        "(default 8M)")
    p.add_argument("--workdir", type=argtypes.work_dir, help="where pools go, in a new "
                   "directory made there (default: the current directory; it must allow "
                   "O_DIRECT, so not tmpfs); created if need be")
    p.add_argument("--json", action="store_true", help="one JSON object per scenario")
    args = p.parse_args()
    cache: int = args.cache_size
    base: Path = args.workdir or Path.cwd()
    try:
        base.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="memory-", dir=base))
    except OSError as e:
        p.error(f"argument --workdir: cannot create a directory in {base}: {e.strerror or e}")
    over = False
    try:
        for design in args.blockmap or ["radix", "extent"]:
            run = Run(workdir, design, cache)
            for name in args.scenario or list(SCENARIOS):
                if not args.json and sys.stderr.isatty():
                    print(f"{design:<7} {name:<12} ...", end="\r", flush=True, file=sys.stderr)
                growth, what = SCENARIOS[name](run)
                ok = growth <= cache + BUDGET_OVER_CACHE
                over |= not ok
                row = {"blockmap": design, "scenario": name, "growth_bytes": growth,
                       "cache_bytes": cache, "within_budget": ok, "what": what}
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{design:<7} {name:<12} {growth / MiB:7.1f} MiB "
                          f"(cache {cache / MiB:.0f} MiB){'' if ok else '  OVER BUDGET'}"
                          f"  {what}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
