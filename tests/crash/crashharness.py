"""The kill -9 campaign: a random workload on a pool, SIGKILL at a random moment, check.

One *campaign* creates a pool (one block-map design) and runs *iterations*;
each iteration:

1. sometimes checks the pool offline first (``nbdserver pool check --json``,
   which recovers it), sometimes starts that check and kills it half way (a
   crash during recovery);
2. starts ``nbdserver serve`` (the helper from ``tests/conftest.py``) on the
   same pool, exporting every volume known to exist except a few kept aside to
   be deleted; sometimes one export is a fork the server makes as it starts;
3. lists the volumes and checks the catalog against every answered volume
   operation (and settles the ones a kill cut off), reads the exported
   volumes back in full and checks them against the model (:mod:`crashmodel`;
   a volume unchanged since its last check one time in two), and runs
   ``pool check``: no problem, no leaked chunk or page. The list and the check
   go through the CLI (``--json``) one time in three, otherwise straight to the
   control socket, where the CLI would send them;
4. runs the workload: per written volume a few pipelined "slots" sending
   writes (unaligned, sector-aligned, chunk-aligned, multi-chunk; some FUA),
   trims, write-zeroes, flushes and reads checked against the acknowledged
   content; meanwhile the CLI snapshots, forks, creates (some guaranteed: a
   guarantee the pool cannot promise is refused and changes nothing) and
   deletes scratch volumes, and defrags any volume (written ones too: defrag
   moves chunks and changes no byte), through the running server;
5. kills the server with SIGKILL, as the iteration's *trigger* says: after a
   random delay; right after the k-th FLUSH or FUA reply; in the middle of a
   snapshot, fork, create, delete or defrag sent on the control socket (the
   clone of the "cow" trigger goes there too: a CLI's start often outlasted
   the run, and its clone and burst get COW_PATIENCE to come); or during a
   burst of copy-on-write writes after a fork (of an exported volume, or of
   the fork the server made at start). CLI commands still running are killed
   first: one that had not yet tried the pool would otherwise find it unlocked
   and run offline on the crashed pool.

Every request's fate is recorded where the client sees it: a reply is an
acknowledgement, a request without a reply (the server died) may or may not
have happened. The model turns that into the set of allowed values of every
byte. The seed also picks the pool's journal size (small ones checkpoint
often), the radix fan-out and the server's metadata cache (tiny ones evict on
every request). After the last iteration the server is stopped cleanly
(SIGTERM), and then every acknowledged write must read back exactly.

Any broken rule raises :class:`Violation`, whose message names the seed, the
iteration, the volume, the byte range, what was allowed and what was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from conftest import NbdServerProcess
from crashmodel import Event, VolumeModel, find_origin
from nbdclient import NbdClient, NbdReplyError, ServerClosed

from nbdserver.blockmap.base import designs
from nbdserver.control.socket import socket_path
from nbdserver.pool.pool import Pool, read_superblock
from nbdserver.protocol import constants as c

KiB = 1024
MiB = 1024 * KiB
SERVER_CMD = (sys.executable, "-m", "nbdserver")
COW_PATIENCE = 6.0  # seconds the "cow" trigger waits for its clone and burst to come
REQUEST_TIMEOUT = 60.0  # a request not answered by then is a hang (a bug)
CLI_TIMEOUT = 120.0
READ_PIECE = 1 * MiB
TRIGGERS = ("timer", "flush", "fua", "op", "cow", "fresh")
TRIGGER_WEIGHTS = (25, 15, 10, 25, 15, 10)
GUARANTEED_SHARE = 0.3  # of the volumes created: guaranteed (their promises cross kills too)

ServerFactory = Callable[..., NbdServerProcess]


class Violation(Exception):
    """The server broke a promise (or died); the message says which, where and how."""

    located = False  # the message names the design, seed and iteration


@dataclass
class Policy:
    """What a design allows (LVM-like designs refuse a few operations)."""

    clone_of_clone: bool = True  # snapshot or fork a volume that is itself a copy
    delete_parent: bool = True  # delete a volume that others were copied from

    @classmethod
    def of(cls, design: str) -> Policy:
        supports = designs()[design].supports_clone_of_clone
        return cls(clone_of_clone=supports, delete_parent=supports)


@dataclass
class Stats:
    iterations: int = 0
    kills: int = 0
    triggers: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    acked: int = 0
    unanswered: int = 0
    flushes: int = 0
    fua: int = 0
    reads_checked: int = 0
    ops_ok: int = 0
    ops_unknown: int = 0
    ops_refused: int = 0  # guarantees the pool could not promise
    guaranteed: int = 0  # guaranteed volumes created or forked
    bytes_checked: int = 0
    recovery_kills: int = 0
    offline_checks: int = 0
    cli_tracebacks: int = 0  # the CLI crashed because the server was killed under it
    defrags: int = 0  # volume defrags sent (moving chunks while the workload runs)
    fallbacks: int = 0  # kills at the deadline because the trigger's moment did not come
    seconds: float = 0.0

    def summary(self) -> str:
        trig = ", ".join(f"{k} {v}" for k, v in sorted(self.triggers.items()))
        return (f"{self.iterations} iterations, {self.kills} kills ({trig}; "
                f"{self.fallbacks} at the deadline, their moment not come); "
                f"{self.requests} requests ({self.acked} answered, {self.unanswered} cut off "
                f"by a kill), {self.flushes} flushes, {self.fua} FUA writes, "
                f"{self.reads_checked} live reads checked; volume operations: {self.ops_ok} "
                f"answered ({self.guaranteed} guaranteed), {self.ops_unknown} cut off, "
                f"{self.ops_refused} refused, {self.defrags} defrags; "
                f"{self.recovery_kills} kills during recovery, {self.offline_checks} offline "
                "checks; "
                f"{self.bytes_checked / MiB:.0f} MiB read back and checked; "
                f"{self.cli_tracebacks} CLI tracebacks on a killed server; "
                f"{self.seconds:.1f} s")


@dataclass
class PendingOp:
    """A volume operation sent to the server and what the model does once it is answered."""

    kind: str  # create, snapshot, fork, delete, defrag
    name: str
    source: str | None = None
    model: VolumeModel | None = None  # the new volume's (create) or a clone's base so far
    events_from: int = 0  # the source's events from here on were sent during the operation
    written: bool = False  # the source takes writes in this run
    maybe: list[Event] = field(default_factory=list)
    answered: bool = False
    guarantee: bool = False  # (create, fork) a guaranteed volume


class Run:
    """One server process of one iteration: its clients, writers and kill trigger."""

    def __init__(self, campaign: Campaign, srv: NbdServerProcess,
                 clients: dict[str, NbdClient], written: list[str], trigger: str,
                 seconds: float) -> None:
        self.c = campaign
        self.srv = srv
        self.clients = clients
        self.written = written
        self.trigger = trigger  # "none": no kill, the run ends with a clean stop
        self.rng = campaign.rng
        self.started = time.monotonic()
        self.deadline = self.started + seconds
        self.killed = False
        self.kill_reason = ""
        self.stopping = False
        self.inflight: dict[str, list[tuple[int, int, Event | None]]] = {
            name: [] for name in clients}
        self.countdown = self.rng.randint(1, 60 if trigger in ("flush", "fua") else 40)
        self.burst: set[str] = set()  # volumes taking a burst of copy-on-write writes
        self.cow_started: float | None = None  # when the "cow" trigger's clone was sent
        self.cli_procs: set[asyncio.subprocess.Process] = set()  # CLI commands running
        # A window shared by every volume, for overwrites and for chunks shared by forks.
        self.hot = self.rng.randrange(0, max(1, campaign.volume_size - 512 * KiB)) // 4096 * 4096

    # -- killing -----------------------------------------------------------------------------

    def kill(self, reason: str) -> None:
        if self.killed or self.trigger == "none":
            return
        self.killed = True
        self.kill_reason = f"killed {reason} at {time.monotonic() - self.started:.3f}s"
        # The CLI first, or one that had not yet tried the pool would find it unlocked and
        # run its operation offline, on the crashed pool, where the model does not expect it.
        for proc in self.cli_procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self.srv.signal(signal.SIGKILL)

    def count(self, what: str) -> None:
        """A reply of kind `what` arrived: kill now if that is the trigger's moment."""
        if self.trigger == what and not self.killed:
            self.countdown -= 1
            if self.countdown <= 0:
                self.kill(f"right after a {what} reply" if what in ("flush", "fua") else
                          f"in a burst of copy-on-write writes to {sorted(self.burst)}")

    # -- requests ----------------------------------------------------------------------------

    async def request(self, vol: str, cmd: int, offset: int = 0, length: int = 0, *,
                      flags: int = 0, data: bytes = b"", notify: str | None = None) -> Any:
        """Send one request and return its result; ServerClosed if the server died first."""
        if self.killed:
            raise ServerClosed("killed")
        client = self.clients[vol]
        fut = client.submit(cmd, offset, length, flags=flags, data=data)
        self.c.stats.requests += 1
        if notify is not None:
            def done(f: asyncio.Future[object], what: str = notify) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.count(what)
            fut.add_done_callback(done)
        with contextlib.suppress(ConnectionError, OSError):
            await client.drain()  # if the server is gone, the reader fails the future
        what = f"{vol}: {_cmd_name(cmd)} [{offset}, +{length or len(data)})"
        try:
            result = await asyncio.wait_for(fut, REQUEST_TIMEOUT)
        except (ServerClosed, ConnectionError, asyncio.IncompleteReadError):
            self.c.stats.unanswered += 1
            if not self.killed:
                raise Violation(f"{what}: the server closed the connection "
                                f"(died?)\n{self.srv.stderr[-3000:]}") from None
            raise ServerClosed(what) from None
        except NbdReplyError as e:
            raise Violation(f"{what} failed: {e}") from None
        except TimeoutError:
            raise Violation(f"{what} not answered within {REQUEST_TIMEOUT:.0f}s "
                            "(server hung?)") from None
        self.c.stats.acked += 1
        return result

    def _free(self, vol: str, start: int, end: int) -> bool:
        return all(e <= start or s >= end for s, e, _ in self.inflight[vol])

    def _pick_range(self, vol: str) -> tuple[int, int] | None:
        """(offset, length) for a write, overlapping nothing in flight on `vol`."""
        size = self.c.models[vol].size
        rng = self.rng
        for _ in range(8):
            r = rng.random()
            aligned = False
            if vol in self.burst:  # copy-on-write of (mostly) whole chunks, anywhere
                length = min(size, rng.choice((4 * KiB, 4 * KiB, 8 * KiB, 16 * KiB, 64 * KiB)))
                aligned = rng.random() < 0.8
                if not aligned:
                    length = rng.randint(1, length)
            elif r < 0.3:  # small, unaligned
                length = rng.randint(1, 9000)
            elif r < 0.65:  # whole chunks
                length, aligned = 4 * KiB * rng.randint(1, 16), True
            elif r < 0.85:  # whole sectors
                length = 512 * rng.randint(1, 64)
            else:  # large, over many chunks
                length = rng.randint(64 * KiB, 1 * MiB)
                aligned = rng.random() < 0.5
                if aligned:
                    length = length // 4096 * 4096
            length = min(length, size)
            window = min(512 * KiB, size)
            if vol not in self.burst and length <= window and rng.random() < 0.5:
                lo = min(self.hot, size - window)
                offset = lo + rng.randrange(0, window - length + 1)
            else:
                offset = rng.randrange(0, size - length + 1)
            if aligned:
                offset = offset // 4096 * 4096
            elif length % 512 == 0 and rng.random() < 0.5:
                offset = offset // 512 * 512
            if self._free(vol, offset, offset + length):
                return offset, length
        return None

    async def slot(self, vol: str) -> None:
        """One request at a time on `vol`; several slots per volume pipeline them."""
        model = self.c.models[vol]
        rng = self.rng
        try:
            while not self.stopping and not self.killed:
                r = rng.random() * (0.7 if vol in self.burst else 1.0)
                if r < 0.6:
                    await self.write(vol, model)
                elif r < 0.67:
                    await self.zero(vol, model, trim=True)
                elif r < 0.74:
                    await self.zero(vol, model, trim=False)
                elif r < 0.86:
                    await self.flush(vol, model)
                else:
                    await self.read(vol, model)
        except ServerClosed:
            pass

    async def write(self, vol: str, model: VolumeModel) -> None:
        picked = self._pick_range(vol)
        if picked is None:
            await asyncio.sleep(0.001)
            return
        offset, length = picked
        fua = self.rng.random() < 0.15
        ev = Event(next(self.c.eids), vol, "write", offset, length,
                   seed=self.rng.getrandbits(63), fua=fua)
        await self._mutate(model, ev, c.CMD_WRITE, c.CMD_FLAG_FUA if fua else 0, ev.data())

    async def zero(self, vol: str, model: VolumeModel, *, trim: bool) -> None:
        rng = self.rng
        length = min(model.size, rng.randint(1, 256 * KiB))
        if rng.random() < 0.5:
            length = min(model.size, -(-length // 4096) * 4096)
        offset = rng.randrange(0, model.size - length + 1)
        if rng.random() < 0.5:
            offset = offset // 4096 * 4096
        if not self._free(vol, offset, offset + length):
            return
        fua = rng.random() < 0.1
        flags = c.CMD_FLAG_FUA if fua else 0
        if not trim and rng.random() < 0.5:
            flags |= c.CMD_FLAG_NO_HOLE
        ev = Event(next(self.c.eids), vol, "trim" if trim else "zero", offset, length, fua=fua)
        await self._mutate(model, ev, c.CMD_TRIM if trim else c.CMD_WRITE_ZEROES, flags)

    async def _mutate(self, model: VolumeModel, ev: Event, cmd: int, flags: int,
                      data: bytes = b"") -> None:
        vol = ev.volume
        entry = (ev.offset, ev.end, ev)
        self.inflight[vol].append(entry)
        model.sent(ev)
        burst = vol in self.burst
        notify = "fua" if ev.fua else None
        if burst and self.trigger in ("cow", "fresh"):
            notify = self.trigger
        try:
            await self.request(vol, cmd, ev.offset, 0 if data else ev.length, flags=flags,
                               data=data, notify=notify)
        finally:
            self.inflight[vol].remove(entry)
        model.acked(ev)
        self.c.stats.fua += ev.fua

    async def flush(self, vol: str, model: VolumeModel) -> None:
        covered = model.flush_sent()
        await self.request(vol, c.CMD_FLUSH, notify="flush")
        model.flush_acked(covered)
        self.c.stats.flushes += 1

    async def read(self, vol: str, model: VolumeModel) -> None:
        length = min(model.size, self.rng.randint(1, 128 * KiB))
        offset = self.rng.randrange(0, model.size - length + 1)
        if not self._free(vol, offset, offset + length):
            return
        entry = (offset, offset + length, None)
        self.inflight[vol].append(entry)
        try:
            expected = bytes(model.current[offset:offset + length])
            data = await self.request(vol, c.CMD_READ, offset, length)
        finally:
            self.inflight[vol].remove(entry)
        self.c.stats.reads_checked += 1
        if data != expected:
            bad = next(i for i, (a, b) in enumerate(zip(data, expected, strict=True)) if a != b)
            at = offset + bad
            origin = find_origin(data[bad:bad + 64], list(self.c.models.values()))
            history = "\n".join(f"    {ev.describe()}" for ev in model.events
                                if ev.offset <= at < ev.end)
            raise Violation(
                f"{vol}: a READ of [{offset}, +{length}) (no crash) returned other bytes than "
                f"the acknowledged writes: first difference at {at}, read "
                f"{data[bad:bad + 16].hex()} ({origin}), expected "
                f"{expected[bad:bad + 16].hex()}\n  requests over byte {at} in this run, "
                f"oldest first:\n{history or '    none'}")

    def in_flight_events(self, vol: str) -> list[Event]:
        return [ev for _, _, ev in self.inflight.get(vol, []) if ev is not None]


class Campaign:
    """Many kill -9 iterations on one pool; see the module note."""

    def __init__(self, workdir: Path, design: str, seed: int, *, factory: ServerFactory,
                 iterations: int, volume_size: int = 8 * MiB, pool_size: int = 256 * MiB,
                 run_seconds: tuple[float, float] = (0.2, 1.5), max_volumes: int = 8,
                 log: Callable[[str], None] = print) -> None:
        self.workdir = Path(workdir)
        self.design = design
        self.seed = seed
        self.rng = random.Random(seed)
        self.factory = factory
        self.iterations = iterations
        self.volume_size = volume_size
        self.pool_size = pool_size
        self.run_seconds = run_seconds
        self.max_volumes = max_volumes
        self.log = log
        self.policy = Policy.of(design)
        self.pool_path = self.workdir / "pool.img"
        self.models: dict[str, VolumeModel] = {}
        self.writable: set[str] = set()
        self.guaranteed: set[str] = set()  # volumes whose clones may be refused for space
        self.uncertain: dict[str, PendingOp] = {}  # operations whose answer was cut off
        self.names = itertools.count(1)
        self.eids = itertools.count(1)
        self.stats = Stats()
        self.iteration = 0
        self.op_seconds: dict[str, list[float]] = {}  # on the control socket, by kind
        self.params: dict[str, Any] = {}
        self.servers = 0
        self.control: Path | None = None

    def fail(self, message: str) -> Violation:
        v = Violation(f"[{self.design} seed={self.seed} iteration {self.iteration}] "
                      f"{message}\n(rerun: scripts/crash-test --blockmap {self.design} "
                      f"--seed {self.seed} --iterations {self.iterations} "
                      f"--volume-size {self.volume_size // MiB} "
                      f"--pool-size {self.pool_size // MiB} "
                      f"--max-seconds {self.run_seconds[1]:g})")
        v.located = True
        return v

    # -- the pool and the CLI ------------------------------------------------------------------

    def create_pool(self) -> None:
        """A new pool; the seed picks its journal size, radix fan-out and server cache."""
        rng = self.rng
        fanout = rng.choice((None, 16, 32)) if self.design == "radix" else None
        # A small fan-out means deep trees, and many pages: every volume may end up with a
        # tree of its own (about chunks / (fan-out - 1) pages, half again for path copies);
        # the pool's metadata area (1/64 of it) must hold them, or writes fail with ENOSPC.
        meta_pages = self.pool_size // 4096 // 64
        while fanout and self.max_volumes * 1.5 * (self.volume_size // 4096) / (fanout - 1) \
                > meta_pages:
            fanout *= 2
        # A small journal means frequent checkpoints (superblock writes) to crash in.
        journal = None if fanout else rng.choice((None, 1 * MiB, 2 * MiB))
        self.params = {"journal": journal or "default", "fanout": fanout or "default",
                       "cache": rng.choice(("128K", "1M", "4M", "64M"))}
        Pool.create(self.pool_path, self.pool_size, blockmap=self.design,
                    map_params=(fanout, 0, 0, 0) if fanout else None, journal_bytes=journal)
        self.control = socket_path(read_superblock(self.pool_path).uuid_str, self.pool_path)

    async def cli(self, *args: str, check: bool = True,
                  run: Run | None = None) -> tuple[int, Any, str]:
        """Run ``nbdserver ARGS``: (exit status, its JSON output or None, its stderr).

        A traceback is a failure, unless `run` says the server was killed meanwhile
        (the CLI does not turn a reset control connection into an error message).
        """
        if run is not None and run.killed:
            return -signal.SIGKILL, None, ""
        proc = await asyncio.create_subprocess_exec(
            *SERVER_CMD, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL)
        if run is not None:
            run.cli_procs.add(proc)
            if run.killed:  # while it was being started
                proc.kill()
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise self.fail(f"nbdserver {' '.join(args)}: no answer within "
                            f"{CLI_TIMEOUT:.0f}s") from None
        finally:
            if run is not None:
                run.cli_procs.discard(proc)
        errs = err.decode(errors="replace")
        if "Traceback" in errs:
            if run is None or not run.killed:
                raise self.fail(f"nbdserver {' '.join(args)} crashed:\n{errs}")
            self.stats.cli_tracebacks += 1
        if check and proc.returncode != 0:
            raise self.fail(f"nbdserver {' '.join(args)} exited {proc.returncode}:\n{errs}")
        try:
            value = json.loads(out) if out.strip() else None
        except ValueError:
            value = None
        return proc.returncode or 0, value, errs

    async def query(self, *args: str, online: bool = True) -> tuple[int, Any, str]:
        """``nbdserver pool|volume ARGS POOL --json``: with a server up, one time in three
        by the CLI, otherwise straight on its control socket (the CLI takes ~0.2 s to start;
        it only forwards the same request)."""
        if online and self.rng.random() < 2 / 3:
            assert self.control is not None
            reply = await control_call(self.control, ".".join(args), {})
            if reply is None:
                raise self.fail(f"control {'.'.join(args)}: connection closed, no answer")
            if not reply.get("ok"):
                return 1, None, str(reply.get("error"))
            return 0, reply.get("result"), ""
        return await self.cli(*args, str(self.pool_path), "--json", check=False)

    async def pool_check(self, where: str, *, online: bool = True) -> None:
        rc, report, err = await self.query("pool", "check", online=online)
        if not isinstance(report, dict):
            raise self.fail(f"pool check ({where}) exited {rc} without a report: {err}")
        if rc != 0 or not report.get("ok") or report.get("leaked_chunks") or \
                report.get("leaked_pages"):
            problems = "\n  ".join(report.get("problems", [])[:20])
            raise self.fail(f"pool check ({where}): leaked chunks "
                            f"{report.get('leaked_chunks')}, leaked pages "
                            f"{report.get('leaked_pages')}, problems:\n  {problems}")

    # -- the campaign --------------------------------------------------------------------------

    async def run(self) -> Stats:
        t0 = time.monotonic()
        self.create_pool()
        for name in ("v0", "v1"):
            await self.cli("volume", "create", str(self.pool_path), name, "--size",
                           str(self.volume_size), "--json")
            self.models[name] = VolumeModel(name, self.volume_size)
            self.writable.add(name)
        self.log(f"{self.design}: seed {self.seed}, {self.iterations} iterations, pool "
                 f"{self.pool_size // MiB} MiB, journal {self.params['journal']}, fan-out "
                 f"{self.params['fanout']}, server cache {self.params['cache']}")
        for i in range(1, self.iterations + 2):
            self.iteration = i
            await self.iterate(last=i > self.iterations)
        await self.final_check()
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    async def before_start(self) -> None:
        """Sometimes check the pool offline, or crash that check in its recovery."""
        r = self.rng.random()
        if r < 0.15:
            proc = subprocess.Popen([*SERVER_CMD, "pool", "check", str(self.pool_path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL)
            await asyncio.sleep(self.rng.uniform(0.1, 0.5))  # the CLI starts in ~0.15 s
            proc.kill()
            _, err = proc.communicate(timeout=CLI_TIMEOUT)
            if b"Traceback" in err:
                raise self.fail(f"offline pool check crashed:\n{err.decode(errors='replace')}")
            self.stats.recovery_kills += 1
        elif r < 0.4:
            await self.pool_check("offline, before the restart", online=False)
            self.stats.offline_checks += 1

    def _clonable(self, name: str) -> bool:
        return self.policy.clone_of_clone or self.models[name].parent is None

    def _deletable(self, name: str) -> bool:
        return self.policy.delete_parent or not any(
            m.parent == name for m in self.models.values())

    def choose_exports(self, last: bool) -> tuple[list[str], list[str], tuple[str, str] | None]:
        """(volumes to export, volumes kept aside to delete, (source, name) of a fork the
        server makes as it starts)."""
        known = [n for n in self.models if n not in self.uncertain]
        if last:
            return known, [], None
        aside = [n for n in known if n not in ("v0", "v1") and self.rng.random() < 0.35]
        exported = [n for n in known if n not in aside]
        fresh = None
        if len(self.models) < self.max_volumes and self.rng.random() < 0.3:
            sources = [n for n in exported if self._clonable(n)]
            if sources:
                fresh = (self.rng.choice(sources), f"f{next(self.names)}")
        return exported, aside, fresh

    def start_server(self, exported: list[str], fresh: tuple[str, str] | None
                     ) -> NbdServerProcess:
        # min-block-size 1: byte-granular requests, so unaligned ones reach the volume layer
        exports: list[dict[str, Any]] = [{"name": n, "pool": "p", "volume": n,
                                          "min-block-size": 1} for n in exported]
        if fresh is not None:
            exports.append({"name": fresh[1], "pool": "p", "volume": fresh[1],
                            "min-block-size": 1, "create": {"fork": fresh[0]}})
        self.servers += 1
        try:
            return self.factory(exports, pools=[{"name": "p", "path": self.pool_path}],
                                server={"cache-size": self.params["cache"]}, tcp=False,
                                name=f"srv{self.servers:03d}")
        except pytest.fail.Exception as e:
            raise self.fail(f"the server did not start on the crashed pool:\n{e}") from None

    async def check_catalog(self, fresh: tuple[str, str] | None = None) -> None:
        """The catalog holds every acknowledged volume and nothing deleted; resolves the
        operations a kill cut off."""
        rc, listing, err = await self.query("volume", "list")
        if rc != 0 or not isinstance(listing, list):
            raise self.fail(f"volume list failed: {err}")
        found = {v["name"]: v for v in listing}
        for name, op in self.uncertain.items():
            if op.kind == "delete":
                if name not in found:
                    del self.models[name]
                    self.writable.discard(name)
            elif name in found:
                self.add_volume(op)
        self.uncertain.clear()
        expected = {n: (m.size, m.snapshot, m.parent) for n, m in self.models.items()}
        if fresh is not None:
            expected[fresh[1]] = (self.models[fresh[0]].size, False, fresh[0])
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        if missing or extra:
            raise self.fail(f"catalog after the restart: acknowledged volumes missing: "
                            f"{missing}; volumes that should not exist: {extra}")
        for name, info in found.items():
            size, snapshot, parent = expected[name]
            if info["size"] != size or bool(info["snapshot"]) != snapshot or (
                    parent in expected and info["parent"] != parent):
                raise self.fail(f"catalog: volume {name!r} is {info}; expected size {size}, "
                                f"snapshot {snapshot}, parent {parent!r}")

    async def read_volume(self, client: NbdClient, size: int) -> bytes:
        out = bytearray(size)
        futs = [(off, client.submit(c.CMD_READ, off, min(READ_PIECE, size - off)))
                for off in range(0, size, READ_PIECE)]
        await client.drain()
        for off, fut in futs:
            data = await asyncio.wait_for(fut, REQUEST_TIMEOUT)
            assert isinstance(data, bytes)
            out[off:off + len(data)] = data
        return bytes(out)

    async def verify(self, clients: dict[str, NbdClient], names: Sequence[str],
                     when: str) -> None:
        """Read each volume back whole and check it against its model."""
        for name in names:
            model = self.models[name]
            try:
                actual = await self.read_volume(clients[name], model.size)
            except (NbdReplyError, ServerClosed, TimeoutError) as e:
                raise self.fail(f"reading back {name!r} ({when}) failed: {e}") from None
            bad = model.check(actual)
            self.stats.bytes_checked += model.size
            if bad:
                others = list(self.models.values())
                text = "\n".join(m.describe(find_origin(m.actual, others)) for m in bad)
                raise self.fail(f"{name!r} read back wrong {when}:\n{text}")
            model.resolve(actual)

    async def connect(self, srv: NbdServerProcess, names: Sequence[str]) -> dict[str, NbdClient]:
        assert srv.socket_path is not None
        clients = {}
        for name in names:
            client = await NbdClient.connect(srv.socket_path)
            await client.handshake(name, meta=())
            clients[name] = client
        return clients

    async def iterate(self, *, last: bool) -> None:
        """One server run: restart, check everything, work, then kill (or, last, stop)."""
        t0 = time.monotonic()
        if not last:
            await self.before_start()
        exported, aside, fresh = self.choose_exports(last)
        srv = self.start_server(exported, fresh)
        t_started = t_verified = t_checked = time.monotonic()
        run: Run | None = None
        try:
            await self.check_catalog(fresh)
            clients = await self.connect(srv, [*exported, *([fresh[1]] if fresh else [])])
            try:
                # A volume unchanged since its last check (not written, no crash since) is
                # read back one time in two, to keep iterations short; always at the end.
                changed = [n for n in exported if self.models[n].events
                           or self.models[n].uncertain or last or self.rng.random() < 0.5]
                await self.verify(clients, changed, "after the restart")
                if fresh is not None:
                    self.models[fresh[1]] = self.models[fresh[0]].clone(
                        fresh[1], snapshot=False, written=False, maybe=[])
                    self.writable.add(fresh[1])
                    await self.verify(clients, [fresh[1]], "as forked by the server at start")
                t_verified = time.monotonic()
                await self.pool_check("through the running server")
                t_checked = time.monotonic()
                trigger = "none" if last else self.rng.choices(TRIGGERS, TRIGGER_WEIGHTS)[0]
                if trigger == "fresh" and fresh is None:
                    trigger = "cow"
                writable = [n for n in clients if n in self.writable]
                self.rng.shuffle(writable)
                written = writable[:3]
                sources = [n for n in writable if self._clonable(n)]
                if trigger == "cow" and sources and not any(n in sources for n in written):
                    # (linear clones origins only: without one among them, no fork of a
                    # written volume, no burst, and the kill falls back to the timer)
                    written = [*written[:2], sources[0]]
                if fresh is not None and fresh[1] not in written:
                    written.append(fresh[1])
                run = Run(self, srv, clients, written, trigger,
                          self.rng.uniform(*self.run_seconds))
                if fresh is not None and trigger == "fresh":
                    run.burst.add(fresh[1])
                await self.workload(run, aside)
            finally:
                for client in clients.values():
                    await client.close()
        finally:
            if run is not None and run.trigger == "none":
                await self.stop(srv)
            else:
                srv.kill()
            if "Traceback" in srv.stderr:
                raise self.fail(f"server traceback:\n{srv.stderr[-6000:]}")
        assert run is not None
        if not last:
            self.stats.iterations += 1
            self.stats.kills += 1
            self.stats.triggers[run.trigger] = self.stats.triggers.get(run.trigger, 0) + 1
            for m in self.models.values():
                m.crashed()
        for m in self.models.values():
            m.drop_data()
        cut = f", cut off: {sorted(self.uncertain)}" if self.uncertain else ""
        now = time.monotonic()
        self.log(f"  {self.iteration:3d} {run.trigger:5s} {run.kill_reason or 'stopped cleanly'}"
                 f"; wrote {','.join(run.written)}; {len(self.models)} volumes{cut}; "
                 f"{now - t0:.1f}s (start {t_started - t0:.1f}, read back "
                 f"{t_verified - t_started:.1f}, check {t_checked - t_verified:.1f}, work "
                 f"{now - t_checked:.1f})")

    # -- the workload ------------------------------------------------------------------------

    async def workload(self, run: Run, aside: list[str]) -> None:
        depth = self.rng.choice((1, 2, 4, 8))
        tasks = [asyncio.ensure_future(run.slot(name)) for name in run.written
                 for _ in range(depth)]
        tasks.append(asyncio.ensure_future(self.operations(run, aside)))
        grace = 1.0  # past the deadline, the triggers that wait for a reply give up
        try:
            while not run.killed:
                now = time.monotonic()
                if now > run.deadline and run.trigger in ("timer", "none"):
                    run.kill("after a random delay")
                    break
                # (a clone for the "cow" kill, then its burst of copy-on-write writes, may
                # take longer than the run: each first write of a linear origin commits)
                patient = (run.cow_started is not None
                           and now < min(run.cow_started, run.deadline) + COW_PATIENCE)
                if now > run.deadline + grace and not patient:
                    run.kill(f"(fallback: the {run.trigger} moment did not come)")
                    self.stats.fallbacks += 1
                if any(t.done() and t.exception() is not None for t in tasks):
                    run.kill("after a failure")
                    break
                await asyncio.sleep(0.005)
        finally:
            run.stopping = True
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                             REQUEST_TIMEOUT * 2)
        for res in results:
            if isinstance(res, Violation):
                raise res if res.located else self.fail(str(res))
            if isinstance(res, BaseException):
                raise res

    async def operations(self, run: Run, aside: list[str]) -> None:
        """Volume operations while the workload runs; the "op" and "cow" kills."""
        rng = self.rng
        deletable = list(aside)
        count = 0
        if run.trigger == "op":
            # A few operations on the control socket (timing them), then one that is killed.
            count = rng.randint(0, 2)
            await asyncio.sleep(rng.uniform(0.0, 0.5) * (run.deadline - time.monotonic()))
        while not run.killed and not run.stopping:
            cow_first = run.trigger == "cow" and not run.burst  # fork soon, then the burst
            await asyncio.sleep(rng.uniform(0.0, 0.1) if cow_first else rng.uniform(0.02, 0.3))
            op = self.pick_op(run, deletable)
            if op is None or run.killed or run.stopping:
                continue
            if run.trigger == "op":
                killing = count <= 0
                await self.op_on_socket(run, op, kill=killing)
                count -= 1
                if killing:
                    return
            elif cow_first:  # (the control socket: a CLI's start often outlasts the run)
                if run.cow_started is None:  # (the first clone: patience has one end)
                    run.cow_started = time.monotonic()
                await self.op_on_socket(run, op, kill=False)
            else:
                await self.op_through_cli(run, op)
            if op.kind == "create" and op.answered:
                deletable.append(op.name)
            if run.trigger == "cow" and op.kind in ("snapshot", "fork") and op.answered \
                    and op.source in run.written and not run.burst:
                run.burst.add(op.source)  # every chunk of the source is shared now

    def pick_op(self, run: Run, deletable: list[str]) -> PendingOp | None:
        rng = self.rng
        kinds = []
        if len(self.models) + len(self.uncertain) < self.max_volumes:
            kinds = ["snapshot", "fork", "create"]
        targets = [n for n in deletable if n in self.models and n not in self.uncertain
                   and self._deletable(n)]
        if targets:
            kinds += ["delete", "delete"]
        movable = [n for n in self.models if n not in self.uncertain]
        if movable:
            kinds.append("defrag")
        if run.trigger == "cow" and not run.burst:
            kinds = [k for k in kinds if k in ("snapshot", "fork")] or kinds
        if not kinds:
            return None
        kind = rng.choice(kinds)
        if kind == "delete":
            return PendingOp("delete", rng.choice(targets))
        if kind == "defrag":  # moves chunks, changes no byte of any volume
            return PendingOp("defrag", rng.choice(movable))
        if kind == "create":
            size = rng.randint(1, self.volume_size // (64 * KiB)) * 64 * KiB
            name = f"c{next(self.names)}"
            return PendingOp("create", name, model=VolumeModel(name, size),
                             guarantee=rng.random() < GUARANTEED_SHARE)
        sources = [n for n in self.models if self._clonable(n) and n not in self.uncertain]
        hot = [n for n in sources if n in run.written]
        if hot and (rng.random() < 0.7 or run.trigger == "cow"):
            sources = hot
        if not sources:
            return None
        return PendingOp(kind, f"{kind[0]}{next(self.names)}", source=rng.choice(sources),
                         guarantee=kind == "fork" and rng.random() < GUARANTEED_SHARE)

    def op_begin(self, run: Run, op: PendingOp) -> tuple[str, dict[str, Any]]:
        """The control-socket request for `op`; captures what a copy will hold."""
        if op.kind == "create":
            assert op.model is not None
            return "volume.create", {"name": op.name, "size": op.model.size,
                                     "guarantee": op.guarantee}
        if op.kind in ("delete", "defrag"):
            return f"volume.{op.kind}", {"name": op.name}
        assert op.source is not None
        src = self.models[op.source]
        op.written = op.source in run.written
        if op.written:
            op.maybe = run.in_flight_events(op.source)
            op.events_from = len(src.events)
        op.model = src.clone(op.name, snapshot=op.kind == "snapshot", written=op.written,
                             maybe=[])
        args: dict[str, Any] = {"source": op.source, "name": op.name}
        if op.guarantee:
            args["guarantee"] = True
        return f"volume.{op.kind}", args

    def _refused(self, op: PendingOp, error: str) -> bool:
        """Whether `op` was refused, changing nothing, because the pool could not promise a
        guarantee: a guaranteed create, or a clone of a guaranteed volume (whose chunks
        are then promised to it again)."""
        if not re.search(r"cannot (guarantee|clone) .*(free|promise)", error):
            return False
        if not (op.guarantee or op.source in self.guaranteed):
            return False
        self.stats.ops_refused += 1
        return True

    def op_end(self, op: PendingOp, answered: bool) -> None:
        """`op` was answered (done), or cut off by the kill (perhaps done)."""
        if op.written and op.model is not None and op.source is not None:
            # What the source was sent while the operation ran may or may not be in the copy.
            src = self.models[op.source]
            more = [*op.maybe, *src.events[op.events_from:]]
            op.model.events = [replace(ev, volume=op.name, durable=False) for ev in more]
            op.model.uncertain = bool(more)
        op.answered = answered
        if op.kind == "defrag":  # done or not, every volume reads as before
            self.stats.defrags += 1
            return
        if not answered:
            self.uncertain[op.name] = op
            self.stats.ops_unknown += 1
            return
        self.stats.ops_ok += 1
        if op.kind == "delete":
            del self.models[op.name]
            self.writable.discard(op.name)
        else:
            self.add_volume(op)

    def add_volume(self, op: PendingOp) -> None:
        assert op.model is not None
        self.models[op.name] = op.model
        if op.guarantee or (self.design == "linear" and op.source in self.guaranteed):
            self.guaranteed.add(op.name)  # (linear: a clone of a guaranteed origin is too)
        if op.guarantee:
            self.stats.guaranteed += 1
        if op.kind != "snapshot":
            self.writable.add(op.name)

    async def op_through_cli(self, run: Run, op: PendingOp) -> None:
        _, args = self.op_begin(run, op)
        pool = str(self.pool_path)
        argv = {"create": ["create", pool, op.name, "--size", str(args.get("size")),
                           *(["--guarantee"] if op.guarantee else [])],
                "delete": ["delete", pool, op.name],
                "defrag": ["defrag", pool, op.name],
                "snapshot": ["snapshot", pool, str(op.source), op.name],
                "fork": ["fork", pool, str(op.source), op.name,
                         *(["--guarantee"] if op.guarantee else [])]}[op.kind]
        rc, _, err = await self.cli("volume", *argv, "--json", check=False, run=run)
        if rc != 0 and self._refused(op, err):
            return
        if rc != 0 and not run.killed:
            raise self.fail(f"nbdserver volume {' '.join(argv)} failed with the server "
                            f"up:\n{err}")
        self.op_end(op, answered=rc == 0)

    async def op_on_socket(self, run: Run, op: PendingOp, *, kill: bool) -> None:
        """Send `op` on the control socket; with `kill`, kill the server while it runs."""
        name, args = self.op_begin(run, op)
        assert self.control is not None
        times = sorted(self.op_seconds.get(op.kind, [0.01]))
        delay = self.rng.uniform(0.0, 1.5 * times[len(times) // 2])
        reader, writer = await asyncio.open_unix_connection(str(self.control))
        try:
            writer.write(json.dumps({"op": name, "args": args}).encode() + b"\n")
            await writer.drain()
            t = time.monotonic()
            try:
                line = await asyncio.wait_for(reader.readline(),
                                              delay if kill else CLI_TIMEOUT)
            except TimeoutError:
                if not kill:
                    raise self.fail(f"control {name} {args}: no answer") from None
                run.kill(f"{delay * 1000:.1f} ms into a {op.kind} of {op.name!r}")
                line = b""
            except ConnectionError:
                line = b""
            if not line and run.killed:
                with contextlib.suppress(ConnectionError):
                    line = await reader.readline()  # answered just before the kill?
            elif not line:
                raise self.fail(f"control {name} {args}: connection closed, no answer")
            if line and not run.killed:
                self.op_seconds.setdefault(op.kind, []).append(time.monotonic() - t)
        finally:
            writer.close()
        reply = json.loads(line) if line else None
        if reply is not None and not reply.get("ok"):
            if not self._refused(op, str(reply.get("error"))):
                raise self.fail(f"control {name} {args} failed: {reply.get('error')}")
        else:
            self.op_end(op, answered=reply is not None)
        if kill and reply is not None:
            run.kill(f"right after a {op.kind} of {op.name!r} was answered")

    async def final_check(self) -> None:
        """After the clean stop every acknowledged write must read back exactly."""
        for m in self.models.values():
            m.all_durable()
        srv = self.start_server(list(self.models), None)
        try:
            await self.check_catalog()
            clients = await self.connect(srv, list(self.models))
            try:
                await self.verify(clients, list(self.models), "after a clean stop")
            finally:
                for client in clients.values():
                    await client.close()
            await self.pool_check("at the end")
        finally:
            await self.stop(srv)

    async def stop(self, srv: NbdServerProcess) -> None:
        """SIGTERM: the server must exit 0, without a traceback."""
        # Let it see our control connections close first: a control connection still open
        # at SIGTERM makes it log a traceback (its handler task is cancelled at exit).
        await asyncio.sleep(0.5)
        try:
            srv.stop()
        except (pytest.fail.Exception, AssertionError) as e:
            raise self.fail(f"the clean stop failed: {e}") from None


async def control_call(path: Path, op: str, args: dict[str, Any]) -> dict[str, Any] | None:
    """One request on a server's control socket: its reply, or None if it closed first."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
    try:
        writer.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), CLI_TIMEOUT)
    except ConnectionError:
        return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return json.loads(line) if line else None


def _cmd_name(cmd: int) -> str:
    return {c.CMD_WRITE: "WRITE", c.CMD_READ: "READ", c.CMD_FLUSH: "FLUSH",
            c.CMD_TRIM: "TRIM", c.CMD_WRITE_ZEROES: "WRITE_ZEROES"}.get(cmd, str(cmd))


def standalone_factory(workdir: Path) -> tuple[ServerFactory, Callable[[], None]]:
    """A server factory for use outside pytest, and the function that cleans up after it."""
    servers: list[NbdServerProcess] = []

    def factory(exports: Sequence[dict[str, Any]], **kwargs: Any) -> NbdServerProcess:
        srv = NbdServerProcess(workdir, exports, **kwargs)
        servers.append(srv)
        return srv.start()

    def cleanup() -> None:
        for srv in servers:
            with contextlib.suppress(Exception):
                srv.cleanup()

    return factory, cleanup
