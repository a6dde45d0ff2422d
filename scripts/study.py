#!/usr/bin/env python3
"""The block-map study: radix, extent and linear head to head, qcow2 as the outside anchor.

``make study`` (or ``.venv/bin/python scripts/study.py --help``) runs every
experiment in one run, the designs interleaved point by point (the order
rotating) so that a noisy neighbour hits every design alike, and writes
``docs/study.md`` with the tables and PNG plots in ``docs/study/``:

1. **Snapshots vs origin writes.** For each snapshot count N, a fresh pool and
   volume, prefilled with 1 MiB sequential writes, N snapshots taken (through
   the control socket of the running server), then fio randwrite 4k QD16 over
   the whole volume, one pass (each chunk written once, or ``--seconds`` if that
   takes longer). fio's random map makes each write hit a chunk not written
   before in that run, so with snapshots every write is a first write after them
   (a copy), and with none every write overwrites in place; the table says how
   many new data chunks the pool allocated and how many writes hit chunks
   already copied (none, unless a run loops).
2. **Fork depth vs reads.** A chain of forks (each fork rewrites a few random
   chunks, then is forked again); randread 4k QD16 of the deepest at each
   measured depth: IOPS, mean and p99 completion latency. The same chain of
   qcow2 files (``qemu-img create -b parent``) served by ``qemu-nbd -f qcow2
   --cache=none --aio=native`` is the anchor. linear cannot fork a fork.
3. **Locality.** A fork of a sequentially written volume, rewritten with random
   4 KiB writes until 1%, 10%, 50% of its chunks are its own; sequential 1 MiB
   read throughput (QD4) and the extents per GiB (``volume info``) at each step.
4. **Snapshot and fork creation time vs volume size** (thin volumes with some
   data spread over them): the CLI round trip, and the control-socket call alone
   (the time inside the server plus a local socket round trip).
5. **Metadata and reclamation.** Pool metadata bytes per GiB written
   (sequential fill; random rewrites in a fork), and the space returned by
   deleting the fork against its exclusive bytes (and ``pool check``).
6. **VM boot from a fork**, per design, from ``scripts/vm-demo`` when present.

Pools are zero-filled files (``pool create --preallocate=full``): every block
written once, as on a block device, so that first writes do not also measure
the filesystem (allocating a block of a sparse file, or converting an unwritten
extent of an fallocated one: about three times the CPU of an overwrite on ext4,
docs/benchmarks.md Run T). ``--pools falloc`` or ``--pools sparse`` measure
those instead. (Experiment 4's pools, sized for 1 TiB volumes, stay sparse: they
hold little data.)

``--quick`` runs small sizes and few points (about 2-3 minutes) to check that
everything works; its output goes to ``study-work/quick/`` unless ``--out`` is
given. Pools and qcow2 files go under ``--dir`` (default ``study-work/`` at the
top of the repository; tmpfs is refused) and are deleted as soon as they are
measured (``--keep`` keeps them). Every process started is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
import argtypes  # the scripts' shared argparse types
import bench  # helpers shared with scripts/bench.py

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CHUNK = 4 * KiB  # the pools' chunk size (the default)
POOL_FILES = {"full": "zero-filled", "falloc": "preallocated", "sparse": "sparse"}  # --pools
SERVER_TIMEOUT = 120.0  # seconds a server may take to open its pool and listen
QCOW2 = "qcow2"  # the anchor's name in the tables
FLAT_TOLERANCE = 0.10


class StudyError(Exception):
    """An expected failure: printed as one line."""


_T0 = time.monotonic()


def log(msg: str) -> None:
    t = time.monotonic() - _T0
    print(f"[{int(t) // 60:3d}:{int(t) % 60:02d}] {msg}", file=sys.stderr, flush=True)


def human(n: float) -> str:
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def size_arg(n: int) -> str:
    return f"{n // MiB}M" if n % GiB else f"{n // GiB}G"


def rotate(items: list[str], k: int) -> list[str]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


# -- parameters --------------------------------------------------------------------------


@dataclass
class Params:
    region: int  # volume size of experiments 1-3 (written in full)
    seconds: int
    snapshot_counts: list[int]
    depths: list[int]
    rewrite_chunks: int  # random chunks each fork of the chain rewrites
    fractions: list[int]  # percent of the fork rewritten (experiment 3)
    sizes: list[int]  # volume sizes of experiment 4
    spread_data: int  # data written over each volume of experiment 4
    creation_repeats: int
    linear_max_size: int  # largest thick linear origin experiment 4 creates
    pool_size: int  # pools of experiments 1-3, 5


FULL = Params(region=1 * GiB, seconds=10, snapshot_counts=[0, 1, 2, 4, 8, 16, 32, 64],
              depths=[0, 1, 4, 16, 64], rewrite_chunks=256, fractions=[0, 1, 10, 50],
              sizes=[1 * GiB, 16 * GiB, 256 * GiB, 1 * TiB], spread_data=64 * MiB,
              creation_repeats=3, linear_max_size=16 * GiB, pool_size=16 * GiB)
QUICK = Params(region=64 * MiB, seconds=1, snapshot_counts=[0, 2], depths=[0, 2],
               rewrite_chunks=32, fractions=[0, 10], sizes=[1 * GiB, 16 * GiB],
               spread_data=4 * MiB, creation_repeats=1, linear_max_size=1 * GiB,
               pool_size=2 * GiB)
VM_ROUNDS, QUICK_VM_ROUNDS = 3, 1  # rounds of scripts/vm-demo (experiment 6)


# -- processes ---------------------------------------------------------------------------


def public_command(argv: list[str]) -> str:
    """The command line as the report shows it: without ``--dir`` (where this machine put
    the pools and images, nothing about the method)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--dir":
            skip = True
        elif not arg.startswith("--dir="):
            out.append(arg)
    return " ".join(["scripts/study.py", *out])


def run(argv: list[str], what: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    proc = bench.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        bench.stop_process(proc, signal.SIGKILL)
        raise StudyError(f"{what}: no answer within {timeout:.0f}s") from None
    finally:
        with contextlib.suppress(ValueError):
            bench._children.remove(proc)
    res = subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"),
                                      err.decode(errors="replace"))
    if res.returncode != 0:
        msg = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise StudyError(f"{what} failed (status {res.returncode}): "
                         f"{msg[-1] if msg else '(no output)'}")
    return res


def in_pool(pool_path: Path, op: Callable[[Any], Awaitable[T]]) -> T:
    """Open the pool in this process (as the offline CLI does), run `op(pool)`, close it.
    A UserError of nbdserver (a refusal) becomes Refused; anything else a StudyError."""
    import asyncio

    import uvloop

    from nbdserver.errors import UserError
    from nbdserver.pool.pool import Pool
    from nbdserver.storage.buffers import BufferPool
    from nbdserver.storage.engine import make_engine

    async def go() -> T:
        engine = make_engine(asyncio.get_running_loop())
        buffers = BufferPool()
        try:
            pool = await Pool.open(pool_path, engine, buffers, offline=True)
            try:
                return await op(pool)
            finally:
                await pool.close()
        finally:
            engine.close()

    try:
        return uvloop.run(go())
    except UserError as e:
        raise Refused(str(e)) from None
    except Exception as e:
        raise StudyError(f"{pool_path.name}: {e!r}") from e


def combine_rounds(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one point as one: the median of each number, lists joined; the rounds'
    IOPS kept. A point that failed in every round keeps the first round's error."""
    ok = [r for r in rs if "iops" in r]
    if not ok:
        return rs[0]
    if len(ok) == 1:
        return ok[0]
    out: dict[str, Any] = {}
    for key, v in ok[0].items():
        vals = [r.get(key) for r in ok]
        if isinstance(v, list):
            out[key] = [x for val in vals if isinstance(val, list) for x in val]
        elif isinstance(v, int | float) and not isinstance(v, bool) and all(
                isinstance(x, int | float) for x in vals):
            med = statistics.median(vals)
            out[key] = round(med) if all(isinstance(x, int) for x in vals) else round(med, 3)
        else:
            out[key] = v
    out["rounds_iops"] = [r["iops"] for r in ok]
    return out


def nbdserver_cli(*args: str, what: str | None = None) -> Any:
    """Run ``nbdserver ARGS --json`` and return the parsed JSON."""
    argv = [sys.executable, "-m", "nbdserver", *args, "--json"]
    res = run(argv, what or f"nbdserver {' '.join(args[:2])}")
    return json.loads(res.stdout)


def timed_cli(*args: str) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = nbdserver_cli(*args)
    return out, time.perf_counter() - t0


@dataclass
class Server:
    """A running nbdserver (one pool) or qemu-nbd (one qcow2 file)."""

    name: str
    proc: subprocess.Popen[bytes]
    sock: Path
    log_path: Path
    pool: Path | None = None
    control_path: Path | None = None

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise StudyError(f"{self.name} exited with status {self.proc.returncode}"
                             f"{bench.log_tail(self.log_path)}")

    def control(self, op: str, **args: Any) -> tuple[Any, float]:
        """Call `op` on the server's control socket: (result, seconds)."""
        from nbdserver.control.socket import call
        from nbdserver.errors import UserError

        assert self.control_path is not None
        self.check_alive()
        t0 = time.perf_counter()
        try:
            out = call(self.control_path, op, args)
        except UserError as e:
            raise Refused(str(e)) from None
        return out, time.perf_counter() - t0

    def stop(self) -> None:
        bench.stop_process(self.proc)
        if self.proc.returncode not in (0, -signal.SIGTERM):
            log(f"warning: {self.name} exited with status {self.proc.returncode}"
                f"{bench.log_tail(self.log_path)}")
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()


class Refused(StudyError):
    """The server refused an operation (its message says why)."""


def wait_listening(server: Server, timeout: float = SERVER_TIMEOUT) -> None:
    target = bench.Target(server.name, server.uri(), server.proc, server.log_path)
    try:
        bench.wait_for_socket(target, server.sock, timeout)
    except bench.BenchError as e:
        raise StudyError(str(e)) from None


class Workspace:
    """Where a run keeps its files: pools on the study dir, sockets in a short temp dir."""

    def __init__(self, root: Path, keep: bool, preallocate: str = "full") -> None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = root.resolve() / f"run-{stamp}"
        self.dir.mkdir(parents=True)
        self.sockets = Path(tempfile.mkdtemp(prefix="nbd-study-"))
        self.keep = keep
        self.preallocate = preallocate
        self.servers: list[Server] = []

    def path(self, name: str) -> Path:
        return self.dir / name

    def remove(self, *paths: Path) -> None:
        if self.keep:
            return
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def close(self) -> None:
        for s in list(self.servers):
            s.stop()
        shutil.rmtree(self.sockets, ignore_errors=True)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def create_pool(self, name: str, design: str, size: int, *,
                    sparse: bool = False) -> Path:
        """A new pool file, preallocated as --pools says, or sparse if `sparse` (experiment
        4's pools, sized for 1 TiB volumes, hold little data)."""
        pool = self.path(f"{name}.pool")
        self.remove(pool)
        from nbdserver.pool.pool import Pool

        # what `nbdserver pool create [--preallocate[=full]]` does
        Pool.create(pool, size, blockmap=design, preallocate="" if sparse else self.preallocate)
        return pool

    def create_volume(self, pool: Path, name: str, size: int) -> float:
        """`nbdserver volume create` (offline: creating a thick linear volume in a running
        server is much slower, see the report); returns the seconds it took."""
        return timed_cli("volume", "create", str(pool), name, "--size", size_arg(size))[1]

    def serve(self, tag: str, pool: Path, exports: list[tuple[str, dict[str, Any] | None]]
              ) -> Server:
        """Serve `exports` (volume name, create spec or None) of `pool` (export = volume)."""
        from nbdserver.control.socket import socket_path
        from nbdserver.pool.pool import read_superblock

        sock = self.sockets / f"{tag}.sock"
        cfg_path = self.path(f"{tag}.yaml")
        log_path = self.path(f"{tag}.log")
        cfg = {
            "listen": [{"unix": str(sock)}],
            "server": {"log-level": "warning"},
            "pools": [{"name": "p", "path": str(pool)}],
            "exports": [{"name": v, "pool": "p", "volume": v, **({"create": c} if c else {})}
                        for v, c in exports],
        }
        cfg_path.write_text(json.dumps(cfg, indent=1) + "\n")  # JSON is YAML
        with open(log_path, "wb") as out:
            proc = bench.spawn([sys.executable, "-m", "nbdserver", "serve", "-c", str(cfg_path)],
                               stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                               cwd=str(REPO))
        server = Server(f"nbdserver[{tag}]", proc, sock, log_path, pool,
                        socket_path(read_superblock(pool).uuid_str, pool))
        self.servers.append(server)
        wait_listening(server)
        return server

    def serve_qcow2(self, tag: str, image: Path, read_only: bool = False) -> Server:
        sock = self.sockets / f"{tag}.sock"
        log_path = self.path(f"{tag}.log")
        argv = ["qemu-nbd", "-f", "qcow2", "--cache=none", "--aio=native", "-t", "-e", "8",
                *(["-r"] if read_only else []), "-k", str(sock), str(image)]
        with open(log_path, "wb") as out:
            proc = bench.spawn(argv, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT)
        server = Server(f"qemu-nbd[{tag}]", proc, sock, log_path)
        self.servers.append(server)
        wait_listening(server)
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        with contextlib.suppress(ValueError):
            self.servers.remove(server)


# -- fio ---------------------------------------------------------------------------------


@dataclass
class Fio:
    """One fio job's result. `iops` is fio's mean over the run; `samples` are the IOPS of
    each second (time-based runs), whose median the tables use: a neighbour's burst on a
    shared machine spoils a few seconds, not the figure."""

    iops: float
    mibps: float
    ios: int
    lat_mean_us: float
    lat_p99_us: float
    runtime_s: float
    host_busy_pct: float
    host_steal_pct: float
    server_cpu_us_per_io: float | None = None
    bs: int = 4096
    samples: list[float] = field(default_factory=list)

    @property
    def iops_median(self) -> float:
        return statistics.median(self.samples) if self.samples else self.iops

    def brief(self) -> dict[str, Any]:
        med = self.iops_median
        return {"iops": round(med, 1), "mibps": round(med * self.bs / MiB, 2),
                "iops_mean": round(self.iops, 1), "mibps_mean": round(self.mibps, 2),
                "iops_seconds": [round(x) for x in self.samples],
                "ios": self.ios, "lat_mean_us": round(self.lat_mean_us, 1),
                "lat_p99_us": round(self.lat_p99_us, 1), "runtime_s": round(self.runtime_s, 2),
                "host_busy_pct": round(self.host_busy_pct, 1),
                "host_steal_pct": round(self.host_steal_pct, 1),
                "server_cpu_us_per_io": None if self.server_cpu_us_per_io is None
                else round(self.server_cpu_us_per_io, 1)}


def merge(runs: list[Fio]) -> Fio:
    """Several slices of one measurement as one result (samples pooled)."""
    ios = sum(r.ios for r in runs)
    t = sum(r.runtime_s for r in runs) or 1.0
    cpu = [r.server_cpu_us_per_io * r.ios for r in runs if r.server_cpu_us_per_io is not None]
    return Fio(iops=ios / t, mibps=sum(r.mibps * r.runtime_s for r in runs) / t, ios=ios,
               lat_mean_us=sum(r.lat_mean_us * r.ios for r in runs) / ios if ios else 0.0,
               lat_p99_us=statistics.median(r.lat_p99_us for r in runs),
               runtime_s=t, host_busy_pct=sum(r.host_busy_pct * r.runtime_s for r in runs) / t,
               host_steal_pct=sum(r.host_steal_pct * r.runtime_s for r in runs) / t,
               server_cpu_us_per_io=sum(cpu) / ios if cpu and ios else None, bs=runs[0].bs,
               samples=[x for r in runs for x in r.samples])


def parse_bs(bs: str) -> int:
    return int(bs[:-1]) * {"k": KiB, "m": MiB}[bs[-1].lower()]


def fio(server: Server, export: str, rw: str, bs: str, qd: int, size: int, *,
        seconds: int | None = None, number_ios: int | None = None, seed: int | None = None,
        norandommap: bool = False, one_pass: bool = False) -> Fio:
    """fio on `export`: for `seconds` (time-based, looping over the region), or with
    `one_pass` each block of the region once (fio's random map), stopping at `seconds`
    if it takes longer; either way with an IOPS log, one figure per second."""
    server.check_alive()
    argv = ["fio", f"--name={rw}", "--ioengine=nbd", f"--uri={server.uri(export)}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={size}",
            "--output-format=json"]
    logdir = Path(tempfile.mkdtemp(prefix="nbd-study-fio-"))
    if seconds is not None:
        argv += [f"--runtime={seconds}", f"--write_iops_log={logdir / 'x'}",
                 "--log_avg_msec=1000"]
        if one_pass:  # (number_ios stops fio only when it is not time-based)
            number_ios = size // parse_bs(bs)
        else:
            argv.append("--time_based")
    if number_ios is not None:
        argv.append(f"--number_ios={number_ios}")
    if seed is not None:  # fio ignores randseed unless randrepeat is off
        argv += ["--randrepeat=0", f"--randseed={seed}"]
    if norandommap:
        argv.append("--norandommap")
    h0 = bench.host_cpu()
    c0 = sum(bench.proc_cpu(server.proc.pid))
    try:
        res = run(argv, f"fio {rw} {bs} on {server.name}/{export}",
                  timeout=(seconds or 0) + 1800)
        samples = []
        for log_file in logdir.glob("x_iops*.log"):
            for line in log_file.read_text().splitlines():
                parts = [x.strip() for x in line.split(",")]
                if len(parts) >= 2 and parts[1].isdigit():
                    samples.append(float(parts[1]))
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    h1 = bench.host_cpu()
    c1 = sum(bench.proc_cpu(server.proc.pid)) if server.proc.poll() is None else c0
    try:
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise StudyError(f"fio on {server.name}: unreadable output: {res.stderr[-300:]}"
                         f"{bench.log_tail(server.log_path)}") from None
    if job.get("error"):
        raise StudyError(f"fio on {server.name}: error {job['error']}"
                         f"{bench.log_tail(server.log_path)}")
    side = job["write" if "write" in rw else "read"]
    clat = side.get("clat_ns", {})
    dt, dbusy, dsteal = (b - a for a, b in zip(h0, h1, strict=True))
    ios = int(side["total_ios"])
    return Fio(iops=side["iops"], mibps=side["bw"] / 1024, ios=ios,
               server_cpu_us_per_io=(c1 - c0) / ios * 1e6 if ios else None,
               lat_mean_us=clat.get("mean", 0) / 1000,
               lat_p99_us=clat.get("percentile", {}).get("99.000000", 0) / 1000,
               runtime_s=side.get("runtime", 0) / 1000,
               host_busy_pct=100 * dbusy / dt if dt else 0.0,
               host_steal_pct=100 * dsteal / dt if dt else 0.0,
               bs=parse_bs(bs), samples=samples)


def prefill(server: Server, export: str, size: int) -> Fio:
    return fio(server, export, "write", "1m", 4, size)


# -- the study ---------------------------------------------------------------------------


@dataclass
class Study:
    args: argparse.Namespace
    p: Params
    ws: Workspace
    designs: list[str]
    results: dict[str, Any] = field(default_factory=dict)

    def point(self, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one measurement; an error is recorded (and printed), not fatal."""
        try:
            return fn()
        except Refused as e:
            log(f"  {what}: refused: {e}")
            return {"refused": str(e)}
        except StudyError as e:
            log(f"  {what}: ERROR: {e}")
            for s in list(self.ws.servers):
                if s.proc.poll() is not None:
                    self.ws.stop(s)
            return {"error": str(e)}

    # 1 -----------------------------------------------------------------------------------

    def snapshots(self) -> None:
        p = self.p
        out: dict[str, dict[str, Any]] = {d: {} for d in self.designs}
        self.results["snapshots"] = out
        rounds = self.args.rounds
        log(f"== 1. origin 4k random writes vs snapshot count {p.snapshot_counts} "
            f"({human(p.region)} volume, {p.seconds}s each, {rounds} round(s))")
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {
            d: {n: [] for n in p.snapshot_counts} for d in self.designs}
        for rnd in range(rounds):
            for k, n in enumerate(p.snapshot_counts):
                for design in rotate(self.designs, k + rnd):
                    r = self.point(f"{design} N={n}",
                                   lambda d=design, n=n: self._snapshot_point(d, n))
                    runs[design][n].append(r)
                    out[design][str(n)] = combine_rounds(runs[design][n])
                    if "iops" in r:
                        log(f"  {design:7} N={n:3}: {r['iops']:9,.0f} IOPS  p99 "
                            f"{r['lat_p99_us']:8,.0f} us  ({r['first_writes']:,} first writes, "
                            f"{r['hits_on_copied']:,} on copied chunks; server "
                            f"{r['server_cpu_us_per_io'] or 0:.0f} us CPU/IO)")

    def _snapshot_point(self, design: str, n: int) -> dict[str, Any]:
        p, ws = self.p, self.ws
        pool = ws.create_pool(f"snap-{design}-{n}", design, p.pool_size)
        ws.create_volume(pool, "o", p.region)
        srv = ws.serve(f"snap-{design}-{n}", pool, [("o", None)])
        try:
            prefill(srv, "o", p.region)
            snap_s = []
            for i in range(1, n + 1):
                _, dt = srv.control("volume.snapshot", source="o", name=f"s{i}")
                snap_s.append(dt)
            used0 = srv.control("pool.info")[0]["used_bytes"]
            # One pass over the volume: with snapshots, every write is a first write.
            f = fio(srv, "o", "randwrite", "4k", 16, p.region, seconds=p.seconds,
                    one_pass=True)
            used1 = srv.control("pool.info")[0]["used_bytes"]
        finally:
            ws.stop(srv)
            ws.remove(pool)
        new_chunks = (used1 - used0) // CHUNK
        # each first write after the snapshots allocates: linear one copy per snapshot,
        # radix and extent one redirected chunk; with no snapshot nothing is allocated
        per_first = 0 if n == 0 else (n if design == "linear" else 1)
        first = new_chunks // per_first if per_first else 0
        return {**f.brief(), "snapshots": n, "new_chunks": new_chunks, "first_writes": first,
                "hits_on_copied": max(0, f.ios - first) if n else 0,
                "snapshot_s_median": statistics.median(snap_s) if snap_s else None}

    # 2 -----------------------------------------------------------------------------------

    def depth(self) -> None:
        p, ws = self.p, self.ws
        chains = [*self.designs, *([] if self.args.no_qcow2 else [QCOW2])]
        out: dict[str, dict[str, Any]] = {d: {} for d in chains}
        self.results["depth"] = out
        top = max(p.depths)
        log(f"== 2. 4k random reads vs fork depth {p.depths} ({human(p.region)} volume, "
            f"{p.rewrite_chunks} random chunks rewritten per fork, {p.seconds}s reads)")
        state: dict[str, dict[str, Any]] = {}
        for design in chains:
            r = self.point(f"{design} chain base", lambda d=design: self._chain_base(d))
            if "error" in r:
                out[design]["0"] = r
                continue
            state[design] = r
        if 0 in p.depths:
            for design in rotate(list(state), 0):
                out[design]["0"] = self.point(f"{design} depth 0",
                                              lambda d=design: self._chain_read(state[d], 0))
                self._log_read(design, 0, out[design]["0"])
        for level in range(1, top + 1):
            if level in p.depths or level % 8 == 0:
                log(f"  building level {level}/{top}")
            for design in rotate(list(state), level):
                st = state[design]
                if st.get("refused"):
                    if level in p.depths:
                        out[design][str(level)] = {"refused": st["refused"]}
                    continue
                r = self.point(f"{design} level {level}",
                               lambda st=st, lv=level: self._chain_level(st, lv))
                if level in p.depths or "refused" in r or "error" in r:
                    out[design][str(level)] = r
                    if "refused" in r:
                        st["refused"] = r["refused"]
                    elif "error" in r:
                        st["refused"] = f"error: {r['error']}"
                    else:
                        self._log_read(design, level, r)
        for st in state.values():
            ws.remove(*st["files"])

    def _log_read(self, design: str, depth: int, r: dict[str, Any]) -> None:
        if "iops" in r:
            log(f"  {design:7} depth {depth:3}: {r['iops']:9,.0f} IOPS  mean "
                f"{r['lat_mean_us']:7,.0f} us  p99 {r['lat_p99_us']:8,.0f} us  "
                f"({r['vs_base']:.2f}x the base read alongside; server "
                f"{r['server_cpu_us_per_io'] or 0:.0f} us CPU/IO)")

    def _chain_base(self, design: str) -> dict[str, Any]:
        p, ws = self.p, self.ws
        if design == QCOW2:
            img = ws.path("chain-0.qcow2")
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(p.region)],
                "qemu-img create")
            srv = ws.serve_qcow2("chain-qcow2", img)
            try:
                prefill(srv, "", p.region)
            finally:
                ws.stop(srv)
            return {"design": design, "files": [img]}
        pool = ws.create_pool(f"chain-{design}", design, p.pool_size)
        ws.create_volume(pool, "d0", p.region)
        srv = ws.serve(f"chain-{design}", pool, [("d0", None)])
        st = {"design": design, "pool": pool, "files": [pool]}
        try:
            prefill(srv, "d0", p.region)
        finally:
            ws.stop(srv)
        self._fork_next(st, 0)
        return st

    def _fork_next(self, st: dict[str, Any], level: int) -> None:
        """Fork d{level} into d{level+1} if the chain goes on. Done in this process on the
        closed pool: the control operation would also walk the new volume's map for its
        `volume info` answer, which costs seconds per level for radix (experiment 4)."""
        if level >= max(self.p.depths):
            return
        src, dst = f"d{level}", f"d{level + 1}"
        try:
            in_pool(st["pool"], lambda pool: pool.clone_volume(src, dst, snapshot=False))
        except Refused as e:
            st["refused"] = str(e)
            log(f"  {st['design']:7} fork of d{level} refused: {e}")

    def _serve_level(self, st: dict[str, Any], level: int) -> tuple[Server, str]:
        if st["design"] == QCOW2:
            return self.ws.serve_qcow2("chain-qcow2", self.ws.path(f"chain-{level}.qcow2")), ""
        exports = [(f"d{level}", None)] + ([("d0", None)] if level else [])
        return self.ws.serve(f"chain-{st['design']}", st["pool"], exports), f"d{level}"

    def _chain_read(self, st: dict[str, Any], level: int) -> dict[str, Any]:
        srv, export = self._serve_level(st, level)
        try:
            f = fio(srv, export, "randread", "4k", 16, self.p.region, seconds=self.p.seconds)
        finally:
            self.ws.stop(srv)
        return {**f.brief(), "depth": level, "base_iops": round(f.iops, 1), "vs_base": 1.0}

    def _paired(self, srv: Server, export: str, base_srv: Server, base_export: str,
                level: int) -> tuple[Fio, Fio, list[float]]:
        """Read the deep fork and the base in alternating slices (2 s each, --seconds in all
        for each), so that a slow minute of the machine hits both; the ratio of each pair."""
        p = self.p
        rounds = max(1, p.seconds // 2)
        sl = max(1, round(p.seconds / rounds))
        deep: list[Fio] = []
        base: list[Fio] = []
        ratios = []
        for i in range(rounds):
            pair: dict[str, Fio] = {}
            for which in (("deep", "base") if (i + level) % 2 else ("base", "deep")):
                s_, e_ = (srv, export) if which == "deep" else (base_srv, base_export)
                pair[which] = fio(s_, e_, "randread", "4k", 16, p.region, seconds=sl)
            deep.append(pair["deep"])
            base.append(pair["base"])
            if pair["base"].iops_median:
                ratios.append(pair["deep"].iops_median / pair["base"].iops_median)
        return merge(deep), merge(base), ratios

    def _chain_level(self, st: dict[str, Any], level: int) -> dict[str, Any]:
        """Fork level-1 into level, rewrite a few random chunks, read if it is measured."""
        p, ws = self.p, self.ws
        if st["design"] == QCOW2:
            img = ws.path(f"chain-{level}.qcow2")
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"chain-{level - 1}.qcow2",
                 "-F", "qcow2", str(img)], "qemu-img create (backing)")
            st["files"].append(img)
        srv, export = self._serve_level(st, level)
        try:
            fio(srv, export, "randwrite", "4k", 16, p.region, number_ios=p.rewrite_chunks,
                seed=1000 + level)
            if level not in p.depths:
                ws.stop(srv)
                if st["design"] != QCOW2:
                    self._fork_next(st, level)
                return {}
            info = {}
            if st["design"] == QCOW2:  # the base image, read-only, by a second qemu-nbd
                base_srv = ws.serve_qcow2("chain-qcow2-base", ws.path("chain-0.qcow2"),
                                          read_only=True)
                try:
                    f, base, ratios = self._paired(srv, export, base_srv, "", level)
                finally:
                    ws.stop(base_srv)
            else:
                f, base, ratios = self._paired(srv, export, srv, "d0", level)
                info = srv.control("volume.info", name=export)[0]
        finally:
            ws.stop(srv)
        if st["design"] != QCOW2:
            self._fork_next(st, level)
        r = {**f.brief(), "depth": level, "base_iops": round(base.iops_median, 1),
             "vs_base": round(statistics.median(ratios), 3) if ratios else None,
             "vs_base_rounds": [round(x, 3) for x in ratios]}
        if info:
            r["extents_per_gib"] = info["extents_per_gib"]
            r["metadata_pages"] = info["metadata_pages"]
        return r

    # 3 and 5 -----------------------------------------------------------------------------

    def locality(self) -> None:
        p = self.p
        loc: dict[str, dict[str, Any]] = {d: {} for d in self.designs}
        meta: dict[str, dict[str, Any]] = {d: {} for d in self.designs}
        self.results["locality"] = loc
        self.results["metadata"] = meta
        log(f"== 3. sequential 1M reads of a fork after random 4k rewrites of "
            f"{p.fractions}% ({human(p.region)} volume, {p.seconds}s reads); "
            "5. metadata and reclamation")
        servers: dict[str, Server] = {}
        state: dict[str, dict[str, Any]] = {}
        for design in self.designs:
            r = self.point(f"{design} setup", lambda d=design: self._locality_setup(d))
            if "error" in r:
                loc[design]["0"] = meta[design] = r
                continue
            servers[design] = r.pop("server")
            state[design] = r
            meta[design].update(r["meta"])
        for k, pct in enumerate(p.fractions):
            for design in rotate(list(servers), k):
                loc[design][str(pct)] = r = self.point(
                    f"{design} {pct}%",
                    lambda d=design, pct=pct: self._locality_step(servers[d], state[d], pct))
                if "mibps" in r:
                    log(f"  {design:7} {r['rewritten_pct']:5.1f}% rewritten: {r['mibps']:8,.1f}"
                        f" MiB/s  {r['extents_per_gib']:10,.0f} extents/GiB  (server "
                        f"{r['server_cpu_us_per_io'] or 0:,.0f} us CPU per 1 MiB read)")
        for design in servers:
            with contextlib.suppress(StudyError):
                state[design]["meta_rewritten"] = servers[design].control(
                    "pool.info")[0]["metadata_used_bytes"]
        # then `volume defrag` (live, through the control socket) and the same read again
        for design in rotate(list(servers), len(p.fractions)):
            loc[design]["defrag"] = r = self.point(
                f"{design} defrag", lambda d=design: self._defrag_step(servers[d]))
            if "mibps" in r:
                log(f"  {design:7} after defrag ({r['defrag_s']:.1f}s): {r['mibps']:8,.1f} "
                    f"MiB/s  {r['extents_per_gib']:10,.0f} extents/GiB")
        for design, srv in servers.items():
            meta[design].update(self.point(
                f"{design} metadata", lambda d=design, s=srv: self._reclaim(d, s, state[d])))
            m = meta[design]
            if "freed_bytes" in m:
                log(f"  {design:7} metadata {human(m['meta_per_gib_seq'])}/GiB sequential, "
                    f"{human(m['meta_per_gib_random'])}/GiB random; delete freed "
                    f"{human(m['freed_bytes'])} of {human(m['fork_exclusive_bytes'])} exclusive")

    def _locality_setup(self, design: str) -> dict[str, Any]:
        p, ws = self.p, self.ws
        pool = ws.create_pool(f"loc-{design}", design, p.pool_size)
        ws.create_volume(pool, "base", p.region)
        srv = ws.serve(f"loc-{design}", pool, [("base", None)])
        try:
            m0 = srv.control("pool.info")[0]["metadata_used_bytes"]
            prefill(srv, "base", p.region)
            m1 = srv.control("pool.info")[0]["metadata_used_bytes"]
            srv.control("volume.fork", source="base", name="fork")
            m2 = srv.control("pool.info")[0]["metadata_used_bytes"]
            base = srv.control("volume.info", name="base")[0]
        finally:
            ws.stop(srv)
        srv = ws.serve(f"loc-{design}", pool, [("fork", None)])
        return {"server": srv, "pool": pool, "written": 0, "meta_fork": m2, "step": 0,
                "meta": {"meta_seq_bytes": m1 - m0, "seq_written": p.region,
                         "meta_per_gib_seq": (m1 - m0) / (p.region / GiB),
                         "fork_meta_bytes": m2 - m1,
                         "base_extents_per_gib": base["extents_per_gib"]}}

    def _locality_step(self, srv: Server, st: dict[str, Any], pct: int) -> dict[str, Any]:
        p = self.p
        chunks = p.region // CHUNK
        info = srv.control("volume.info", name="fork")[0]
        have = info["exclusive_bytes"] / p.region
        want = pct / 100
        if want > have:
            # uniform random writes, distinct within one fio run: n of them raise the
            # rewritten share from `have` to about have + n/chunks * (1 - have)
            n = max(1, round((want - have) * chunks / (1 - have)))
            st["step"] += 1
            fio(srv, "fork", "randwrite", "4k", 16, p.region, number_ios=n,
                seed=7000 + st["step"])
            st["written"] += n * CHUNK
            info = srv.control("volume.info", name="fork")[0]
        f = fio(srv, "fork", "read", "1m", 4, p.region, seconds=p.seconds)
        return {**f.brief(), "target_pct": pct,
                "rewritten_pct": round(100 * info["exclusive_bytes"] / p.region, 2),
                "extents": info["extents"], "extents_per_gib": info["extents_per_gib"],
                "mean_extent_bytes": info["mean_extent_bytes"]}

    def _defrag_step(self, srv: Server) -> dict[str, Any]:
        _, dt = srv.control("volume.defrag", name="fork")
        info = srv.control("volume.info", name="fork")[0]
        f = fio(srv, "fork", "read", "1m", 4, self.p.region, seconds=self.p.seconds)
        return {**f.brief(), "defrag_s": round(dt, 2),
                "rewritten_pct": round(100 * info["exclusive_bytes"] / self.p.region, 2),
                "extents": info["extents"], "extents_per_gib": info["extents_per_gib"],
                "mean_extent_bytes": info["mean_extent_bytes"]}

    def _reclaim(self, design: str, srv: Server, st: dict[str, Any]) -> dict[str, Any]:
        m3 = st.get("meta_rewritten") or srv.control("pool.info")[0]["metadata_used_bytes"]
        self.ws.stop(srv)
        pool = str(st["pool"])
        fork = nbdserver_cli("volume", "info", pool, "fork")
        before = nbdserver_cli("pool", "info", pool)
        deleted = nbdserver_cli("volume", "delete", pool, "fork")
        after = nbdserver_cli("pool", "info", pool)
        check = nbdserver_cli("pool", "check", pool, what="nbdserver pool check")
        self.ws.remove(st["pool"])
        written = st["written"]
        return {"meta_random_bytes": m3 - st["meta_fork"], "random_written": written,
                "meta_per_gib_random": (m3 - st["meta_fork"]) / (written / GiB) if written
                else 0.0,
                "fork_exclusive_bytes": fork["exclusive_bytes"],
                "fork_metadata_pages": fork["metadata_pages"],
                "freed_bytes": after["free_bytes"] - before["free_bytes"],
                "delete_reported_bytes": deleted.get("freed_bytes"),
                "meta_freed_bytes": before["metadata_used_bytes"] - after["metadata_used_bytes"],
                "check_ok": check.get("ok"), "check_problems": check.get("problems", [])[:5],
                "leaked_chunks": check.get("leaked_chunks"),
                "leaked_pages": check.get("leaked_pages")}

    # 4 -----------------------------------------------------------------------------------

    def creation(self) -> None:
        p, ws = self.p, self.ws
        out: dict[str, dict[str, Any]] = {d: {} for d in self.designs}
        self.results["creation"] = out
        log(f"== 4. snapshot and fork creation time vs volume size "
            f"({', '.join(human(s) for s in p.sizes)}; {human(p.spread_data)} written over "
            f"each, {p.creation_repeats} of each)")
        servers: dict[str, Server] = {}
        fits: dict[str, list[int]] = {}
        for design in self.designs:
            sizes = [s for s in p.sizes if design != "linear" or s <= p.linear_max_size]
            fits[design] = sizes
            for s in p.sizes:
                if s not in sizes:
                    out[design][str(s)] = {"skipped": (
                        f"thick linear origin of {human(s)} left out (creation allocates "
                        f"every chunk; the largest tried is {human(p.linear_max_size)})")}
            r = self.point(f"{design} setup",
                           lambda d=design, sz=sizes: self._creation_setup(d, sz))
            if "error" in r:
                for s in sizes:
                    out[design][str(s)] = r
                continue
            servers[design] = r.pop("server")
            for s in sizes:
                out[design][str(s)] = {"create_cli_s": r["create_s"].get(s),
                                       "server_start_s": r["start_s"]}
        for k, size in enumerate(p.sizes):
            for design in rotate(list(servers), k):
                if size not in fits[design] or "error" in out[design][str(size)]:
                    continue
                r = self.point(f"{design} {human(size)}",
                               lambda d=design, sz=size: self._creation_point(servers[d], sz))
                if "error" in r:
                    out[design][str(size)] = r
                    continue
                out[design][str(size)].update(r)
                log(f"  {design:7} {human(size):>8}: snapshot {r['snapshot_server_ms']:7.1f} ms"
                    f" by the control socket ({r['snapshot_info_ms']:.1f} ms for volume info "
                    f"alone), {r['snapshot_cli_ms']:7.1f} ms CLI; fork "
                    f"{r['fork_server_ms']:7.1f} / {r['fork_cli_ms']:7.1f} ms")
        for design, srv in servers.items():
            ws.stop(srv)
            assert srv.pool is not None
            sizes = [s for s in fits[design] if "error" not in out[design][str(s)]]
            r = self.point(f"{design} clones in the pool",
                           lambda pool=srv.pool, sz=sizes: self._clone_inprocess(pool, sz))
            for s in sizes:
                out[design][str(s)].update(r.get(s, r if "error" in r else {}))
                if s in r:
                    log(f"  {design:7} {human(s):>8}: clone alone (Pool.clone_volume with its "
                        f"commit): snapshot {r[s]['snapshot_pool_ms']:.1f} ms, fork "
                        f"{r[s]['fork_pool_ms']:.1f} ms")
            ws.remove(srv.pool)

    def _clone_inprocess(self, pool_path: Path, sizes: list[int]) -> dict[Any, Any]:
        """Open the pool in this process and time Pool.clone_volume alone (with its commit):
        the server's control operation also goes through the socket and writes its answer."""
        async def go(pool: Any) -> dict[int, dict[str, Any]]:
            samples: dict[int, dict[str, list[float]]] = {
                s: {"snapshot": [], "fork": []} for s in sizes}
            for i in range(self.p.creation_repeats):
                for s in sizes:
                    for kind in ("snapshot", "fork"):
                        vol = f"v{size_arg(s)}"
                        t0 = time.perf_counter()
                        await pool.clone_volume(vol, f"{vol}-{kind}-p{i}",
                                                snapshot=kind == "snapshot")
                        samples[s][kind].append(time.perf_counter() - t0)
            return {s: {f"{k}_pool_ms": round(1000 * statistics.median(v), 3)
                        for k, v in d.items()}
                    | {"pool_samples_ms": {k: [round(1000 * x, 3) for x in v]
                                           for k, v in d.items()}}
                    for s, d in samples.items()}

        return in_pool(pool_path, go)

    def _creation_setup(self, design: str, sizes: list[int]) -> dict[str, Any]:
        p, ws = self.p, self.ws
        if design == "linear":  # thick origins, plus room for the copies of the spread data
            pool_size = sum(sizes) + 8 * GiB
        else:
            pool_size = max(sizes) + max(sizes) // 16 + 8 * GiB
        pool_size = -(-pool_size // GiB) * GiB
        pool = ws.create_pool(f"create-{design}", design, pool_size, sparse=True)
        create_s: dict[int, float] = {}
        if design == "linear":  # thick: offline (see create_volume)
            for s in sizes:
                create_s[s] = ws.create_volume(pool, f"v{size_arg(s)}", s)
                log(f"  {design:7} created a thick {human(s)} volume in {create_s[s]:.1f}s "
                    "(CLI, offline)")
            exports: list[tuple[str, dict[str, Any] | None]] = [
                (f"v{size_arg(s)}", None) for s in sizes]
        else:  # thin volumes, created by the server as it starts: the big pool opens once
            exports = [(f"v{size_arg(s)}", {"size": s}) for s in sizes]
        t0 = time.perf_counter()
        srv = ws.serve(f"create-{design}", pool, exports)
        start_s = time.perf_counter() - t0
        log(f"  {design:7} server with a {human(pool_size)} pool listening after "
            f"{start_s:.1f}s")
        for s in sizes:
            n = max(1, p.spread_data // (64 * KiB))
            fio(srv, f"v{size_arg(s)}", "randwrite", "64k", 16, s, number_ios=n,
                norandommap=True, seed=4242)
        return {"server": srv, "create_s": create_s, "start_s": start_s}

    def _creation_point(self, srv: Server, size: int) -> dict[str, Any]:
        assert srv.pool is not None
        vol = f"v{size_arg(size)}"
        res: dict[str, list[float]] = {f"{k}_{w}": [] for k in ("snapshot", "fork")
                                       for w in ("cli", "server", "info")}
        for i in range(self.p.creation_repeats):
            for kind in ("snapshot", "fork"):
                _, dt = timed_cli("volume", kind, str(srv.pool), vol, f"{vol}-{kind}-c{i}")
                res[f"{kind}_cli"].append(dt)
                _, dt = srv.control(f"volume.{kind}", source=vol, name=f"{vol}-{kind}-s{i}")
                res[f"{kind}_server"].append(dt)
                # `volume info` of the new volume (a walk of its map), timed apart: the
                # clone's own answer leaves the map statistics out
                _, di = srv.control("volume.info", name=f"{vol}-{kind}-s{i}")
                res[f"{kind}_info"].append(di)
        return {f"{k}_ms": round(1000 * statistics.median(v), 2) for k, v in res.items()} | {
            "samples_ms": {k: [round(1000 * x, 2) for x in v] for k, v in res.items()}}

    # 6 -----------------------------------------------------------------------------------

    def vm_boot(self) -> None:
        demo = REPO / "scripts" / "vm-demo"
        out: dict[str, Any] = {}
        self.results["vm"] = out
        rounds = self.args.vm_rounds or (QUICK_VM_ROUNDS if self.args.quick else VM_ROUNDS)
        # --quick only checks that vm-demo runs: one design, no reference boot
        designs = self.designs[:1] if self.args.quick else self.designs
        log(f"== 6. VM boot from forks (scripts/vm-demo, {', '.join(designs)}, "
            f"{rounds} round(s))")
        if not demo.exists():
            out["skipped"] = "scripts/vm-demo is not there yet"
            log(f"  skipped: {out['skipped']}")
            return
        workdir = self.ws.path("vm")
        workdir.mkdir(exist_ok=True)
        argv = [sys.executable, str(demo), "--designs", ",".join(designs),
                "--chunk-size", "4K", "--rounds", str(rounds), "--workdir", str(workdir)]
        if self.args.quick:
            argv.append("--no-baseline")
        try:
            res = run(argv, "scripts/vm-demo", timeout=3600)
        except StudyError as e:
            out["error"] = str(e)
            log(f"  ERROR: {e}")
            return
        boots = []
        for line in res.stdout.splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and "boot_seconds" in doc:
                    boots.append(doc)
        out["boots"] = boots
        for d in ["file", *self.designs]:
            mine = [b for b in boots if b.get("design") == d]
            if not mine:
                continue
            secs = [float(b["boot_seconds"]) for b in mine if b.get("boot_seconds")]
            out[d] = {"boot_s": statistics.median(secs) if secs else None,
                      "boot_s_min": min(secs, default=None),
                      "boot_s_max": max(secs, default=None), "boots": len(mine),
                      "ok": all(b.get("ok") for b in mine),
                      "vms": sorted({f"{b.get('vm')}<-{b.get('parent')}" for b in mine})}
            if secs:
                log(f"  {d:7}: median {out[d]['boot_s']:.1f}s over {len(secs)} boot(s), "
                    f"all ok: {out[d]['ok']}")


# -- judging ---------------------------------------------------------------------------


def series(res: dict[str, Any], key: str) -> list[tuple[int, float]]:
    return sorted((int(x), float(r[key])) for x, r in res.items()
                  if isinstance(r, dict) and key in r)


def flatness(points: list[tuple[int, float]]) -> dict[str, Any] | None:
    """The largest deviation from the series' median, and last / first."""
    vals = [v for _, v in points]
    if len(vals) < 2:
        return None
    med = statistics.median(vals)
    dev = max(abs(v - med) / med for v in vals) if med else math.inf
    return {"max_dev": dev, "last_over_first": vals[-1] / vals[0] if vals[0] else None,
            "points": len(vals), "flat": dev <= FLAT_TOLERANCE}


def judge(results: dict[str, Any], designs: list[str]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    for design in designs:
        if design == "linear":
            continue
        for exp, key, what in (("snapshots", "iops", "origin write IOPS vs snapshot count"),
                               ("snapshots", "server_cpu_us_per_io",
                                "server CPU per origin write vs snapshot count"),
                               ("depth", "iops", "read IOPS vs fork depth"),
                               ("depth", "server_cpu_us_per_io",
                                "server CPU per read vs fork depth"),
                               ("depth", "vs_base", "read IOPS vs fork depth, relative to "
                                                    "the base read alongside"),
                               ("depth", "lat_p99_us", "read p99 latency vs fork depth")):
            s = series(results.get(exp, {}).get(design, {}), key)
            fl = flatness(s)
            if fl is None:
                continue
            if not (exp == "snapshots" and key != "iops"):  # CPU: N >= 1 only, below
                targets.append({"target": f"{design}: {what} flat within 10%",
                                "met": fl["flat"],
                                "detail": f"largest deviation from the median "
                                          f"{fl['max_dev']:.0%} over {fl['points']} points; "
                                          f"last/first {fl['last_over_first']:.2f}"})
            if key in ("iops", "vs_base") and s[0][0] == 0 and s[-1][0] > 0 and s[0][1]:
                # the issue's own targets: the most snapshots (the deepest fork) against none
                ratio = s[-1][1] / s[0][1]
                label = (f"4 KiB writes with {s[-1][0]} snapshots >= 0.9x none"
                         if exp == "snapshots" else
                         f"4 KiB reads at fork depth {s[-1][0]} >= 0.9x depth 0"
                         + (" (paired with the base read)" if key == "vs_base" else ""))
                targets.append({"target": f"{design}: {label}", "met": ratio >= 0.9,
                                "detail": f"{s[-1][1]:,.2f} / {s[0][1]:,.2f} = {ratio:.2f}x"})
            if exp == "snapshots":
                s1 = [pt for pt in s if pt[0] >= 1]
                fl1 = flatness(s1)
                if fl1 is not None:
                    targets.append({
                        "target": f"{design}: {what} flat within 10% (N >= 1 only)",
                        "met": fl1["flat"],
                        "detail": f"largest deviation {fl1['max_dev']:.0%} over "
                                  f"{fl1['points']} points; N={s1[-1][0]} / N=1 "
                                  f"{fl1['last_over_first']:.2f}"})
    loc = results.get("locality", {}).get("extent", {})
    if "0" in loc and "10" in loc and "mibps" in loc["0"] and "mibps" in loc["10"]:
        ratio = loc["10"]["mibps"] / loc["0"]["mibps"]
        targets.append({"target": "extent: sequential read after 10% random rewrites >= 0.8x "
                                  "pristine", "met": ratio >= 0.8,
                        "detail": f"{loc['10']['mibps']:.0f} / {loc['0']['mibps']:.0f} MiB/s "
                                  f"= {ratio:.2f}x"})
    for design in designs:
        if design == "linear":
            continue
        cr = results.get("creation", {}).get(design, {})
        # the best of the repeats: a noisy neighbour only ever adds time
        for samples, where in (("pool_samples_ms", "the clone in the pool (with its commit)"),
                               ("samples_ms", "the control-socket operation")):
            pts = []
            for sz, r in cr.items():
                if isinstance(r, dict) and samples in r:
                    d = r[samples]
                    snap = d.get("snapshot_server", d.get("snapshot"))
                    fork = d.get("fork_server", d.get("fork"))
                    if snap and fork:
                        pts.append((int(sz), min(snap), min(fork)))
            if len(pts) < 2:
                continue
            pts.sort()
            small, big = pts[0], pts[-1]
            worst = max(big[1] / max(small[1], 0.01), big[2] / max(small[2], 0.01))
            targets.append({"target": f"{design}: snapshot/fork of a {human(big[0])} volume "
                                      f"costs the same as of {human(small[0])} (within 2x): "
                                      f"{where}",
                            "met": worst <= 2.0,
                            "detail": f"best of the repeats: snapshot {small[1]:.1f} -> "
                                      f"{big[1]:.1f} ms, fork {small[2]:.1f} -> {big[2]:.1f} ms"})
    for design in designs:
        m = results.get("metadata", {}).get(design, {})
        if "freed_bytes" in m:
            ok = m["freed_bytes"] == m["fork_exclusive_bytes"] and m.get("check_ok") is True
            targets.append({"target": f"{design}: deleting the fork returns exactly its "
                                      "exclusive bytes, pool check clean",
                            "met": ok,
                            "detail": f"freed {m['freed_bytes']:,} B, exclusive "
                                      f"{m['fork_exclusive_bytes']:,} B, check "
                                      f"{'ok' if m.get('check_ok') else m.get('check_problems')}"})
    return targets


# -- the report --------------------------------------------------------------------------

DESIGN_COLORS = {"radix": "C0", "extent": "C2", "linear": "C3", QCOW2: "C7"}


def machine_caption(info: dict[str, Any]) -> str:
    return (f"{info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, pools on "
            f"{info['fs']}, nbdserver {info['nbdserver_rev']}, {info['date']}. Absolute "
            "numbers are noisy (a shared machine); the comparison between designs in the "
            "same run is the result.")


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cell(r: dict[str, Any] | None, fmt: Callable[[dict[str, Any]], str]) -> str:
    if not r:
        return "-"
    if "refused" in r:
        return "n/a (refused)"
    if "skipped" in r:
        return "n/a (does not fit)"
    if "error" in r:
        return "error"
    try:
        return fmt(r)
    except (KeyError, TypeError, ZeroDivisionError):
        return "-"


def notes_of(res: dict[str, dict[str, Any]]) -> list[str]:
    """One line per distinct refusal, error or skip in an experiment's results."""
    seen: dict[str, list[str]] = {}
    for design, points in res.items():
        for x, r in points.items():
            if not isinstance(r, dict):
                continue
            for kind in ("refused", "error", "skipped"):
                if kind in r:
                    seen.setdefault(f"{kind}: {r[kind]}", []).append(f"{design} {x}")
    return [f"- {design_points[0].split()[0]}: {msg}" for msg, design_points in seen.items()]


def plot_all(results: dict[str, Any], designs: list[str], info: dict[str, Any],
             figdir: Path) -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figdir.mkdir(parents=True, exist_ok=True)
    caption = machine_caption(info)
    made: dict[str, Path] = {}

    def finish(fig: Any, name: str) -> None:
        fig.text(0.01, 0.01, caption, fontsize=6.5, wrap=True, va="bottom", color="0.3")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        path = figdir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[name] = path

    def logscale(ax: Any) -> None:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v:,g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    def line(ax: Any, res: dict[str, Any], names: list[str], key: str) -> bool:
        drew = False
        for d in names:
            pts = series(res.get(d, {}), key)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=d, color=DESIGN_COLORS.get(d))
                drew = True
        return drew

    snap = results.get("snapshots")
    if snap:
        fig, (ax, a2) = plt.subplots(1, 2, figsize=(10, 4.4))
        if line(ax, snap, designs, "iops"):
            line(a2, snap, designs, "server_cpu_us_per_io")
            for a in (ax, a2):
                a.set_xscale("symlog", base=2, linthresh=1)
                a.set_xticks(sorted({int(x) for d in snap for x in snap[d]}))
                a.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
                a.set_xlabel("snapshots of the origin")
                a.grid(alpha=0.3)
            ax.set_ylabel("origin 4 KiB random write IOPS (QD16)")
            ax.set_ylim(bottom=0)
            ax.set_title("Origin writes vs snapshot count")
            a2.set_ylabel("server CPU us per write")
            logscale(a2)
            a2.set_title("Server CPU time per write")
            ax.legend()
            finish(fig, "snapshots")
        else:
            plt.close(fig)

    depth = results.get("depth")
    if depth:
        names = [d for d in [*designs, QCOW2] if d in depth]
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4.4))
        if line(a1, depth, names, "iops"):
            line(a2, depth, names, "lat_p99_us")
            line(a3, depth, names, "server_cpu_us_per_io")
            a3.set_title("Server CPU time per read")
            for ax, lab in ((a1, "4 KiB random read IOPS (QD16)"), (a2, "p99 latency (us)"),
                            (a3, "server CPU us per read")):
                ax.set_xscale("symlog", base=2, linthresh=1)
                ax.set_xticks(sorted({int(x) for d in depth for x in depth[d]}))
                ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.set_xlabel("fork depth of the volume read")
                ax.set_ylabel(lab)
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
            a1.legend()
            a1.set_title("Reads of the deepest fork")
            a2.set_title("p99 read latency")
            finish(fig, "depth")
        else:
            plt.close(fig)

    loc = results.get("locality")
    if loc:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4.4))
        drew = False
        for d in designs:
            pts = sorted((r["rewritten_pct"], r["mibps"], r["extents_per_gib"],
                          r.get("server_cpu_us_per_io") or 0)
                         for x, r in loc.get(d, {}).items()
                         if x.isdigit() and isinstance(r, dict) and "mibps" in r)
            if pts:
                xs, ys, es, cs = zip(*pts, strict=True)
                a1.plot(xs, ys, marker="o", label=d, color=DESIGN_COLORS.get(d))
                a2.plot(xs, [max(e, 1) for e in es], marker="o", label=d,
                        color=DESIGN_COLORS.get(d))
                a3.plot(xs, cs, marker="o", label=d, color=DESIGN_COLORS.get(d))
                drew = True
            r = loc.get(d, {}).get("defrag")
            if isinstance(r, dict) and "mibps" in r:  # a star: after `volume defrag`
                for ax, v in ((a1, r["mibps"]), (a2, max(r["extents_per_gib"], 1)),
                              (a3, r.get("server_cpu_us_per_io") or 0)):
                    ax.plot([r["rewritten_pct"]], [v], marker="*", ms=12, ls="none",
                            color=DESIGN_COLORS.get(d))
        if drew:
            a1.set_ylabel("sequential 1 MiB read MiB/s (QD4)")
            a1.set_ylim(bottom=0)
            a2.set_ylabel("extents per GiB")
            logscale(a2)
            a3.set_ylabel("server CPU us per 1 MiB read")
            a3.set_ylim(bottom=0)
            a3.set_title("Server CPU time per 1 MiB read")
            for ax in (a1, a2, a3):
                ax.set_xlabel("% of the fork rewritten by random 4 KiB writes")
                ax.grid(alpha=0.3)
            a1.legend()
            a1.set_title("Sequential read after random rewrites (*: defragmented)")
            a2.set_title("Fragmentation")
            finish(fig, "locality")
        else:
            plt.close(fig)

    cr = results.get("creation")
    if cr:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
        drew = False
        for d in designs:
            pts = sorted((int(s), r) for s, r in cr.get(d, {}).items()
                         if isinstance(r, dict) and "snapshot_server_ms" in r)
            if not pts:
                continue
            xs = [s / GiB for s, _ in pts]
            for ax, where in zip(axes, ("pool", "server", "cli"), strict=True):
                if all(f"snapshot_{where}_ms" in r for _, r in pts):
                    ax.plot(xs, [r[f"snapshot_{where}_ms"] for _, r in pts], marker="o",
                            color=DESIGN_COLORS.get(d), label=f"{d} snapshot")
                    ax.plot(xs, [r[f"fork_{where}_ms"] for _, r in pts], marker="s", ls="--",
                            color=DESIGN_COLORS.get(d), label=f"{d} fork")
            drew = True
        if drew:
            sizes = sorted({int(s) for d in cr for s in cr[d]})
            for ax, title in zip(axes, ("Clone alone (in the pool)", "Control-socket operation",
                                        "CLI round trip"), strict=True):
                ax.set_xscale("log", base=2)
                ax.set_xticks([s / GiB for s in sizes], [human(s) for s in sizes])
                ax.minorticks_off()
                ax.set_xlabel("volume size")
                ax.set_ylabel("ms")
                ax.set_title(title)
                ax.grid(alpha=0.3)
            for ax in axes[:2]:
                logscale(ax)
            axes[2].set_ylim(bottom=0)
            axes[1].legend(fontsize=7)
            finish(fig, "creation")
        else:
            plt.close(fig)
    return made


def readme_sentences(results: dict[str, Any], designs: list[str],
                     targets: list[dict[str, Any]]) -> list[str]:
    """Two sentences on which design to pick, built from this run's numbers."""
    def seq(d: str, x: str) -> float | None:
        r = results.get("locality", {}).get(d, {}).get(x)
        return float(r["mibps"]) if isinstance(r, dict) and "mibps" in r else None

    def first_writes(d: str) -> float | None:
        pts = [v for n, v in series(results.get("snapshots", {}).get(d, {}), "iops") if n >= 1]
        return statistics.median(pts) if pts else None

    fracs = sorted({int(x) for d in results.get("locality", {})
                    for x in results["locality"][d] if x.isdigit()})
    mid = "10" if 10 in fracs else str(fracs[-1]) if fracs else "0"
    parts = []
    pair = [d for d in ("extent", "radix") if d in designs]
    if len(pair) == 2 and all(seq(d, mid) for d in pair) and all(first_writes(d)
                                                                 for d in pair):
        by_seq = max(pair, key=lambda d: seq(d, mid) or 0)
        by_write = max(pair, key=lambda d: first_writes(d) or 0)
        o_seq = pair[1] if by_seq == pair[0] else pair[0]
        o_write = pair[1] if by_write == pair[0] else pair[0]
        seq_txt = (f"{seq(by_seq, mid):,.0f} MiB/s sequential after {mid}% random rewrites "
                   f"against {seq(o_seq, mid):,.0f} for {o_seq}")
        write_txt = (f"{first_writes(by_write):,.0f} IOPS of first writes after a snapshot "
                     f"against {first_writes(o_write):,.0f} for {o_write}")
        cheap = [t for t in targets if "costs the same" in t["target"]]
        forks = (" Both fork in constant time whatever the volume size." if cheap and all(
            t["met"] for t in cheap) else "")
        if by_seq != by_write:
            parts.append(f"Pick **{by_seq}** for golden images and long-lived disks that are "
                         f"read sequentially ({seq_txt}), and **{by_write}** for many "
                         f"short-lived forks written at random ({write_txt}).{forks}")
        else:
            parts.append(f"Pick **{by_seq}** for forkable VM disks: it keeps sequential reads "
                         f"faster ({seq_txt}) and takes writes after a fork faster "
                         f"({write_txt}).{forks}")
    snaps = results.get("snapshots", {}).get("linear", {})
    pts = series(snaps, "iops")
    if len(pts) >= 2:
        (n0, v0), (n1, v1) = pts[0], pts[-1]
        parts.append(f"Use **linear** only for a few short-lived snapshots of a thick volume "
                     f"(LVM style): origin writes went from {v0:,.0f} IOPS with {n0} snapshots "
                     f"to {v1:,.0f} with {n1}, and it cannot fork a fork.")
    return parts


def render(results: dict[str, Any], designs: list[str], info: dict[str, Any], p: Params,
           args: argparse.Namespace, figs: dict[str, Path], out: Path,
           targets: list[dict[str, Any]]) -> str:
    rel = {k: os.path.relpath(v, out.parent) for k, v in figs.items()}
    caption = machine_caption(info)
    chains = [*designs, *([] if args.no_qcow2 else [QCOW2])]
    cmd = info.get("command") or ("make study" if not args.quick else "scripts/study.py --quick")
    L: list[str] = [
        "# Block-map study: radix, extent, linear (and qcow2)",
        "",
        f"Generated by `scripts/study.py` (`{cmd}`) in one run of "
        f"{info['elapsed_min']:.0f} minutes; designs interleaved point by point. Do not edit "
        "by hand: re-run the script.",
        "",
        f"**Machine:** {caption}",
        "",
        "## Targets",
        "",
    ]
    if targets:
        L.append(md_table(["target", "met", "measured"],
                          [[t["target"], "yes" if t["met"] else "**no**", t["detail"]]
                           for t in targets]))
    else:
        L.append("(no target could be evaluated in this run)")
    sentences = readme_sentences(results, designs, targets)
    if sentences:
        L += ["", "## For the README", "", " ".join(sentences)]
    L += [
        "",
        "## Method",
        "",
        f"Each pool is a {info.get('pools', 'sparse')} file on {info['fs']} (O_DIRECT, "
        "Linux AIO, 4 KiB chunks, "
        "the default 64 MiB metadata cache); every server and fio talk over Unix sockets "
        f"(fio {info['fio']}, its nbd engine). Volumes of experiments 1-3 are "
        f"{human(p.region)}, written in full with 1 MiB sequential writes before anything "
        f"else; timed fio runs last {p.seconds} s (experiment 1's: one pass over the "
        "volume, at most that). IOPS and MiB/s are the median of the "
        "per-second figures of the run (fio's IOPS log), latencies fio's completion "
        "latency; *CPU* is the server process's user + system time per I/O. "
        + (f"Experiment 1 ran {info.get('rounds', 1)} rounds (the median is shown); other "
           "points are measured once, " if info.get("rounds", 1) > 1 else
           "Each point is measured once (no repetition), ")
        + "so read the curves for trends; the designs of a "
        "point run back to back, in an order that rotates from point to point. Snapshots "
        "and forks are made "
        "through the control socket of the server that has the pool open, or with the CLI "
        "when no server runs. `flat within 10%` means no point of the series deviates by "
        "more than 10% from the series' median.",
        "",
    ]

    # 1
    snap = results.get("snapshots")
    if snap:
        counts = p.snapshot_counts
        L += ["## 1. Origin random writes vs number of snapshots", "",
              f"A fresh pool and {human(p.region)} volume per point, prefilled, N snapshots "
              f"taken, then fio `randwrite` 4 KiB QD16 over the whole volume, one pass: "
              f"each chunk once (or {p.seconds} s, if that takes longer). fio's random map "
              "sends each write to a chunk not yet written in the run, so every write is "
              "the first write to its chunk since the snapshots (with none, an overwrite "
              "in place): linear copies the old chunk into each of the N exception stores "
              "(and commits) before writing in place, radix and extent redirect it to a new "
              "chunk. *First writes* is the pool's new data chunks (divided by N for linear), "
              "*on copied* the writes that hit a chunk already copied in the run.", ""]
        head = ["snapshots"] + [f"{d} IOPS (p99 ms)" for d in designs]
        rows = [[str(n)] + [cell(snap[d].get(str(n)),
                                 lambda r: f"{r['iops']:,.0f} ({r['lat_p99_us'] / 1000:.1f})")
                            for d in designs] for n in counts]
        L += [md_table(head, rows), ""]
        head = ["snapshots"] + [f"{d} writes: first / on copied (CPU us/IO)" for d in designs]
        rows = [[str(n)] + [cell(snap[d].get(str(n)),
                                 lambda r: f"{r['first_writes']:,} / {r['hits_on_copied']:,} "
                                           f"({r['server_cpu_us_per_io']:.0f})")
                            for d in designs] for n in counts]
        L += [md_table(head, rows), ""]
        L += notes_of(snap)
        if "snapshots" in rel:
            L += ["", f"![origin writes vs snapshots]({rel['snapshots']})", "",
                  f"*Figure 1. Origin 4 KiB random write IOPS against the snapshot count. "
                  f"{caption}*", ""]

    # 2
    depth = results.get("depth")
    if depth:
        L += ["## 2. Random reads vs fork depth", "",
              f"A chain of forks of a prefilled {human(p.region)} volume: each fork rewrites "
              f"{p.rewrite_chunks} random 4 KiB chunks, then is forked again. At each depth "
              "the deepest fork is read with fio `randread` 4 KiB QD16 over the whole volume, "
              f"{p.seconds} s in all, in slices of about 2 s that alternate with slices "
              "reading the chain's base (depth 0) from the same server, so that each pair "
              "sees the same machine. The anchor is the same chain of qcow2 files "
              "(`qemu-img create -f qcow2 -b parent.qcow2 -F qcow2`, each child rewriting "
              f"{p.rewrite_chunks} random chunks through qemu-nbd), read through `qemu-nbd "
              "-f qcow2 --cache=none --aio=native` (its base by a second, read-only "
              "qemu-nbd).", ""]
        head = ["depth"] + [f"{d} IOPS (mean / p99 us)" for d in chains]
        rows = [[str(x)] + [cell(depth.get(d, {}).get(str(x)),
                                 lambda r: f"{r['iops']:,.0f} ({r['lat_mean_us']:,.0f} / "
                                           f"{r['lat_p99_us']:,.0f})")
                            for d in chains] for x in p.depths]
        L += [md_table(head, rows), "",
              "The deepest fork's reads relative to the base's, the median of the ratios "
              "of the alternating slices (this cancels most of the machine's drift), and the "
              "server's CPU time per read:", ""]
        head = ["depth"] + [f"{d} vs base (CPU us/IO)" for d in chains]
        rows = [[str(x)] + [cell(depth.get(d, {}).get(str(x)),
                                 lambda r: f"{r['vs_base']:.2f} "
                                           f"({r['server_cpu_us_per_io']:.0f})")
                            for d in chains] for x in p.depths]
        L += [md_table(head, rows), ""]
        L += notes_of(depth)
        if "depth" in rel:
            L += ["", f"![reads vs fork depth]({rel['depth']})", "",
                  f"*Figure 2. 4 KiB random reads of the deepest fork against fork depth, "
                  f"qcow2 backing chain as the anchor. {caption}*", ""]

    # 3
    loc = results.get("locality")
    if loc:
        L += ["## 3. Locality: sequential reads after random rewrites", "",
              f"A fork of a sequentially written {human(p.region)} volume is rewritten with "
              "uniform random 4 KiB writes until the given share of its chunks is its own "
              "(*rewritten*, measured from the fork's exclusive bytes); after each step it is "
              f"read with fio `read` 1 MiB QD4 for {p.seconds} s. Extents per GiB come from "
              "`volume info` (maximal runs of logically and physically contiguous chunks; "
              "the pristine fork shares the base's layout). Last, the fork is defragmented "
              "live (`volume defrag` through the control socket: it makes runs of the "
              "volume's own chunks contiguous and leaves shared chunks where they are) and "
              "read once more.", ""]
        head = ["target"] + [f"{d} MiB/s (rewritten %, extents/GiB, CPU us/MiB)"
                             for d in designs]
        def fmt(r: dict[str, Any]) -> str:
            return (f"{r['mibps']:,.0f} ({r['rewritten_pct']:.1f}%, "
                    f"{r['extents_per_gib']:,.0f}, {r['server_cpu_us_per_io']:.0f})")

        rows = [[f"{pct}%"] + [cell(loc[d].get(str(pct)), fmt) for d in designs]
                for pct in p.fractions]
        if any("defrag" in loc[d] for d in designs):
            rows.append([f"{p.fractions[-1]}%, then `volume defrag`"]
                        + [cell(loc[d].get("defrag"), fmt) for d in designs])
            rows.append(["defrag time, s"] + [cell(loc[d].get("defrag"),
                                                   lambda r: f"{r['defrag_s']:.1f}")
                                              for d in designs])
        L += [md_table(head, rows), ""]
        L += notes_of(loc)
        if "locality" in rel:
            L += ["", f"![locality]({rel['locality']})", "",
                  f"*Figure 3. Sequential 1 MiB reads and extents per GiB of a fork against "
                  f"the share of it rewritten at random. {caption}*", ""]

    # 4
    cr = results.get("creation")
    if cr:
        L += ["## 4. Snapshot and fork creation time vs volume size", "",
              "One pool per design holds a thin volume of each size (linear: thick origins, "
              f"created offline), with {human(p.spread_data)} written over each in random "
              "64 KiB writes. With the server running, snapshot and fork are each made "
              f"{p.creation_repeats} time(s) per size with the CLI (`nbdserver volume "
              "snapshot|fork`: the round trip, Python start-up included) and as many times "
              "by a direct call on the server's control socket (what a client of a running "
              "server waits for), which answers with the new volume's catalog fields; "
              "`volume info`, which walks its map, is timed apart. Then the server is "
              "stopped and the pool opened in the study's own process to time "
              "`Pool.clone_volume` alone, the clone and its commit: the cost of the design "
              "itself. Medians in ms.", "",
              "Clone alone (in the pool, with its commit), snapshot / fork:", ""]
        rows = [[human(s)] + [cell(cr.get(d, {}).get(str(s)),
                                   lambda r: f"{r['snapshot_pool_ms']:.2f} / "
                                             f"{r['fork_pool_ms']:.2f}")
                              for d in designs] for s in p.sizes]
        L += [md_table(["size", *designs], rows), "",
              "Control-socket operation, snapshot / fork (and `volume info` of the new "
              "volume alone):", ""]
        rows = [[human(s)] + [cell(cr.get(d, {}).get(str(s)),
                                   lambda r: f"{r['snapshot_server_ms']:,.1f} / "
                                             f"{r['fork_server_ms']:,.1f} "
                                             f"({r['snapshot_info_ms']:,.1f})")
                              for d in designs] for s in p.sizes]
        L += [md_table(["size", *designs], rows), "",
              "CLI round trip, snapshot / fork; and the seconds the server took to open "
              "the pool and listen, and (linear) to create the thick origin offline:", ""]
        rows = [[human(s)]
                + [cell(cr.get(d, {}).get(str(s)),
                        lambda r: f"{r['snapshot_cli_ms']:,.0f} / {r['fork_cli_ms']:,.0f}")
                   for d in designs]
                + [cell(cr.get(d, {}).get(str(s)), lambda r: f"{r['server_start_s']:.1f}")
                   for d in designs]
                + [cell(cr.get(d, {}).get(str(s)), lambda r: f"{r['create_cli_s']:.1f}")
                   for d in designs if d == "linear"] for s in p.sizes]
        head = ["size", *designs, *[f"{d} server start s" for d in designs],
                *[f"{d} create s" for d in designs if d == "linear"]]
        L += [md_table(head, rows), ""]
        L += notes_of(cr)
        if "creation" in rel:
            L += ["", f"![creation time]({rel['creation']})", "",
                  f"*Figure 4. Snapshot and fork creation time against volume size. "
                  f"{caption}*", ""]

    # 5
    meta = results.get("metadata")
    if meta:
        L += ["## 5. Metadata per GiB written, and space returned by deleting a fork", "",
              "From experiment 3's pools: `metadata_used_bytes` of `pool info` before and "
              f"after the sequential fill of the base ({human(p.region)}), and from the fork's "
              "creation to the end of its random rewrites, per GiB written. Then, with the "
              "server stopped, the fork is deleted: *freed* is the change of `free_bytes`, "
              "against the fork's `exclusive_bytes` just before; `pool check` afterwards.", ""]
        head = ["design", "metadata / GiB sequential", "metadata / GiB random 4k",
                "fork exclusive", "freed by delete", "metadata freed", "pool check"]
        rows = []
        for d in designs:
            m = meta.get(d, {})
            if "error" in m:
                rows.append([d, "error", "", "", "", "", ""])
                continue
            rows.append([d, human(m.get("meta_per_gib_seq", 0)),
                         human(m.get("meta_per_gib_random", 0)),
                         f"{m.get('fork_exclusive_bytes', 0):,} B",
                         f"{m.get('freed_bytes', 0):,} B",
                         human(m.get("meta_freed_bytes", 0)),
                         "ok" if m.get("check_ok") else f"**{m.get('check_problems')}**"])
        L += [md_table(head, rows), ""]

    # 6
    vm = results.get("vm")
    if vm is not None:
        L += ["## 6. VM boot from a fork", ""]
        if "skipped" in vm:
            L += [f"Not measured: {vm['skipped']}.", ""]
        else:
            L += ["Seconds from starting qemu to the end of the test VM's init, booted from "
                  "a fork of the golden image (`scripts/vm-demo`).", ""]
            def fmt(r: dict[str, Any]) -> str:
                return (f"{r['boot_s']:.1f} ({r['boot_s_min']:.1f}-{r['boot_s_max']:.1f}, "
                        f"{r['boots']} boots{'' if r['ok'] else ', CHECKS FAILED'})")

            L += [md_table(["design", "boot s: median (min-max)", "VMs (fork <- parent)"],
                           [[d if d != "file" else "plain file, no NBD (reference)",
                             cell(vm.get(d), fmt), ", ".join(vm.get(d, {}).get("vms", []))]
                            for d in ["file", *designs] if d in vm]), ""]
            if "error" in vm:
                L += [f"vm-demo failed: {vm['error']}", ""]
    L += ["## Raw data", "",
          "Every number above, with fio's runtimes, host busy and steal time per run, is in "
          "the JSON the script writes with `--json FILE`.", ""]
    return "\n".join(L)


# -- main --------------------------------------------------------------------------------


def default_out(quick: bool) -> Path:
    return REPO / "study-work" / "quick" / "study.md" if quick else REPO / "docs" / "study.md"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, but not None: such an option says its defaults (full and quick) in
    its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def count_list(least: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated whole numbers of at least `least`, sorted, once
    each."""
    one = argtypes.count(least)

    def parse(text: str) -> list[int]:
        values = sorted({one(x.strip()) for x in text.split(",") if x.strip()})
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, "
                                             f"got {text!r}")
        return values
    return parse


def report_file(text: str) -> Path:
    """--out (an argparse type): the report, absolute; its directory is made later
    (bench.make_dir, before the run)."""
    path = Path(text).resolve()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    return path


def load_run(path: Path) -> tuple[dict[str, Any], Params]:
    """The JSON of an earlier run (``--json FILE``) and its parameters, for --render;
    ValueError says why it is not one."""
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # not UTF-8, or not JSON
        raise ValueError(f"{path} is not JSON ({e})") from None
    keys = ("machine", "params", "designs", "results")
    if not isinstance(doc, dict) or not all(k in doc for k in keys):
        raise ValueError(f"{path} is not the JSON of a study run (--json FILE): it wants "
                         f"the keys {', '.join(keys)}")
    try:
        return doc, Params(**doc["params"])
    except TypeError:
        raise ValueError(f"{path}: its params are not those of this study.py") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from nbdserver.blockmap.base import designs as registered

    def points(values: list[int]) -> str:
        return ",".join(map(str, values))

    known = sorted(registered())
    p = argparse.ArgumentParser(
        description="Compare the block-map designs (and a qcow2 chain under qemu-nbd) with "
                    "numbers and plots; see the module docstring.",
        formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few points (a few minutes): checks that it works")
    p.add_argument("--seconds", type=argtypes.count(1),
                   help=f"seconds per timed fio run (default {FULL.seconds}, "
                        f"quick {QUICK.seconds})")
    p.add_argument("--designs", default=",".join(d for d in ("radix", "extent", "linear")
                                                 if d in known) or ",".join(known),
                   help=f"comma-separated block maps, from {', '.join(known)}")
    p.add_argument("--experiments",
                   help="which experiments to run (5 comes with 3); default 1,2,3,4,6, "
                        "with --quick 1,2,3,4 (scripts/vm-demo has its own test)")
    p.add_argument("--no-qcow2", action="store_true", help="leave the qcow2 anchor out")
    p.add_argument("--region", type=bench.parse_size,
                   help="volume size of experiments 1-3, a multiple of 1M, at least 16M "
                        f"(default {size_arg(FULL.region)}, quick {size_arg(QUICK.region)})")
    p.add_argument("--snapshot-counts", type=count_list(0),
                   help="experiment 1's points, e.g. 0,1,8,64 "
                        f"(default {points(FULL.snapshot_counts)}, "
                        f"quick {points(QUICK.snapshot_counts)})")
    p.add_argument("--depths", type=count_list(0),
                   help=f"experiment 2's points, e.g. 0,1,16 (default {points(FULL.depths)}, "
                        f"quick {points(QUICK.depths)})")
    p.add_argument("--rounds", type=argtypes.count(1), default=1,
                   help="repeat experiment 1 (fresh volumes each time, interleaved) and report "
                        "the median of the rounds")
    p.add_argument("--vm-rounds", type=argtypes.count(1),
                   help=f"rounds of scripts/vm-demo, at least 1 (default {VM_ROUNDS}, "
                        f"quick {QUICK_VM_ROUNDS})")
    p.add_argument("--out", type=report_file,
                   help="the Markdown report; PNGs go to a directory named after it "
                        "(default docs/study.md, with --quick study-work/quick/study.md)")
    p.add_argument("--json", type=bench.json_out, nargs="?", const="-", metavar="FILE",
                   help="also write every result as JSON to FILE (no FILE: stdout)")
    p.add_argument("--dir", type=argtypes.work_dir, default=REPO / "study-work",
                   help="where pools and images go (a real disk, not tmpfs); created if need "
                        "be")
    p.add_argument("--keep", action="store_true", help="keep the pools, images and logs")
    p.add_argument("--pools", choices=("full", "falloc", "sparse"), default="full",
                   help="pool files: full (the default) zero-filled, every block written "
                        "once as on a block device (`pool create --preallocate=full`); "
                        "falloc allocated but unwritten (`--preallocate`), so that each first "
                        "write also converts a filesystem extent; sparse (no --preallocate): "
                        "each first write also allocates a block")
    p.add_argument("--render", type=argtypes.in_file, metavar="JSON",
                   help="measure nothing: write the report (and plots) again from the JSON "
                        "of an earlier run (--json FILE)")
    args = p.parse_args(argv)
    args.design_list = [d.strip() for d in args.designs.split(",") if d.strip()]
    bad = [d for d in args.design_list if d not in known]
    if bad or not args.design_list:
        p.error(f"--designs: unknown {', '.join(bad) or '(none)'}; registered: "
                f"{', '.join(known)}")
    if args.experiments is None:
        args.experiments = "1,2,3,4" if args.quick else "1,2,3,4,6"
    try:
        args.exp = {int(x) for x in args.experiments.split(",") if x.strip()}
    except ValueError:
        p.error("argument --experiments: numbers from 1 to 6, e.g. 1,3")
    if not args.exp or not args.exp <= {1, 2, 3, 4, 5, 6}:
        p.error("argument --experiments: numbers from 1 to 6, e.g. 1,3")
    if 5 in args.exp:
        args.exp.add(3)
    args.out_given = args.out is not None
    if args.out is None:
        args.out = default_out(args.quick)
    params = replace(QUICK if args.quick else FULL)
    if args.seconds is not None:
        params.seconds = args.seconds
    if args.region is not None:
        params.region = args.region
    if args.snapshot_counts is not None:
        params.snapshot_counts = args.snapshot_counts
    if args.depths is not None:
        params.depths = args.depths
    args.params = params
    if args.render:  # read now: a file that is not a run's JSON is a usage error
        try:
            args.render_doc, args.params = load_run(args.render)
        except ValueError as e:
            p.error(f"argument --render: {e}")
    # last: no directory made for a refused command line
    if args.out_given:
        bench.make_dir(p, "--out", args.out.parent)
    if not args.render:
        bench.make_dir(p, "--dir", args.dir)
    return args


def check_tools(args: argparse.Namespace) -> None:
    need = {"fio": "fio"}
    if not args.no_qcow2 and 2 in args.exp:
        need |= {"qemu-nbd": "qemu-utils", "qemu-img": "qemu-utils"}
    missing = [f"{t} (Debian package {pkg})" for t, pkg in need.items() if not shutil.which(t)]
    if missing:
        raise StudyError(f"missing: {', '.join(missing)}; `make deps` installs them")
    if "uri" not in subprocess.run(["fio", "--enghelp=nbd"], capture_output=True,
                                   text=True).stdout:
        raise StudyError("this fio has no nbd engine (Debian's fio package has it)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise StudyError("the plots need matplotlib: .venv/bin/pip install matplotlib "
                         "(or pip install -e '.[bench]')") from None


def write_report(args: argparse.Namespace, results: dict[str, Any], info: dict[str, Any],
                 params: Params) -> None:
    targets = judge(results, args.design_list)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    figs = plot_all(results, args.design_list, info, out.parent / out.stem)
    text = render(results, args.design_list, info, params, args, figs, out, targets)
    # no path of this machine in the report (error messages may carry some)
    text = re.sub(r"/tmp/nbd-study-[^/\s]+", "<tmp>", text.replace(str(REPO) + "/", ""))
    out.write_text(text)
    log(f"study: wrote {out} and {len(figs)} plot(s) in {out.parent / out.stem}")
    for t in targets:
        log(f"  {'MET    ' if t['met'] else 'NOT MET'} {t['target']}: {t['detail']}")
    if args.json:
        doc = {"machine": info, "params": params.__dict__, "designs": args.design_list,
               "no_qcow2": args.no_qcow2, "results": results, "targets": targets}
        blob = json.dumps(doc, indent=1, default=str)
        blob = re.sub(r"/tmp/nbd-study-[^/\s\"]+", "<tmp>", blob.replace(str(REPO) + "/", ""))
        if args.json == "-":
            print(blob)
        else:
            Path(args.json).write_text(blob + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        doc = args.render_doc
        args.design_list, args.no_qcow2 = doc["designs"], doc.get("no_qcow2", False)
        args.quick = bool(doc["machine"].get("quick"))
        if not args.out_given:
            args.out = default_out(args.quick)
        write_report(args, doc["results"], doc["machine"], args.params)
        return 0
    check_tools(args)
    params: Params = args.params
    kind = bench.fs_type(args.dir)
    if kind in ("tmpfs", "ramfs"):
        raise StudyError(f"--dir {args.dir} is on {kind}; O_DIRECT figures need a real disk")
    free = shutil.disk_usage(args.dir).free
    need = 2 * GiB if args.quick else 12 * GiB
    if args.pools != "sparse":
        need += params.pool_size  # one preallocated pool at a time
    if free < need:
        raise StudyError(f"--dir {args.dir} has {human(free)} free; the study needs about "
                         f"{human(need)}")
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)), "cpu": bench.cpu_model(),
        "kernel": os.uname().release, "fs": kind, "fio": bench.first_line(["fio", "--version"]),
        "qemu-nbd": bench.first_line(["qemu-nbd", "--version"]),
        "nbdserver_rev": bench.first_line(["git", "-C", str(REPO), "describe", "--always",
                                           "--dirty"]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick, "rounds": args.rounds,
        "pools": POOL_FILES[args.pools],
        "command": public_command(sys.argv[1:] if argv is None else argv),
    }
    log(f"study: designs {', '.join(args.design_list)}, experiments "
        f"{','.join(map(str, sorted(args.exp)))}, {'quick' if args.quick else 'full'} "
        f"({human(params.region)} volumes, {params.seconds}s runs) in {args.dir}")
    ws = Workspace(args.dir, args.keep, preallocate="" if args.pools == "sparse" else args.pools)
    study = Study(args, params, ws, args.design_list)
    try:
        if 1 in args.exp:
            study.snapshots()
        if 2 in args.exp:
            study.depth()
        if 3 in args.exp:
            study.locality()
        if 4 in args.exp:
            study.creation()
        if 6 in args.exp:
            study.vm_boot()
    finally:
        bench.kill_all()
        ws.close()
        if args.keep:
            log(f"study: kept the pools and logs in {ws.dir}")
    info["elapsed_min"] = (time.monotonic() - _T0) / 60
    write_report(args, study.results, info, params)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, bench._on_signal)
    signal.signal(signal.SIGHUP, bench._on_signal)
    try:
        sys.exit(main())
    except StudyError as e:
        bench.kill_all()
        print(f"study: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        bench.kill_all()
        sys.exit(130)
