"""Simulated power cuts: a crash that also loses the writes the disk was not told to keep.

kill -9 loses nothing the kernel was given, so it cannot show a missing
``fdatasync`` or writes in the wrong order. Here the pool runs in this process
on the thread I/O engine, where every write is an ``os.pwritev`` and every
barrier an ``os.fdatasync``, and both are logged as they happen on the pool
file. The workload is the kill -9 campaign's (:class:`crashharness.Run`: writes
of every alignment, FUA, trims, zeroes, flushes, checked reads) on two volumes,
while a snapshot, a fork (written at once: copy-on-write) and a delete run.

A *cut* at a moment of the run (at least twelve, at most twenty-four, before,
during and after the volume operations) builds the image a disk could hold if the
power went off then: every write a completed ``fdatasync`` covered (or that had
``RWF_DSYNC`` itself), then a random subset of the other writes begun before
the cut, one of them torn at a sector. Each image is opened (recovery),
checked (no problem, no leak), its catalog compared with the volume
operations answered by then, and every volume read back against what had
been promised by then (:mod:`crashmodel`).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from crashharness import Campaign, PendingOp, Run
from crashmodel import VolumeModel, find_origin
from nbdclient import NbdReplyError

from nbdserver.blockmap.base import designs
from nbdserver.pool.pool import Pool
from nbdserver.protocol import constants as c
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.engine import ThreadEngine
from nbdserver.volume import VolumeBackend

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
VOLUME = 4 * MiB
CUTS = 12


@dataclass
class Write:
    start: int  # log positions: when the syscall began and returned
    offset: int
    data: bytes
    dsync: bool
    end: int | None = None


class DiskLog:
    """Every pwritev and fdatasync on one file, in the order they happen (thread safe)."""

    def __init__(self, path: Path) -> None:
        st = os.stat(path)
        self.ident = (st.st_dev, st.st_ino)
        self.lock = threading.Lock()
        self.clock = 0
        self.writes: list[Write] = []
        self.syncs: list[tuple[int, int]] = []  # (began, returned)

    def tick(self) -> int:
        with self.lock:
            self.clock += 1
            return self.clock

    def ours(self, fd: int) -> bool:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == self.ident

    def install(self, mp: pytest.MonkeyPatch) -> None:
        real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

        def pwritev(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
            if not self.ours(fd):
                return real_pwritev(fd, buffers, offset, flags)
            w = Write(self.tick(), offset, b"".join(bytes(b) for b in buffers),
                      bool(flags & os.RWF_DSYNC))
            with self.lock:
                self.writes.append(w)
            n = real_pwritev(fd, buffers, offset, flags)
            w.data = w.data[:n]
            w.end = self.tick()
            return n

        def fdatasync(fd: int) -> None:
            if not self.ours(fd):
                return real_fdatasync(fd)
            began = self.tick()
            real_fdatasync(fd)
            returned = self.tick()
            with self.lock:
                self.syncs.append((began, returned))
            return None

        mp.setattr(os, "pwritev", pwritev)
        mp.setattr(os, "fdatasync", fdatasync)

    def image(self, initial: Path, out: Path, cut: int, rng: random.Random) -> str:
        """Write to `out` what the disk may hold after a power cut at `cut`; says what it kept."""
        with self.lock:
            writes = sorted((w for w in self.writes if w.start < cut), key=lambda w: w.start)
            synced = max((b for b, e in self.syncs if e < cut), default=0)
        durable = [w for w in writes if w.end is not None and w.end < cut
                   and (w.end < synced or w.dsync)]
        maybe = [w for w in writes if w not in durable]
        kept = {id(w) for w in durable}
        kept.update(id(w) for w in maybe if rng.random() < 0.5)
        torn = rng.choice(maybe) if maybe and rng.random() < 0.7 else None
        out.write_bytes(initial.read_bytes())
        fd = os.open(out, os.O_WRONLY)
        try:
            for w in writes:  # in the order they began: a later write covers an earlier one
                if w is torn:
                    for s in range(0, len(w.data), SECTOR):
                        if rng.random() < 0.5:
                            os.pwrite(fd, w.data[s:s + SECTOR], w.offset + s)
                elif id(w) in kept:
                    os.pwrite(fd, w.data, w.offset)
        finally:
            os.close(fd)
        return (f"{len(durable)} durable writes, {len(kept) - len(durable)} of {len(maybe)} "
                f"others{', one torn' if torn else ''}")


class BackendClient:
    """The part of the NBD client :class:`crashharness.Run` uses, on a VolumeBackend."""

    def __init__(self, backend: VolumeBackend) -> None:
        self.backend = backend

    def submit(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
               data: bytes = b"") -> asyncio.Future[object]:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fua = bool(flags & c.CMD_FLAG_FUA)

        def done(err: Any) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(NbdReplyError(getattr(err, "errno", 5) or 5, str(err)))
            else:
                fut.set_result(None)

        def read_done(result: Any) -> None:
            if not hasattr(result, "chunks"):
                done(result)
                return
            out = bytearray(length)
            for start, n, view in result.chunks:
                if view is not None:
                    out[start - offset:start - offset + n] = view
            result.release()
            fut.set_result(bytes(out))

        b = self.backend
        if cmd == c.CMD_WRITE:
            b.write(offset, memoryview(data), fua, done)
        elif cmd == c.CMD_READ:
            b.read(offset, length, read_done)
        elif cmd == c.CMD_TRIM:
            b.trim(offset, length, fua, done)
        elif cmd == c.CMD_WRITE_ZEROES:
            b.zero(offset, length, may_trim=not flags & c.CMD_FLAG_NO_HOLE, fast_only=False,
                   fua=fua, done=done)
        elif cmd == c.CMD_FLUSH:
            b.flush(done)
        else:
            raise ValueError(cmd)
        return fut

    async def drain(self) -> None:
        pass


class NoServer:
    """What Run asks of the server process: nothing to kill here, the cut is simulated."""

    stderr = ""

    def signal(self, sig: int) -> None:
        pass


@dataclass
class Cut:
    """A moment of the run: the log position and what had been promised by then."""

    at: int
    models: dict[str, VolumeModel]
    may_exist: dict[str, VolumeModel] = field(default_factory=dict)  # operations under way
    may_be_gone: set[str] = field(default_factory=set)


def frozen(m: VolumeModel, name: str | None = None) -> VolumeModel:
    """A copy of `m` as it is now, read as after a crash."""
    out = VolumeModel(name or m.name, m.size, bytearray(m.base), snapshot=m.snapshot,
                      parent=m.parent)
    out.events = [replace(ev, volume=out.name) for ev in m.events]
    out.uncertain = True
    return out


def take_cut(campaign: Campaign, log: DiskLog, pending: list[PendingOp]) -> Cut:
    cut = Cut(log.tick(), {n: frozen(m) for n, m in campaign.models.items()})
    for op in pending:
        if op.kind == "delete":
            cut.may_be_gone.add(op.name)
            continue
        assert op.model is not None and op.source is not None
        m = frozen(op.model, op.name)
        if op.written:  # the source's requests sent since may or may not be in the copy
            more = [*op.maybe, *campaign.models[op.source].events[op.events_from:]]
            m.events += [replace(ev, volume=op.name, durable=False) for ev in more]
        cut.may_exist[op.name] = m
    return cut


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Pool]:
    engine = ThreadEngine(asyncio.get_running_loop())
    try:
        pool = await Pool.open(path, engine, BufferPool())
        try:
            yield pool
        finally:
            if not pool.closed:
                pool.abandon()
    finally:
        engine.close()


async def check_image(path: Path, cut: Cut, what: str) -> None:
    async with opened(path) as pool:
        report = await pool.check()
        assert report.ok and not report.leaked_chunks and not report.leaked_pages, (
            f"{what}: pool check: {report.problems[:10]}")
        live = {v.name for v in pool.live_volumes()}
        must = set(cut.models) - cut.may_be_gone
        allowed = set(cut.models) | set(cut.may_exist)
        assert must <= live <= allowed, (
            f"{what}: catalog {sorted(live)}; must hold {sorted(must)}, may hold "
            f"{sorted(allowed)}")
        for name in sorted(live):
            model = cut.models.get(name) or cut.may_exist[name]
            backend = VolumeBackend(pool, pool.volume(name))
            client = BackendClient(backend)
            actual = bytearray()
            for off in range(0, model.size, MiB):
                data = await client.submit(c.CMD_READ, off, min(MiB, model.size - off))
                assert isinstance(data, bytes)
                actual += data
            await backend.close()
            bad = model.check(bytes(actual))
            others = [*cut.models.values(), *cut.may_exist.values()]
            assert not bad, f"{what}: {name!r} read back wrong:\n" + "\n".join(
                m.describe(find_origin(m.actual, others)) for m in bad)


async def workload(pool: Pool, campaign: Campaign, log: DiskLog,
                   cuts: list[Cut]) -> None:
    """Two volumes written while a snapshot, a fork (then written) and a delete happen;
    cuts taken at random moments, during the volume operations too."""
    rng = campaign.rng
    backends: dict[str, VolumeBackend] = {}
    for name in ("v0", "v1"):
        backends[name] = VolumeBackend(pool, await pool.create_volume(name, VOLUME))
        campaign.models[name] = VolumeModel(name, VOLUME)
        campaign.writable.add(name)
    clients = {n: BackendClient(b) for n, b in backends.items()}
    run = Run(campaign, NoServer(), clients, ["v0", "v1"], "timer",  # type: ignore[arg-type]
              seconds=60)
    run.inflight["f2"] = []
    pending: list[PendingOp] = []
    slots = [asyncio.ensure_future(run.slot(n)) for n in ("v0", "v1") for _ in range(3)]

    async def operation(op: PendingOp, call: Callable[[], Any]) -> None:
        campaign.op_begin(run, op)
        pending.append(op)
        await call()
        pending.remove(op)
        campaign.op_end(op, answered=True)

    async def operations() -> None:
        await asyncio.sleep(0.2)
        await operation(PendingOp("snapshot", "s1", source="v0"),
                        lambda: pool.clone_volume("v0", "s1", snapshot=True))
        await asyncio.sleep(0.1)
        await operation(PendingOp("fork", "f2", source="v1"),
                        lambda: pool.clone_volume("v1", "f2", snapshot=False))
        backends["f2"] = VolumeBackend(pool, pool.volume("f2"))
        clients["f2"] = BackendClient(backends["f2"])
        run.written.append("f2")
        run.burst.add("f2")  # copy-on-write of the fork's shared chunks, at once
        slots.extend(asyncio.ensure_future(run.slot("f2")) for _ in range(3))
        await asyncio.sleep(0.2)
        await operation(PendingOp("delete", "s1"), lambda: pool.delete_volume("s1"))

    ops = asyncio.ensure_future(operations())
    try:
        while not ops.done() or len(cuts) < CUTS:  # before, during and after the operations
            await asyncio.sleep(rng.uniform(0.0, 0.08))
            cuts.append(take_cut(campaign, log, pending))
        await ops
    finally:
        run.stopping = True
        await asyncio.gather(*slots, ops, return_exceptions=True)
    for task in (*slots, ops):
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    for backend in backends.values():
        await backend.close()


@pytest.mark.slow
@pytest.mark.parametrize("design", sorted(designs()))
async def test_power_cut_at_random_moments_keeps_what_was_promised(
        design: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(1 << 31))
    where = f"[{design} seed={seed}]"
    path, initial = tmp_path / "pool.img", tmp_path / "initial.img"
    Pool.create(path, 32 * MiB, blockmap=design, journal_bytes=1 * MiB)
    initial.write_bytes(path.read_bytes())
    campaign = Campaign(tmp_path, design, seed, factory=None,  # type: ignore[arg-type]
                        iterations=0, volume_size=VOLUME)
    log = DiskLog(path)
    cuts: list[Cut] = []
    with monkeypatch.context() as mp:
        log.install(mp)
        engine = ThreadEngine(asyncio.get_running_loop())
        try:
            pool = await Pool.open(path, engine, BufferPool())
            await workload(pool, campaign, log, cuts)
            pool.abandon()
        finally:
            engine.close()
    assert len(cuts) >= CUTS and log.syncs and campaign.stats.acked > 0
    assert campaign.stats.ops_ok == 3
    rng = random.Random(seed)
    if len(cuts) > 2 * CUTS:  # keep the test short: a sample, in order
        cuts = [cuts[i] for i in sorted(rng.sample(range(len(cuts)), 2 * CUTS))]
    image = tmp_path / "cut.img"
    for i, cut in enumerate(cuts):
        kept = log.image(initial, image, cut.at, rng)
        await check_image(image, cut, f"{where} cut {i + 1} at log position {cut.at} ({kept})")
