"""A pool volume served as an NBD backend: byte ranges over a block map.

A request is cut at chunk boundaries and each chunk asks the block map where
its bytes live (:meth:`BlockMap.lookup` for reads, :meth:`BlockMap.write_target`
for writes). Two paths:

- **Fast path** (callbacks, no task): every page the map needs is cached, the
  request is aligned to the device, and, for a write, every chunk is either
  written in place or covered whole by the request, so that it can go into a
  fresh chunk with no old bytes to copy (a first write, or a copy-on-write of a
  whole chunk: the common case with 4 KiB chunks). Reads become one AIO read
  per physically contiguous run (bridging short gaps: a run that continues
  after a few chunks mapped elsewhere is read with the gap in one read, and
  those chunks are read apart and copied over it), holes become hole chunks
  of the reply. Writes
  become one AIO write per run, fresh chunks claimed next to each other; the
  fresh chunks are mapped once every write of the request has completed, under
  the chunk locks, together with those of every other request whose writes
  completed in the same batch of AIO completions: one mini-transaction per
  batch. A one-chunk write into a fresh chunk (every 4 KiB write after a
  snapshot) has its own short path (``_write_fresh``). In-place writes with
  FUA use ``RWF_DSYNC``, taken only when no metadata change is pending: FUA promises
  that the mapping is durable too, so otherwise (and for FUA writes that map
  fresh chunks) the slow path commits after the write.
- **Slow path** (a coroutine): anything else. Copy-on-write (``Redirect``)
  writes the new chunk in full (old bytes or zeros around the new ones) and
  maps it only once the data is written, so a read racing with it sees the old
  chunk, and a crash before the next commit loses nothing already flushed.
  Chunk-level locks serialise copy-on-writes of one logical chunk, so two
  partial writes to one chunk cannot each copy the old chunk and lose the
  other's bytes. LVM-style ``CopyOut`` first preserves the chunk for each
  snapshot and commits that before overwriting it. A ``Claim`` (the chunk is
  no longer shared) commits first if metadata is pending: the reference that
  another volume just dropped may still be on disk, and a write in place
  would change what that volume reads after a crash. It then waits for every
  read begun before the claim (``Pool.reads_drained``): one of the volumes
  that shared the chunk may still be reading it. A write (or a WRITE_ZEROES
  that writes zeros) that finds no free chunk while chunks freed by a trim
  still wait for the commit that makes the trim durable commits, waits for
  them and tries again: right after a trim in a full pool they are the only
  free space (and a guaranteed volume must not see ENOSPC).

Every data transfer runs inside an I/O epoch (:mod:`nbdserver.pool.epochs`):
a chunk freed meanwhile is not reused until the transfer has ended. Reads are
counted apart from writes there, since claims wait for reads only.
TRIM and WRITE_ZEROES hold the chunk locks of the range while they unmap it,
so a write never loses the chunk it resolved (and reads) to a racing trim.

Snapshots and forks of an exported volume first *quiesce* it: new writes wait
and in-flight ones finish, so the copy is a point in time and no write can
land in a chunk after it became shared. In-flight means counted by the volume
(``_writes``) or, for the one-chunk in-place write, which skips that count,
inside an I/O epoch begun before the quiesce: so a quiesce also waits for the
pool's other transfers in flight (each a device I/O: a moment).

TRIM and WRITE_ZEROES unmap whole chunks (the freed chunks go back to the
pool) and write zeros over partial ones; with NO_HOLE they write zeros. A
FAST_ZERO that would have to write (NO_HOLE, part of a chunk, a linear
origin, whose chunks snapshots may read) is refused with ENOTSUP before
anything changes.
FLUSH and FUA commit the pool (:meth:`nbdserver.pool.pool.Pool.commit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import weakref
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from nbdserver.backend.base import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    STATE_HOLE,
    STATE_ZERO,
    Done,
    ReadChunk,
    ReadDone,
    ReadResult,
    StatusDone,
    StatusExtent,
)
from nbdserver.backend.ranges import RangeLocks
from nbdserver.blockmap.base import ASK, FRESH, HOLE, Claim, CopyOut, InPlace, Redirect, Run
from nbdserver.errors import NbdError
from nbdserver.pool.epochs import Epoch
from nbdserver.pool.format import FormatError, VolumeRecord
from nbdserver.pool.pages import PageMiss
from nbdserver.pool.pool import Pool
from nbdserver.storage.buffers import AlignedBuffer, zero_fill

log = logging.getLogger(__name__)

# The chunk locks of every volume exported from a pool (volume id -> locks), so that an
# LVM-style copy-out into another volume serialises with that volume's own writes.
_CHUNK_LOCKS: weakref.WeakKeyDictionary[Pool, dict[int, RangeLocks]] = weakref.WeakKeyDictionary()

STATUS_LIMIT = 1 << 30  # bytes one block-status reply describes at most
COLD_STATUS_CHUNKS = 8192  # chunks one reply describes when its map pages must be loaded
ZERO_STEP = 1 << 20  # bytes of zeros written per step (NO_HOLE; a linear fill)
# A read continues a physical run across at most this many bytes of other chunks (read
# and then overwritten): one larger device read instead of two, plus the small ones.
BRIDGE_BYTES = 64 << 10

# A fast write's plan: device writes (request offset, length, device offset), and the
# runs of fresh chunks it maps once they are written (logical chunk, physical chunk, count).
FastPlan = tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]


#: The metadata contexts a volume offers.
VOLUME_CONTEXTS: tuple[str, ...] = (BASE_ALLOCATION, ALLOCATION_DEPTH)


def preferred_block(chunk: int) -> int:
    """The block size a volume asks clients to prefer: its chunk (a write of a whole chunk
    never copies), 4 KiB for chunks above 64 KiB."""
    return max(4096, chunk if chunk <= 65536 else 4096)


class VolumeBackend:
    """NBD backend over one volume of an open pool; see the module note."""

    def __init__(self, pool: Pool, vol: VolumeRecord, *, read_only: bool = False,
                 description: str = "", user: str = "") -> None:
        self.pool = pool
        self.vol = vol
        self.map = pool.map
        self.engine = pool.engine
        self.buffers = pool.buffers
        self.epochs = pool.epochs
        self.size = vol.size
        self.read_only = read_only or vol.read_only
        self.description = description
        self.can_trim = True
        self.can_zero = True
        self.can_fast_zero = True
        self.rotational = False
        self.chunk = pool.chunk_size
        self.preferred_block = preferred_block(self.chunk)
        self.meta_contexts: tuple[str, ...] = VOLUME_CONTEXTS
        self._shift = self.chunk.bit_length() - 1
        self._fd = pool.device.fd
        self._data_start = pool.layout.data_start
        self._align_mask = pool.device.alignment - 1
        self._dirty_limit = pool.dirty_limit()  # (fixed while the pool is open)
        self._dirty_pages = pool.cache.dirty  # (len() of it: the dirty count, inline)
        self._locks = RangeLocks()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Fresh chunks written, waiting to be mapped at the end of this batch of I/O
        # completions (one mini-transaction for all), and what to call after.
        self._installs: list[tuple[list[tuple[int, int, int]],
                                   Callable[[NbdError | None], None]]] = []
        # One-chunk writes into fresh chunks (_write_fresh), written, waiting likewise:
        # (logical chunk, physical chunk, buffer, lock key, epoch, done).
        self._fresh: list[tuple[int, int, AlignedBuffer, int, Epoch, Done]] = []
        self._install_due = False  # _install_queued is registered for this batch's end
        self._writes = 0  # writes in flight (for quiescing)
        self._quiesced: asyncio.Event | None = None  # set while new writes must wait
        self._drained: asyncio.Event | None = None
        pool.quiesce[vol.id] = self._quiesce
        pool.backends_opened[vol.id] = pool.backends_opened.get(vol.id, 0) + 1
        _CHUNK_LOCKS.setdefault(pool, {})[vol.id] = self._locks
        pool.in_use[vol.id] = user or "exported"

    # -- reads -----------------------------------------------------------------------------

    def read(self, offset: int, length: int, done: ReadDone) -> None:
        if (offset | length) & self._align_mask:
            self._spawn_read(self._read_slow(offset, length), done)
            return
        shift = self._shift
        lc = offset >> shift
        last = (offset + length - 1) >> shift
        runs: list[Run] | None = None
        try:
            if last == lc:  # one chunk (a 4 KiB read): no run objects
                pc = self.map.chunk_at(self.vol, lc)
            else:
                runs = self.map.lookup(self.vol, lc, last - lc + 1)
        except PageMiss:
            self._spawn_read(self._read_slow(offset, length), done)
            return
        if runs is not None:
            first = runs[0]
            if len(runs) != 1 or first.pc == HOLE:
                self._read_runs(offset, length, runs, done)
                return
            pc = first.pc + lc - first.lc
        elif pc == HOLE:
            done(ReadResult(((offset, length, None),), None))
            return
        # One physically contiguous run (every small read): one AIO read, inline.
        buffers = self.buffers
        buf = buffers.get(length)
        epoch = self.epochs.current  # epochs.begin_read(), inline (the hottest path)
        epoch.reads += 1

        def complete(res: int) -> None:
            epoch.reads -= 1  # epochs.end_read(epoch), inline
            if not epoch.reads and epoch.closed_by is not None:
                epoch.closed_by.retire()
            if res != length:
                buffers.put(buf)
                err = -res if res < 0 else errno.EIO
                done(NbdError(err, f"read at {offset}: error {err}"))
            else:
                done(ReadResult(((offset, length, buf.view[:length]),),
                                lambda: buffers.put(buf)))

        self.engine.read(self._fd, buf, 0, length,
                         self._data_start + offset + ((pc - lc) << shift), complete)

    def _read_runs(self, offset: int, length: int, runs: list[Run], done: ReadDone) -> None:
        """Issue the AIO reads for `runs` (aligned request); completes `done`.

        Runs that continue one physical run across a short gap (a fork's rewritten chunks
        inside its parent's extent) are read as one device read over the gap, and the
        runs inside the gap (*patches*) are read into a side buffer and copied over it
        once everything has completed: fewer, larger device reads. The bytes read over
        the gap are never sent: each position there is a patch or a hole (sent as one).
        """
        chunk = self.chunk
        end = offset + length
        buf = self.buffers.get(length)
        chunks: list[ReadChunk] = []
        reads, patches = _plan_reads(runs, chunk, offset, end, BRIDGE_BYTES)
        side = self.buffers.get(sum(p[1] for p in patches)) if patches else None
        pending = [1]  # the extra count is dropped after submitting
        failed: list[int] = []
        epoch = self.epochs.begin_read()
        buffers = self.buffers

        def complete(res: int, want: int = 0) -> None:
            if res != want and not failed:
                failed.append(-res if res < 0 else errno.EIO)
            pending[0] -= 1
            if pending[0]:
                return
            self.epochs.end_read(epoch)
            if side is not None:
                if not failed:
                    at = 0
                    for s, n, _ in patches:
                        buf.view[s - offset:s - offset + n] = side.view[at:at + n]
                        at += n
                buffers.put(side)
            if failed:
                buffers.put(buf)
                done(NbdError(failed[0], f"read at {offset}: error {failed[0]}"))
            else:
                done(ReadResult(chunks, lambda: buffers.put(buf)))

        view = buf.view
        for run in runs:  # the reply: data where mapped, holes where not
            s = max(offset, run.lc * chunk)
            e = min(end, (run.lc + run.count) * chunk)
            if run.pc == HOLE:
                chunks.append((s, e - s, None))
            elif chunks and chunks[-1][2] is not None and chunks[-1][0] + chunks[-1][1] == s:
                prev = chunks.pop()
                chunks.append((prev[0], prev[1] + e - s, view[prev[0] - offset:e - offset]))
            else:
                chunks.append((s, e - s, view[s - offset:e - offset]))
        data_start = self._data_start
        fd = self._fd
        engine = self.engine
        for s, n, dev in reads:
            pending[0] += 1
            engine.read(fd, buf, s - offset, n, data_start + dev, partial(complete, want=n))
        at = 0
        for _, n, dev in patches:
            pending[0] += 1
            assert side is not None
            engine.read(fd, side, at, n, data_start + dev, partial(complete, want=n))
            at += n
        complete(0, 0)

    async def _read_slow(self, offset: int, length: int) -> ReadResult:
        """Any alignment; loads the map pages it needs."""
        shift = self._shift
        lc = offset >> shift
        count = ((offset + length - 1) >> shift) - lc + 1
        epoch = self.epochs.begin_read()
        try:
            runs = await self.pool.cache.run(lambda: self.map.lookup(self.vol, lc, count))
            buf = self.buffers.get(length)
            try:
                end = offset + length
                chunks: list[ReadChunk] = []
                reads = []
                for run in runs:  # every run's read at once, as the fast path does
                    s = max(offset, run.lc * self.chunk)
                    e = min(end, (run.lc + run.count) * self.chunk)
                    if run.pc == HOLE:
                        chunks.append((s, e - s, None))
                        continue
                    reads.append(self._read_device(buf, s - offset,
                                                   self._data_start + run.pc * self.chunk
                                                   + s - run.lc * self.chunk, e - s))
                    chunks.append((s, e - s, buf.view[s - offset:e - offset]))
                await _gather_all(reads)
            except BaseException:
                self.buffers.put(buf)
                raise
            return ReadResult(chunks, lambda: self.buffers.put(buf))
        finally:
            self.epochs.end_read(epoch)

    async def _read_device(self, dest: AlignedBuffer, at: int, device_offset: int,
                           length: int) -> None:
        """Read `length` bytes at any device offset into `dest` at `at`."""
        mask = self._align_mask
        start = device_offset & ~mask
        end = (device_offset + length + mask) & ~mask
        if start == device_offset and end == device_offset + length and not at & mask:
            n = await self.engine.aread(self._fd, dest, at, length, device_offset)
            if n != length:
                raise NbdError(errno.EIO, f"short read at {device_offset}")
            return
        tmp = self.buffers.get(end - start)
        try:
            n = await self.engine.aread(self._fd, tmp, 0, end - start, start)
            if n != end - start:
                raise NbdError(errno.EIO, f"short read at {start}")
            skip = device_offset - start
            dest.view[at:at + length] = tmp.view[skip:skip + length]
        finally:
            self.buffers.put(tmp)

    # -- writes ----------------------------------------------------------------------------

    def write(self, offset: int, data: memoryview, fua: bool, done: Done) -> None:
        length = len(data)
        if self._quiesced is None and not (offset | length) & self._align_mask:
            shift = self._shift
            lc = offset >> shift
            if (offset + length - 1) >> shift != lc:
                plan = self._plan_fast(offset, length, fua)
                if plan is not None:
                    self._write_fast(offset, data, plan, done, fua)
                    return
            elif not (self._locks.held and self._locks.unit_held(lc)):
                # One chunk (a 4 KiB write): one map walk, then one device write, in place
                # or into a fresh chunk. Anything else about one chunk (a claim, a partial
                # copy-on-write, FUA with metadata pending) is the slow path's.
                try:
                    pc = self.map.write_chunk(self.vol, lc)
                except PageMiss:
                    pc = ASK
                if pc >= 0:
                    if not (fua and self.pool.metadata_pending()):
                        # In place: one device write of the whole request, inline.
                        buffers = self.buffers
                        buf = buffers.get(length)
                        buf.view[:length] = data
                        epoch = self.epochs.current  # epochs.begin_write(), inline
                        epoch.writes += 1
                        # (not in self._writes: quiescing waits for its epoch instead)

                        def complete(res: int) -> None:
                            epoch.writes -= 1  # epochs.end_write(epoch), inline
                            if not epoch.writes and epoch.closed_by is not None:
                                epoch.closed_by.retire()
                            buffers.put(buf)
                            if res == length:
                                done(None)
                            else:
                                err = -res if res < 0 else errno.EIO
                                done(NbdError(err, f"write at {offset}: error {err}"))

                        self.engine.write(self._fd, buf, 0, length, self._data_start + offset
                                          + ((pc - lc) << shift), complete, fua)
                        return
                elif (pc == FRESH and length == self.chunk and not fua
                      and self._write_fresh(lc, data, done)):
                    return
        self._spawn(self._write_slow(offset, bytes(data), fua), done)

    def _plan_fast(self, offset: int, length: int, fua: bool) -> FastPlan | None:
        """The device writes of a request each chunk of which is written in place, or in
        full into a fresh chunk (a new or copied-on-write chunk needs no old bytes then),
        and the fresh chunks claimed for it; None when the slow path must do it.

        The map answers for the whole range at once (:meth:`BlockMap.write_runs`), and
        fresh chunks are claimed a run at a time, so a 1 MiB request costs a few runs,
        not 256 chunks. Returns (request offset, length, device offset) writes, merged
        where contiguous, and the fresh (logical chunk, physical chunk, count) runs.
        """
        pool = self.pool
        shift = self._shift
        chunk = self.chunk
        end = offset + length
        lc0 = offset >> shift
        lc1 = ((end - 1) >> shift) + 1
        if self._locks.held and self._locks.overlapping(lc0, lc1):
            return None
        try:
            targets = self.map.write_runs(self.vol, lc0, lc1 - lc0)
        except PageMiss:
            return None
        first = targets[0].target
        if len(targets) == 1 and isinstance(first, InPlace):  # the common case
            if fua and pool.metadata_pending():
                return None
            return [(offset, length, self._data_start + (first.pc - lc0) * chunk
                     + offset)], []
        redirects = False
        for r in targets:
            t = r.target
            if type(t) is InPlace:
                continue
            if (type(t) is Redirect and t.into == HOLE
                    and offset <= r.lc * chunk and (r.lc + r.count) * chunk <= end):
                redirects = True
                continue
            return None  # a claim, a copy-out, or a partial copy-on-write
        if fua and (redirects or pool.metadata_pending()):
            return None  # FUA must then commit: the slow path does
        fresh: list[tuple[int, int, int]] = []
        if redirects:
            if pool.cache.dirty_count >= self._dirty_limit:
                return None  # back-pressure (see Pool.run)
            try:
                with pool.cache.mtr():  # a PageMiss or ENOSPC gives the claims back
                    prev: int | None = None  # the chunk after the last claimed, if adjacent
                    for r in targets:
                        if type(r.target) is InPlace:
                            prev = None
                            continue
                        hint = prev if prev is not None else self.map.alloc_hint(self.vol, r.lc)
                        lc = r.lc
                        for pc, n in pool.claim_chunks(self.vol, hint, r.count):
                            fresh.append((lc, pc, n))
                            lc += n
                            prev = pc + n
            except (PageMiss, NbdError):
                return None
        writes: list[tuple[int, int, int]] = []
        data_start = self._data_start
        pieces: list[tuple[int, int, int]] = [  # (logical chunk, physical chunk, count)
            (r.lc, r.target.pc, r.count) for r in targets if type(r.target) is InPlace]
        if fresh:
            pieces = sorted(pieces + fresh)
        for lc, pc, n in pieces:
            s = max(offset, lc * chunk)
            e = min(end, (lc + n) * chunk)
            dev = data_start + pc * chunk + s - lc * chunk
            last = writes[-1] if writes else None
            if last is not None and last[2] + last[1] == dev and last[0] + last[1] == s:
                writes.pop()
                writes.append((last[0], last[1] + e - s, last[2]))
            else:
                writes.append((s, e - s, dev))
        return writes, fresh

    def _write_fresh(self, lc: int, data: memoryview, done: Done) -> bool:
        """Write one whole chunk into a fresh chunk (a 4 KiB copy-on-write, or a first
        write): claim it, write it, and map it with the other installs of this batch of
        completions. False (nothing done) when the slow path must do it."""
        pool = self.pool
        if len(self._dirty_pages) >= self._dirty_limit:
            return False  # back-pressure (see Pool.run)
        bmap = self.map
        try:  # (a claim changes no page: no mini-transaction to undo it)
            if bmap.next_fit:  # (no hint to ask for)
                pc = pool.claim_chunk_ahead(self.vol)
            else:
                pc = pool.claim_chunk(self.vol, bmap.alloc_hint(self.vol, lc))
        except (PageMiss, NbdError):
            return False
        length = len(data)
        buf = self.buffers.get(length)
        buf.view[:length] = data
        lock = self._locks.hold_unit(lc)  # write() saw it free, synchronously
        epoch = self.epochs.current  # epochs.begin_write(), inline
        epoch.writes += 1
        self._writes += 1

        def complete(res: int) -> None:
            if res == length:  # mapped, and then ended, by _install_queued
                if not self._install_due:
                    self._install_due = True
                    self.engine.after_completions(self._install_queued)
                self._fresh.append((lc, pc, buf, lock, epoch, done))
            else:
                err = -res if res < 0 else errno.EIO
                self._fresh_ended(pc, buf, lock, epoch, done,
                                  NbdError(err, f"write at {lc * self.chunk}: error {err}"))

        self.engine.write(self._fd, buf, 0, length, self._data_start + pc * self.chunk,
                          complete)
        return True

    def _fresh_ended(self, pc: int, buf: AlignedBuffer, lock: int, epoch: Epoch, done: Done,
                     error: NbdError | None) -> None:
        """End a :meth:`_write_fresh` (its chunk mapped, or given back on `error`)."""
        if error is not None:
            self.pool.data.unclaim(pc)
        self._locks.release(lock)
        self.epochs.end_write(epoch)
        self.buffers.put(buf)
        self._write_ended()
        done(error)

    def _queue_install(self, fresh: list[tuple[int, int, int]],
                       finish: Callable[[NbdError | None], None]) -> None:
        """Map `fresh` (written) and then call `finish`: with every other install queued
        in this batch of I/O completions, in one mini-transaction."""
        if not self._install_due:
            self._install_due = True
            self.engine.after_completions(self._install_queued)
        self._installs.append((fresh, finish))

    def _install_queued(self) -> None:
        """Map the fresh chunks written in this batch of completions, one-chunk writes
        (``_fresh``) and planned requests (``_installs``), in one mini-transaction, and
        answer them; what cannot be mapped at once goes on alone (``_install_one``)."""
        self._install_due = False
        chunks, self._fresh = self._fresh, []
        batch, self._installs = self._installs, []
        pool = self.pool
        limit = self._dirty_limit
        installed = 0  # of the batch
        mapped = 0  # of the one-chunk writes
        data = pool.data
        cache = pool.cache
        dirty = self._dirty_pages
        born: list[tuple[int, int]] = []  # the fresh chunks, counted at the end (one run)
        vol = self.vol
        try:
            with cache.mtr():
                frees = data.frees
                map_fresh_chunk = self.map.map_fresh_chunk
                for item in chunks:
                    if len(dirty) + mapped >= limit:  # (+ the refcount pages of `born`)
                        break  # the rest waits for a commit (see Pool.run)
                    map_fresh_chunk(vol, item[0], item[1], born)
                    mapped += 1
                charged = mapped
                if mapped == len(chunks):
                    born_pages = mapped  # refcount pages that counting them may dirty
                    map_fresh = self.map.map_fresh
                    for fresh, _ in batch:
                        if len(dirty) + born_pages >= limit:
                            break
                        for lc, pc, n in fresh:
                            if n == 1:
                                map_fresh_chunk(vol, lc, pc, born)
                                born_pages += 1
                            else:
                                map_fresh(vol, lc, pc, n, born)
                                born_pages += data.pages_spanned(pc, n)
                            charged += n
                        installed += 1
                if charged:
                    pool.charge(vol, charged - (data.frees - frees))
                data.incref_runs(born)
        except (PageMiss, NbdError):
            installed = mapped = 0  # nothing of the batch was kept
        if installed or mapped:
            pool.maybe_commit()
        if mapped:
            self._writes -= mapped  # self._write_ended(), inline (before any done: a
            if not self._writes and self._drained is not None:  # done that raised
                self._writes_drained()  # must not leave a quiesce waiting for ever)
            locks = self._locks
            buffers = self.buffers
            for _, _, buf, lock, epoch, done in chunks[:mapped]:
                locks.release(lock)
                epoch.writes -= 1  # epochs.end_write(epoch), inline
                if not epoch.writes and epoch.closed_by is not None:
                    epoch.closed_by.retire()
                buffers.put(buf)
                done(None)
        for _, finish in batch[:installed]:
            finish(None)
        # Each on its own: loading pages as needed, waiting for room in the journal, and
        # an error only for the write it belongs to.
        for lc, pc, buf, lock, epoch, done in chunks[mapped:]:
            self._install_one([(lc, pc, 1)],
                              partial(self._fresh_ended, pc, buf, lock, epoch, done))
        for fresh, finish in batch[installed:]:
            self._install_one(fresh, finish)

    def _install_one(self, fresh: list[tuple[int, int, int]],
                     finish: Callable[[NbdError | None], None]) -> None:
        pool = self.pool
        if pool.cache.dirty_count < self._dirty_limit:
            try:
                with pool.cache.mtr():
                    self._install(fresh)
            except PageMiss:
                pass  # load what the map needs, then install (below)
            except NbdError as e:
                finish(e)
                return
            else:
                pool.maybe_commit()
                finish(None)
                return
        self._spawn(pool.run(lambda: self._install(fresh)), finish)

    def _write_fast(self, offset: int, data: memoryview,
                    plan: FastPlan, done: Done,
                    fua: bool) -> None:
        """Write a planned request with callbacks only; fresh chunks are mapped in one
        mini-transaction once every write has completed (see the module note)."""
        runs, fresh = plan
        pool = self.pool
        length = len(data)
        buf = self.buffers.get(length)
        buf.view[:length] = data
        lock = None
        if fresh:
            lc0 = offset >> self._shift
            lock = self._locks.try_hold(lc0, ((offset + length - 1) >> self._shift) + 1)
            assert lock is not None  # _plan_fast saw no overlapping lock, synchronously
        pending = [len(runs)]
        failed: list[int] = []
        epoch = self.epochs.begin_write()
        self._writes += 1

        def finish(error: NbdError | None) -> None:
            if error is not None:
                for _, pc, n in fresh:
                    for unit in range(pc, pc + n):
                        pool.data.unclaim(unit)
            if lock is not None:
                self._locks.release(lock)
            self.epochs.end_write(epoch)
            self.buffers.put(buf)
            self._write_ended()
            done(error)

        def complete(res: int, want: int) -> None:
            if res != want and not failed:
                failed.append(-res if res < 0 else errno.EIO)
            pending[0] -= 1
            if pending[0]:
                return
            if failed:
                finish(NbdError(failed[0], f"write at {offset}: error {failed[0]}"))
            elif fresh:
                self._queue_install(fresh, finish)
            else:
                finish(None)

        for pos, n, dev in runs:
            self.engine.write(self._fd, buf, pos - offset, n, dev, partial(complete, want=n), fua)

    def _install(self, fresh: list[tuple[int, int, int]]) -> None:
        """Map freshly written runs of chunks (inside a mini-transaction)."""
        data = self.pool.data
        for lc, pc, n in fresh:
            frees = data.frees
            self.map.map_run(self.vol, lc, pc, n)
            self.pool.charge(self.vol, n - (data.frees - frees))

    async def _write_slow(self, offset: int, data: bytes, fua: bool) -> None:
        await self._wait_unquiesced()
        self._writes += 1
        epochs = [self.epochs.begin_write()]  # this write's I/O epoch (none while it waits)
        try:
            committed = await self._write_chunks_or_wait(epochs, offset, data, fua)
            if fua and (committed or self.pool.metadata_pending()):
                await self.pool.commit()  # the map of these chunks may not be durable yet
        finally:
            for epoch in epochs:
                self.epochs.end_write(epoch)
            self._write_ended()

    async def _write_chunks_or_wait(self, epochs: list[Epoch], offset: int,
                                    data: bytes | None, fua: bool, length: int = 0, *,
                                    holes_stay: bool = False) -> bool:
        """:meth:`_write_chunks`; on ENOSPC while chunks a trim freed wait for the commit
        that makes the trim durable (the only free space right after a trim in a full
        pool), or while a defrag window holds chunks, wait for those, make them reusable
        and try once more from the start. `epochs` holds the caller's I/O epoch, ended
        for the wait (which waits for it) and begun again; the write does not count as
        in flight meanwhile (a defrag window waits for those before it ends)."""
        try:
            return await self._write_chunks(offset, data, fua, length, holes_stay=holes_stay)
        except NbdError as e:
            if e.errno != errno.ENOSPC or not self.pool.frees_waiting():
                raise
        self.epochs.end_write(epochs.pop())
        self._write_ended()
        async with self.pool.space_wanted():
            try:
                await self.pool.reuse_freed()
                await self._wait_unquiesced()
            finally:
                self._writes += 1  # (in flight again: the caller's end counts it out)
            epochs.append(self.epochs.begin_write())
            return await self._write_chunks(offset, data, fua, length, holes_stay=holes_stay)

    async def _write_chunks(self, offset: int, data: bytes | None, fua: bool,
                            length: int = 0, *, holes_stay: bool = False) -> bool:
        """Write `data` (or `length` zeros) at `offset`, any alignment, any mapping state.
        With `holes_stay` (zeros: a trim's or unmapping zero's partial chunks), a chunk
        that holds nothing is left alone: it reads zeros, and stays a hole.

        The chunks of the request are resolved together, new chunks for the
        copy-on-write ones are claimed next to each other, the data goes out in as
        few writes as possible, and the new chunks are mapped in one
        mini-transaction once written. Returns True if the map changed (a commit
        makes it durable).
        """
        pool = self.pool
        shift = self._shift
        end = offset + (len(data) if data is not None else length)
        lc0 = offset >> shift
        lc1 = ((end - 1) >> shift) + 1
        changed = False
        async with self._locks.hold(lc0, lc1):
            resolved = await pool.cache.run(lambda: [
                self.map.write_target(self.vol, lc) for lc in range(lc0, lc1)])
            if holes_stay and all(type(t) is Redirect and t.old == HOLE for t in resolved):
                return False
            claims = [lc for lc, t in zip(range(lc0, lc1), resolved, strict=True)
                      if isinstance(t, Claim)]
            if claims:
                await self._claim(claims)
            targets = [InPlace(t.pc) if isinstance(t, Claim) else t for t in resolved]
            if any(isinstance(t, CopyOut) for t in targets):
                for lc, t in zip(range(lc0, lc1), targets, strict=True):
                    if isinstance(t, CopyOut):
                        for vid in t.preserve:
                            await self._preserve(vid, lc)
                await pool.commit()  # the copies are durable before the origin chunks change
                # The snapshots no longer read these chunks: claim them, and wait for their
                # reads of them begun before, as after a Claim.
                copied = [lc for lc, t in zip(range(lc0, lc1), targets, strict=True)
                          if isinstance(t, CopyOut)]

                def claim_copied() -> None:
                    for lc in copied:
                        self.map.claim(self.vol, lc)

                await pool.run(claim_copied)
                await pool.reads_drained()
                changed = True
                targets = [InPlace(t.pc) if isinstance(t, CopyOut) else t for t in targets]
            fresh = await pool.cache.run(lambda: self._claim_for(lc0, targets))
            owned = {lc0 + i for i, t in enumerate(targets)
                     if isinstance(t, Redirect) and t.into != HOLE}
            try:
                await self._write_planned(offset, end, lc0, targets, fresh, data, fua)
                if fresh:
                    def install() -> None:
                        for lc, pc in fresh.items():
                            frees = pool.data.frees
                            self.map.map(self.vol, lc, pc)
                            if lc not in owned and pool.data.frees == frees:
                                pool.charge(self.vol)

                    await pool.run(install)
                    changed = True
            except BaseException:
                for pc in fresh.values():
                    pool.data.unclaim(pc)
                raise
        return changed

    async def _claim(self, chunks: list[int]) -> None:
        """Claim chunks that stopped being shared (their writer holds their locks): on
        disk another volume may still map them, so commit first if anything is not
        durable, and wait for reads begun before (a volume that shared them may still be
        reading them); only then are they claimed, so a failed commit leaves no claim
        behind (a later write would go in place, over bytes the durable map shares)."""
        pool = self.pool
        if pool.metadata_pending():
            await pool.commit()
        await pool.reads_drained()

        def claim() -> None:
            for lc in chunks:
                self.map.claim(self.vol, lc)

        await pool.run(claim)

    def _claim_for(self, lc0: int, targets: list[InPlace | Redirect | CopyOut]) -> dict[int, int]:
        """Claim a new chunk for every Redirect target, contiguous where possible (a
        Redirect `into` a chunk the volume owns unwritten uses that chunk)."""
        fresh: dict[int, int] = {}
        prev: int | None = None
        for i, t in enumerate(targets):
            if isinstance(t, Redirect):
                lc = lc0 + i
                if t.into != HOLE:
                    prev = fresh[lc] = t.into
                    continue
                hint = prev + 1 if prev is not None else self.map.alloc_hint(self.vol, lc)
                prev = fresh[lc] = self.pool.claim_chunk(self.vol, hint)
            else:
                prev = None
        return fresh

    async def _write_planned(self, offset: int, end: int, lc0: int,
                             targets: list[InPlace | Redirect | CopyOut], fresh: dict[int, int],
                             data: bytes | None, fua: bool) -> None:
        """Lay the affected chunks out in one buffer and write them where they belong."""
        chunk = self.chunk
        mask = self._align_mask
        buf = self.buffers.get(len(targets) * chunk)
        try:
            writes: list[tuple[int, int, int]] = []  # (buffer offset, length, device offset)
            for i, t in enumerate(targets):
                lc = lc0 + i
                base = lc * chunk
                s = max(offset, base)
                e = min(end, base + chunk)
                at = i * chunk
                if isinstance(t, Redirect):
                    if e - s < chunk:
                        if t.old == HOLE:
                            zero_fill(buf, at, chunk)
                        else:
                            await self._read_device(buf, at, self._data_start + t.old * chunk,
                                                    chunk)
                    dev, n, boff = self._data_start + fresh[lc] * chunk, chunk, at
                else:
                    assert isinstance(t, InPlace)
                    dev = self._data_start + t.pc * chunk + (s - base)
                    n, boff = e - s, at + (s - base)
                    if (dev | n) & mask:  # partial device block: read-modify-write around it
                        ds = dev & ~mask
                        de = (dev + n + mask) & ~mask
                        await self._read_device(buf, boff - (dev - ds), ds, de - ds)
                        dev, boff, n = ds, boff - (dev - ds), de - ds
                if data is not None:
                    buf.view[at + s - base:at + e - base] = data[s - offset:e - offset]
                else:
                    zero_fill(buf, at + s - base, e - s)
                if writes and writes[-1][0] + writes[-1][1] == boff and \
                        writes[-1][2] + writes[-1][1] == dev:
                    last = writes.pop()
                    writes.append((last[0], last[1] + n, last[2]))
                else:
                    writes.append((boff, n, dev))
            await self._write_all(buf, writes, fua)
        finally:
            self.buffers.put(buf)

    async def _write_all(self, buf: AlignedBuffer, writes: list[tuple[int, int, int]],
                         fua: bool) -> None:
        """Issue every write at once and wait for all of them."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = [len(writes)]
        failed: list[int] = []

        def complete(res: int, want: int) -> None:
            if res != want and not failed:
                failed.append(-res if res < 0 else errno.EIO)
            pending[0] -= 1
            if not pending[0] and not fut.done():
                fut.set_result(None)

        for boff, n, dev in writes:
            self.engine.write(self._fd, buf, boff, n, dev, partial(complete, want=n), fua)
        self.engine.kick()
        await fut
        if failed:
            raise NbdError(failed[0], f"write failed: {failed[0]}")

    async def _preserve(self, vid: int, lc: int) -> None:
        """LVM copy-out: give volume `vid` its own copy of this volume's chunk `lc`.

        Holds that volume's chunk lock if it is exported here, so that its own write of
        the chunk cannot interleave with the copy; skipped if, by then, it no longer needs
        the copy (it wrote the chunk meanwhile, or it is being deleted). A backend of it
        opened during the copy has locks this one does not hold, so the copy is mapped
        only if, at that moment, the volume still reads this chunk (see _copy_out).
        """
        pool = self.pool
        locks = _CHUNK_LOCKS.get(pool, {}).get(vid)
        async with locks.hold(lc, lc + 1) if locks is not None else contextlib.nullcontext():
            target = await pool.cache.run(lambda: self.map.write_target(self.vol, lc))
            snap = pool.volumes.get(vid)
            if not isinstance(target, CopyOut) or vid not in target.preserve or snap is None:
                return
            if snap.deleted:
                # Being deleted (its promise of space already given back): no copy. The
                # commit the caller makes before writing in place makes the delete durable,
                # and then the snapshot never comes back.
                return
            await self._copy_out(snap, lc, target.pc)

    async def _copy_out(self, snap: VolumeRecord, lc: int, pc: int) -> None:
        pool = self.pool
        chunk = self.chunk
        new = await pool.cache.run(lambda: pool.claim_chunk(snap))
        try:
            buf = self.buffers.get(chunk)
            try:
                await self._read_device(buf, 0, self._data_start + pc * chunk, chunk)
                await self.engine.awrite(self._fd, buf, 0, chunk, self._data_start + new * chunk)
            finally:
                self.buffers.put(buf)

            def install() -> bool:
                # Still needed? A backend of the snapshot (a fork) opened after _preserve
                # looked for its chunk locks may have written the chunk meanwhile: its
                # own write must stay, and mapping the copy would throw it away.
                target = self.map.write_target(self.vol, lc)
                if not isinstance(target, CopyOut) or snap.id not in target.preserve:
                    return False
                self.map.map(snap, lc, new)
                pool.charge(snap)
                return True

            installed = await pool.run(install)
        except BaseException:
            pool.data.unclaim(new)
            raise
        if not installed:
            pool.data.unclaim(new)

    # -- trim and zero ---------------------------------------------------------------------------

    def trim(self, offset: int, length: int, fua: bool, done: Done) -> None:
        self._spawn(self._zero(offset, length, True, fua), done)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool,
             done: Done) -> None:
        if fast_only:  # (refused before anything is changed)
            why = None
            if not may_trim:
                why = "writing zeros without unmapping is not fast"
            elif offset & (self.chunk - 1) or (offset + length != self.size
                                               and length & (self.chunk - 1)):
                why = f"zeroing part of a {self.chunk}-byte chunk writes it: not fast"
            elif self.map.unmap_may_write(self.vol):
                why = "zeroing this volume may write its chunks (a linear origin): not fast"
            if why is not None:
                done(NbdError(errno.ENOTSUP, why))
                return
        self._spawn(self._zero(offset, length, may_trim, fua), done)

    async def _zero(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        await self._wait_unquiesced()
        self._writes += 1
        epochs = [self.epochs.begin_write()]
        try:
            end = offset + length
            if not may_trim:
                await self._write_zeros(epochs, offset, end)
            else:
                chunk = self.chunk
                first = -(-offset // chunk)
                # exclusive; a range to the volume's end covers its last chunk whole (no
                # byte past the end can be read)
                last = -(-end // chunk) if end == self.size else end // chunk
                if last > first:
                    await self._unmap(epochs, first, last - first)
                    ends = [(offset, first * chunk), (last * chunk, end)]
                else:  # within one chunk, or parts of two
                    mid = min(end, first * chunk)
                    ends = [(offset, mid), (mid, end)]
                # The parts of chunks at either end are written with zeros, but for a
                # chunk that holds nothing (it reads zeros already, and stays a hole).
                for s, e in ends:
                    if e > s:
                        await self._write_chunks_or_wait(epochs, s, None, False, e - s,
                                                         holes_stay=True)
            if fua:
                await self.pool.commit()
        finally:
            for epoch in epochs:
                self.epochs.end_write(epoch)
            self._write_ended()

    async def _unmap(self, epochs: list[Epoch], lc: int, count: int) -> None:
        """Unmap chunks [lc, lc+count); the ones the map says must be written with zeros
        instead (a linear origin's chunk a snapshot still reads) are, waiting for freed
        space as any write does (their copies for the snapshot need chunks). The I/O
        epoch in `epochs` begins again between steps (:meth:`_next_epoch`)."""
        while count > 0:
            async with self._locks.hold(lc, lc + count):  # no write of these chunks meanwhile
                done, fill = await self.pool.run(partial(self.pool.unmap, self.vol, lc, count))
            for flc, fcount in fill:
                await self._write_zeros(epochs, flc * self.chunk, (flc + fcount) * self.chunk)
            lc += done
            count -= done
            if count > 0:
                await self._next_epoch(epochs)

    async def _write_zeros(self, epochs: list[Epoch], pos: int, end: int) -> None:
        """Write zeros over [pos, end), ZERO_STEP bytes at a time (one I/O buffer each),
        with a new I/O epoch between steps."""
        while pos < end:
            n = min(ZERO_STEP, end - pos)
            await self._write_chunks_or_wait(epochs, pos, None, False, n)
            pos += n
            if pos < end:
                await self._next_epoch(epochs)

    async def _next_epoch(self, epochs: list[Epoch]) -> None:
        """Between two steps of a long TRIM or WRITE_ZEROES, which have no I/O under way
        there, end the I/O epoch in `epochs` and begin another, letting other requests
        run in between: one epoch over the whole request would keep every chunk freed
        meanwhile, by any volume, quarantined until it ends (memory, and space no write
        can take), and steps over a cached map may not yield at all."""
        self.epochs.end_write(epochs.pop())
        await asyncio.sleep(0)
        epochs.append(self.epochs.begin_write())

    # -- flush, cache, block status ----

    def flush(self, done: Done) -> None:
        self._spawn(self.pool.commit(), done)

    def cache(self, offset: int, length: int, done: Done) -> None:
        done(None)

    def block_status(self, offset: int, length: int, context: str, done: StatusDone) -> None:
        length = min(length, STATUS_LIMIT)
        shift = self._shift
        lc = offset >> shift
        count = ((offset + length - 1) >> shift) - lc + 1

        def answer(runs: list[Run]) -> None:
            try:
                done(self._status(offset, length, runs, context))
            except NbdError as e:
                done(e)

        try:
            runs = self.map.lookup(self.vol, lc, count)
        except PageMiss:
            # Cold: the pages it loads stay pinned until the lookup succeeds, so describe
            # less (a reply may be shorter than asked; clients ask again from its end),
            # and let few such lookups run at once, whatever the clients send. (`answer`
            # reads `length` when it runs: the shorter one.)
            count = min(count, COLD_STATUS_CHUNKS - (lc & (COLD_STATUS_CHUNKS - 1)))
            length = min(length, ((lc + count) << shift) - offset)
            task = asyncio.ensure_future(self._cold_lookup(lc, count))
            self._tasks.add(task)

            def finished(t: asyncio.Task[list[Run]]) -> None:
                self._tasks.discard(t)
                exc = t.exception()
                if exc is not None:
                    done(NbdError(getattr(exc, "errno", errno.EIO) or errno.EIO, str(exc)))
                else:
                    answer(t.result())

            task.add_done_callback(finished)
            return
        answer(runs)

    async def _cold_lookup(self, lc: int, count: int) -> list[Run]:
        async with self.pool.cold_lookups:
            return await self.pool.cache.run(lambda: self.map.lookup(self.vol, lc, count))

    def _status(self, offset: int, length: int, runs: list[Run],
                context: str) -> list[StatusExtent]:
        chunk = self.chunk
        end = offset + length
        out: list[StatusExtent] = []
        if context == BASE_ALLOCATION:
            def flags(run: Run) -> int:
                return STATE_HOLE | STATE_ZERO if run.pc == HOLE else 0
        elif context == ALLOCATION_DEPTH:
            chain = self.pool.ancestry(self.vol)

            def flags(run: Run) -> int:
                if run.pc == HOLE:
                    return 0
                return chain.index(run.owner) + 1 if run.owner in chain else 1
        else:
            raise NbdError(errno.EINVAL, f"unknown metadata context {context}")
        for run in runs:
            s = max(offset, run.lc * chunk)
            e = min(end, (run.lc + run.count) * chunk)
            f = flags(run)
            if out and out[-1][1] == f:
                out[-1] = (out[-1][0] + e - s, f)
            else:
                out.append((e - s, f))
        return out

    # -- quiescing (snapshots of an exported volume) ----

    async def _quiesce(self) -> Callable[[], None]:
        """Hold new writes and wait for those in flight; returns the function that resumes."""
        while self._quiesced is not None:
            await self._quiesced.wait()
        event = self._quiesced = asyncio.Event()

        def resume() -> None:
            self._quiesced = None
            event.set()

        try:
            if self._writes:
                self._drained = asyncio.Event()
                await self._drained.wait()
            # In-place writes are not counted in self._writes (one update fewer on the
            # commonest request): each holds its I/O epoch from its map lookup to its end.
            await self.pool.transfers_drained()
        except BaseException:  # (cancelled: the writes held meanwhile must go on)
            resume()
            raise
        return resume

    async def _wait_unquiesced(self) -> None:
        while self._quiesced is not None:
            await self._quiesced.wait()

    def _write_ended(self) -> None:
        self._writes -= 1
        if not self._writes and self._drained is not None:
            self._writes_drained()

    def _writes_drained(self) -> None:
        assert self._drained is not None
        self._drained.set()
        self._drained = None

    # -- plumbing ---------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], done: Done) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            exc = t.exception()
            done(None if exc is None else _as_nbd_error(exc))

        task.add_done_callback(finished)

    def _spawn_read(self, coro: Coroutine[Any, Any, ReadResult], done: ReadDone) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def finished(t: asyncio.Task[ReadResult]) -> None:
            self._tasks.discard(t)
            exc = t.exception()
            done(t.result() if exc is None else _as_nbd_error(exc))

        task.add_done_callback(finished)

    async def close(self) -> None:
        await self.drain()
        self.unregister()

    async def drain(self) -> None:
        """Wait until no task of this backend runs (each request's clients are answered
        by then; what a task does after answering, too)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))  # (never cancels them, unlike gather)

    def unregister(self) -> None:
        """Stop being the pool's user of the volume (after drain(), with no request left):
        it can then be deleted, or served by another backend."""
        self.pool.in_use.pop(self.vol.id, None)
        self.pool.quiesce.pop(self.vol.id, None)
        _CHUNK_LOCKS.get(self.pool, {}).pop(self.vol.id, None)


async def _gather_all(aws: list[Coroutine[Any, Any, None]]) -> None:
    """Run `aws` together; wait for every one (they share a buffer that the caller may
    release on error) and raise the first error."""
    if len(aws) == 1:
        await aws[0]
        return
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _plan_reads(runs: list[Run], chunk: int, offset: int, end: int,
                bridge: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Device reads for the mapped `runs` of the byte range [offset, end), as (request
    offset, length, data-area offset): *reads* into the request's buffer and *patches*
    read apart and copied over it afterwards.

    A run that continues the physical run of an earlier one (the same logical-to-physical
    shift) after at most `bridge` bytes joins its read, which then also covers the gap;
    the mapped runs inside the gap become patches. Holes need no read.
    """
    reads: list[tuple[int, int, int]] = []
    patches: list[tuple[int, int, int]] = []
    spans = [(max(offset, r.lc * chunk), min(end, (r.lc + r.count) * chunk),
              (r.pc - r.lc) * chunk) for r in runs if r.pc != HOLE]
    i, n = 0, len(spans)
    while i < n:
        s, e, shift = spans[i]
        last = i
        j = i + 1
        while j < n and spans[j][0] - e <= bridge:
            if spans[j][2] == shift:
                last, e = j, spans[j][1]
            j += 1
        reads.append((s, e - s, s + shift))
        patches += [(ps, pe - ps, ps + pshift) for ps, pe, pshift in spans[i + 1:last]
                    if pshift != shift]
        i = last + 1
    return reads, patches


def _as_nbd_error(exc: BaseException) -> NbdError:
    if isinstance(exc, NbdError):
        return exc
    if isinstance(exc, OSError):
        return NbdError(exc.errno or errno.EIO, str(exc))
    if isinstance(exc, FormatError):  # a damaged metadata page: said once, no traceback
        log.error("%s", exc)
        return NbdError(errno.EIO, str(exc))
    log.error("unexpected error in a volume request", exc_info=exc)
    return NbdError(errno.EIO, f"internal error: {exc}")
