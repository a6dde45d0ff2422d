"""A pool: one file or block device holding many thin, forkable volumes.

This module ties the format together: opening (locking, choosing a superblock,
replaying the journal), the volume catalog, commits, and the volume operations
(create, snapshot, fork, delete) that change the catalog and ask the block map
to do its part. Data transfers are the volume layer's job
(:mod:`nbdserver.volume`).

**Commits** (FLUSH, FUA, volume operations, and whenever enough metadata is
dirty) follow one order, so that a map never points at data that is not on
disk and a crash at any instant recovers the last commit:

1. snapshot the dirty metadata pages (synchronously: a consistent state);
2. ``fdatasync``: every data write whose chunk those pages map has completed
   before it was mapped, so now it is durable;
3. write the journal record with ``RWF_DSYNC``; now the commit is durable;
4. release the chunks freed before the snapshot (quarantine), and write the
   page images home in the background.

**A failed commit stops the pool committing** (fail-stop, as a file system
aborts its journal): once the snapshot of step 1 is taken, its pages are no
longer dirty, so a commit that fails after it cannot simply be retried, and
after a failed ``fdatasync`` the device may have dropped data that a later
``fdatasync`` would not report. So any error in a commit, or in writing a
page home, marks the pool *failed*: every later commit (FLUSH, FUA, volume
operations) fails with EIO instead of claiming durability, the pages not
written home stay in memory (they are never read back stale from their home),
reads go on, and a restart recovers the last durable commit from the journal.

The pool is locked (``flock``) while open; a second process gets a clear error.
Offline tools (the CLI) open the pool with a synchronous page reader, so that
block-map code never has to wait for a page there.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import errno
import fcntl
import logging
import os
import re
import stat
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from nbdserver.blockmap.base import HOLE, BlockMap, MapStats, Run, design
from nbdserver.errors import NbdError, PoolDamaged, UsageError, UserError, some_names
from nbdserver.pool import journal
from nbdserver.pool.epochs import IoEpochs
from nbdserver.pool.format import (
    CATALOG_RECORD_SIZE,
    DEFAULT_CHUNK,
    MAX_VOLUME_NAME,
    PAGE_HEADER_SIZE,
    PAGE_SIZE,
    PT_CATALOG,
    PT_REFCOUNT,
    PT_STATE,
    RECORDS_PER_CATALOG_PAGE,
    SUPERBLOCK_COPIES,
    VF_DELETED,
    VF_DELETING,
    VF_GUARANTEE,
    VF_IN_USE,
    VF_READ_ONLY,
    VF_SNAPSHOT,
    VOLUME_NAME_RULE,
    FormatError,
    Layout,
    NotAPool,
    PoolState,
    PoolTooSmall,
    Superblock,
    VolumeRecord,
    min_pool_size,
    plan_layout,
    verify_page,
)
from nbdserver.pool.pages import PageCache
from nbdserver.pool.space import Recount, RefTable
from nbdserver.sizes import format_size, not_whole_sectors
from nbdserver.storage.buffers import AlignedBuffer, BufferPool
from nbdserver.storage.device import PREALLOCATE_MODES, BlockDevice, open_device
from nbdserver.storage.engine import IoEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CACHE_BYTES = 64 << 20
FREED_COMMIT = 1 << 16  # chunks freed since the last commit that start one (about 5 MiB)
FREED_LIMIT = 1 << 18  # ... at which metadata operations wait for one (about 21 MiB)
COLD_LOOKUPS = 4  # block-status lookups that may load (and pin) map pages at once
MAX_VOLUMES = 1 << 20  # the most a catalog may hold (65,536 pages of records)
STATS_GROWTH = 64  # volume_stats: slices over holes and long runs grow up to this many times
MAX_RECORD_PAGES = (32 << 20) // PAGE_SIZE  # a commit's record, in one buffer (32 MiB)
CHECK_PROGRESS = 1 << 16  # check: chunk references counted between two progress calls
STATS_TURN = 0.002  # volume_stats: seconds of work between two turns of the event loop
# (while volumes have I/O in flight, it then rests as long as it worked: clients first)
# Opening reads every reference-count page to count free space; up to 1/PRELOAD_SHARE of
# the cache keeps them (the data table's first: allocations and sharing changes read them).
PRELOAD_SHARE = 4
RELEASE_BUDGET = 2048  # map entries released per mini-transaction when deleting
OVERWRITE_CHECK_BYTES = 1 << 20  # pool create: a block device must be zeros this far
# A server waits this long for the pool's lock: a process killed a moment ago may hold it
# until the kernel has finished with its files. (The CLI does not wait: a held lock tells
# it a server has the pool open, and it asks that server instead.)
SERVER_LOCK_WAIT_SECONDS = 3.0
# A delete waits this long for a served volume to be let go (its client has just left: the
# server may not have seen the connection close yet), then refuses.
IN_USE_WAIT_SECONDS = 1.0
IN_USE_POLL_SECONDS = 0.01
LOCK_RETRY_SECONDS = 0.02
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # (fullmatch: no trailing newline)


def check_volume_name(name: str) -> None:
    if not NAME_RE.fullmatch(name) or len(name.encode()) > MAX_VOLUME_NAME:
        raise UserError(
            f"invalid volume name {name!r}: use {VOLUME_NAME_RULE}")


class _QuiesceAgain(Exception):
    """A clone's source got a backend that the clone did not quiesce (Pool.clone_volume)."""


class _NoRoomToPromise(UserError):
    """A guarantee the pool cannot promise now (see Pool._reserve)."""


@contextlib.contextmanager
def _refused_for_lack_of_pages(what: str) -> Iterator[None]:
    """A create or clone whose map needs a page that may not be taken (ENOSPC) is refused
    as a UserError, as any other create or clone the pool cannot make."""
    try:
        yield
    except NbdError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"{what}: {e}") from None


class PoolBusy(UserError):
    """The pool is locked by another process (a running server, usually)."""


@dataclass
class CheckReport:
    """What `pool check` found. ``ok`` when there is no problem."""

    problems: list[str] = field(default_factory=list)
    # Valid but degraded (a damaged superblock copy: the other one serves): not problems.
    warnings: list[str] = field(default_factory=list)
    volumes: int = 0
    data_chunks_referenced: int = 0
    metadata_pages_referenced: int = 0
    # None: unknown (a map could not be read whole, so what it would reference is too)
    leaked_chunks: int | None = 0
    leaked_pages: int | None = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class Gauge:
    """A count of things under way that can be waited on to reach zero."""

    __slots__ = ("_zero", "count")

    def __init__(self) -> None:
        self.count = 0
        self._zero: asyncio.Event | None = None  # made only when someone waits

    def add(self, n: int) -> None:
        self.count += n
        if not self.count and self._zero is not None:
            self._zero.set()
            self._zero = None

    async def zero(self) -> None:
        while self.count:
            if self._zero is None:
                self._zero = asyncio.Event()
            await self._zero.wait()


class Pool:
    """An open pool. Create one with :meth:`create`, open it with :meth:`open`."""

    def __init__(self, device: BlockDevice, sb: Superblock, engine: IoEngine,
                 buffers: BufferPool, cache_bytes: int, offline: bool) -> None:
        self.device = device
        self.path = device.path
        self.sb = sb
        self.layout: Layout = sb.layout
        self.chunk_size = sb.chunk_size
        self.engine = engine
        self.buffers = buffers
        self.offline = offline
        self.cache = PageCache(cache_bytes // PAGE_SIZE, self._read_page, self._read_pages)
        if offline:
            self.cache.sync_reader = self._read_page_sync
        self.data = RefTable(self.cache, self.layout.data_ref_start, self.layout.data_chunks,
                             "data chunk", quarantine_frees=True)
        self.meta = RefTable(self.cache, self.layout.meta_ref_start, self.layout.meta_pages,
                             "metadata page")
        self.state = PoolState()
        self.epochs = IoEpochs()
        self.volumes: dict[int, VolumeRecord] = {}
        self._catalog_kept: set[int] = set()  # catalog pages pinned: those holding records
        # block-status lookups loading map pages, which stay pinned until each succeeds
        self.cold_lookups = asyncio.Semaphore(COLD_LOOKUPS)
        try:
            self.map: BlockMap = design(sb.blockmap)(self)
        except ValueError as e:  # (parameters out of range, or unknown features)
            raise FormatError(f"block map {sb.blockmap!r}: {e}") from None
        self.ring = journal.JournalRing(self.layout.journal_pages, sb.journal_tail,
                                        sb.journal_tail, sb.journal_seq)
        self._commit_lock = asyncio.Lock()
        self._home_writes = 0
        self._home_done = asyncio.Event()
        self._home_done.set()
        self._background: set[asyncio.Task[Any]] = set()
        self.in_use: dict[int, str] = {}  # volume id -> what uses it (an export)
        self._pages_promised: int | None = None  # (see pages_promised; None: count again)
        # volume id -> chunks its unmaps freed, and times it was cloned, since the pool
        # opened (never rolled back: see _shrink_promise, for which more is only safer)
        self._unmap_frees: dict[int, int] = {}
        self._clones_of: dict[int, int] = {}
        self.quiesce: dict[int, Callable[[], Awaitable[Callable[[], None]]]] = {}
        # volume id -> backends opened on it so far: a long operation that paused the
        # volume's writes (defrag) sees whether one opened since, unpaused.
        self.backends_opened: dict[int, int] = {}
        # Chunks claimed by defrag windows in progress (free again or installed when each
        # ends): a write that finds no space meanwhile waits for them (reuse_freed), and
        # no window starts while such a write waits (space_wanted).
        self.defrag_claims = Gauge()
        self.space_waiters = Gauge()
        self.stats_slice = 0  # chunks per step of volume_stats (0: the design's choice)
        self.closed = False
        self.commits = 0
        self.failed: str | None = None  # why the pool stopped committing (module note)
        self._stage = ""  # the step a commit is at (for the reason it failed)

    # -- creating and opening -----------------------------------------------------------------

    @staticmethod
    def create(path: str | Path, size: int | None, *, blockmap: str = "radix",
               chunk_size: int = DEFAULT_CHUNK, map_params: tuple[int, int, int, int] | None = None,
               max_volumes: int = 4096, journal_bytes: int | None = None,
               preallocate: bool | str = False, make_parents: bool = False,
               force: bool = False,
               progress: Callable[[int, int], None] | None = None) -> Superblock:
        """Write a new, empty pool to `path` (a new file, or a block device). Blocking.
        A new file is sparse unless `preallocate`: "falloc" (or True) allocates its
        blocks, "full" also writes zeros over them, calling ``progress(done, total)``
        (see BlockDevice.preallocate). With
        `make_parents`, missing directories above a new file are made (and removed
        again if the create fails); without, a missing directory is an error. A block
        device is used whole (`size` must be None or its size), and one that holds a
        pool or any other data in its first MiB is refused unless `force`."""
        if not str(path):
            raise UserError("the pool path is empty")
        mode = "falloc" if preallocate is True else preallocate or "off"
        if mode not in ("off", *PREALLOCATE_MODES):
            raise ValueError(f"unknown preallocation {preallocate!r}")
        path = Path(path)
        try:
            cls = design(blockmap)
            params = cls.new_pool_params(map_params or cls.default_params())
            cls.check_params(params)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not 1 <= max_volumes <= MAX_VOLUMES:
            raise UserError(f"max volumes must be from 1 to {MAX_VOLUMES}, got {max_volumes}")
        if path.is_dir():
            raise UserError(f"{path} is a directory (give the path of a new file or of a "
                            "block device)")
        if path.exists() and not (path.is_file() or path.is_block_device()):
            raise UserError(f"{path}: not a regular file or block device")
        if path.exists() and not path.is_block_device() and path.stat().st_size:
            raise UserError(f"{path} already exists; refusing to overwrite it "
                            + ("(it is a pool: 'nbdserver pool info' shows it)"
                               if _holds_a_pool(path) else
                               "(delete it first to create a new pool)"))

        asked = size  # (a size given is a mistake to fix; a device's, a fact)

        def plan(size: int) -> Layout:
            try:
                return plan_layout(size, chunk_size, max_volumes=max_volumes,
                                   journal_bytes=journal_bytes)
            except PoolTooSmall:
                least = min_pool_size(size, chunk_size, max_volumes=max_volumes,
                                      journal_bytes=journal_bytes)
                assert least is not None  # (this size did not fit)
                error = UsageError if asked is not None else UserError
                raise error(f"{path}: a pool of {format_size(size)} is too small: with "
                                f"{format_size(chunk_size)} chunks and room for "
                                f"{max_volumes} volumes it needs at least {least} bytes (for "
                                f"example {-(-least // (1 << 20))}M)") from None
            except ValueError as e:
                raise UserError(f"{path}: {e}") from None

        made = grown = False  # (what to undo if the create fails)
        dirs: list[Path] = []  # directories made for the file, deepest last
        holder: int | None = None  # a file's descriptor holding the lock while it is made
        if path.exists() and path.is_block_device():
            device = open_device(path)
            try:
                _lock(device)
                if size is not None and size != device.size:
                    raise UsageError(f"{path} is a block device of {format_size(device.size)}: "
                                    "a pool takes the whole device (leave out --size)")
                if not force:
                    _refuse_to_overwrite(device, path)
            except BaseException:
                device.close()
                raise
        else:
            if size is None:
                raise UserError("--size is required to create a pool in a file")
            plan(size)  # a mistake found before anything is written
            try:
                made = _create_exclusive(path, dirs if make_parents else None)
            except BaseException:
                _undo_create(path, None, False, False, dirs)  # (the directories it made)
                raise
            try:
                try:
                    holder = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except OSError as e:
                    raise UserError(f"{path}: cannot open: {e.strerror}") from None
                _flock(holder, path)  # before growing: another process may hold it
                if os.fstat(holder).st_size:  # filled by another process meanwhile
                    raise UserError(f"{path} already exists; refusing to overwrite it")
                try:
                    os.ftruncate(holder, size)
                except OSError as e:
                    raise UserError(f"{path}: cannot grow to {size} bytes: {e.strerror}") \
                        from None
                grown = True
                device = open_device(path)
            except BaseException:
                _undo_create(path, holder, made, grown, dirs)
                raise
        try:
            layout = plan(device.size)
            if mode != "off":
                device.preallocate(full=mode == "full", progress=progress)
            head = layout.meta_start * PAGE_SIZE
            if device.is_block_device:
                device.write_zeroes(0, head, may_deallocate=False)
            sb = Superblock(uuid=uuidlib.uuid4().bytes, seq=1, page_size=PAGE_SIZE,
                            chunk_size=chunk_size, blockmap=blockmap, size=device.size,
                            layout=layout, journal_tail=0, journal_seq=1,
                            map_params=params, created_ns=time.time_ns())
            state = PoolState()
            page = bytearray(PAGE_SIZE)
            state.pack_into(page)
            from nbdserver.pool.format import seal_page
            seal_page(layout.state_page, page, PT_STATE, 0)
            _write_page_sync(device, layout.state_page, page)
            # Clear the first journal page so that no stale record can follow the tail.
            _write_page_sync(device, layout.journal_start, bytes(PAGE_SIZE))
            device.flush()
            # Copy `seq % 2` holds each seq (see _write_superblock): seq 2 in copy 0 is
            # the newest, and the first checkpoint (seq 3) goes over copy 1.
            for copy in range(SUPERBLOCK_COPIES):
                _write_page_sync(device, copy, replace(sb, seq=SUPERBLOCK_COPIES - copy).pack())
            device.flush()
            made = grown = False  # a pool now: kept
            dirs.clear()
            return replace(sb, seq=SUPERBLOCK_COPIES)
        except OSError as e:  # a read-only device, a device error
            raise UserError(f"{path}: cannot write the new pool: "
                            f"{e.strerror or e}") from None
        finally:
            device.close()
            if holder is not None:
                _undo_create(path, holder, made, grown, dirs)

    @classmethod
    async def open(cls, path: str | Path, engine: IoEngine, buffers: BufferPool, *,
                   cache_bytes: int = DEFAULT_CACHE_BYTES, offline: bool = False,
                   lock_wait: float = 0.0) -> Pool:
        """Open (and if needed recover) the pool at `path`. Raises UserError, PoolBusy
        if another process still holds the pool after `lock_wait` seconds."""
        _not_empty(path)
        try:
            device = open_device(path)
        except UserError as e:
            if not os.access(path, os.W_OK) and os.access(path, os.R_OK):
                raise UserError(f"{e}: every command opens a pool for writing, even to read "
                                "it (it may have a journal to replay first)") from e
            raise
        try:
            deadline = time.monotonic() + lock_wait
            while True:
                try:
                    _lock(device)
                    break
                except PoolBusy:
                    if time.monotonic() >= deadline:
                        raise
                await asyncio.sleep(LOCK_RETRY_SECONDS)
            sb = _read_superblock(device)
            sb = _recover(device, sb)
            pool = cls(device, sb, engine, buffers, cache_bytes, offline)
            pool._load()
        except FormatError as e:
            device.close()
            raise UserError(f"{path}: {e}") from e
        except BaseException:
            device.close()
            raise
        await pool._finish_deletions()
        return pool

    def _load(self) -> None:
        layout = self.layout
        raw = _read_pages_sync(self.device, layout.state_page, 1)
        verify_page(layout.state_page, raw)
        self.state = PoolState.unpack(raw)
        self.cache.insert_clean(layout.state_page, raw, PT_STATE, pin=True)
        step = 256
        for first in range(0, layout.catalog_pages, step):
            n = min(step, layout.catalog_pages - first)
            raw = _read_pages_sync(self.device, layout.catalog_start + first, n)
            for k in range(n):
                i = first + k
                page_no = layout.catalog_start + i
                page = raw[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
                verify_page(page_no, page)
                held = False
                for j in range(RECORDS_PER_CATALOG_PAGE):
                    off = PAGE_HEADER_SIZE + j * CATALOG_RECORD_SIZE
                    rec = VolumeRecord.unpack(page[off:off + CATALOG_RECORD_SIZE],
                                              i * RECORDS_PER_CATALOG_PAGE + j)
                    if rec is not None:
                        self.volumes[rec.id] = rec
                        held = True
                if held:
                    self.cache.insert_clean(page_no, page, PT_CATALOG, pin=True)
                    self._catalog_kept.add(page_no)
        for table in (self.data, self.meta):
            step = 256
            for first in range(0, table.pages, step):
                n = min(step, table.pages - first)
                raw = _read_pages_sync(self.device, table.first_page + first, n)
                for k in range(n):
                    page = raw[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
                    verify_page(table.first_page + first + k, page)
                    table.index_page(first + k, page)
                    if self.cache.cached_count < self.cache.capacity // PRELOAD_SHARE:
                        # read anyway: keep it, every allocation and sharing change reads it
                        self.cache.insert_clean(table.first_page + first + k, page,
                                                PT_REFCOUNT)
        self.data.cursor = self.state.data_next
        self.meta.cursor = self.state.meta_next

    # -- page I/O -----------------------------------------------------------------------------

    async def _read_page(self, page_no: int) -> bytes:
        buf = self.buffers.get(PAGE_SIZE)
        try:
            n = await self.engine.aread(self.device.fd, buf, 0, PAGE_SIZE, page_no * PAGE_SIZE)
            if n != PAGE_SIZE:
                raise NbdError(errno.EIO, f"short read of metadata page {page_no}")
            return bytes(buf.view[:PAGE_SIZE])
        finally:
            self.buffers.put(buf)

    async def _read_pages(self, first: int, count: int) -> list[tuple[int, bytes]]:
        """Up to `count` pages from `first` on, within its region of the metadata (the
        reference tables or the map pages): for read-ahead."""
        lay = self.layout
        bounds = [lay.meta_ref_start, lay.data_ref_start, lay.meta_start,
                  lay.meta_start + lay.meta_pages]
        end = next((b for b in bounds if b > first), first + 1)
        count = max(1, min(count, end - first))
        buf = self.buffers.get(count * PAGE_SIZE)
        try:
            n = await self.engine.aread(self.device.fd, buf, 0, count * PAGE_SIZE,
                                        first * PAGE_SIZE)
            if n < PAGE_SIZE:
                raise NbdError(errno.EIO, f"short read of metadata page {first}")
            return [(first + i, bytes(buf.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]))
                    for i in range(n // PAGE_SIZE)]
        finally:
            self.buffers.put(buf)

    def _read_page_sync(self, page_no: int) -> bytes:
        return _read_pages_sync(self.device, page_no, 1)

    # -- catalog and state ----------------------------------------------------------------------

    def _catalog_page(self, vol: VolumeRecord) -> int:
        return self.layout.catalog_start + vol.slot // RECORDS_PER_CATALOG_PAGE

    def _keep_catalog_page(self, vol: VolumeRecord) -> None:
        """Pin the catalog page of a record just added (it is in the cache, dirty, right
        after the mini-transaction that wrote it) until its last record is buried. Only
        pages holding records stay in memory, not the whole catalog ``--max-volumes``
        sized."""
        page_no = self._catalog_page(vol)
        if page_no not in self._catalog_kept:
            self.cache.pin(page_no)
            self._catalog_kept.add(page_no)

    def _write_record(self, vol: VolumeRecord) -> None:
        page_no = self._catalog_page(vol)
        off = PAGE_HEADER_SIZE + (vol.slot % RECORDS_PER_CATALOG_PAGE) * CATALOG_RECORD_SIZE
        page = self.cache.modify(page_no, PT_CATALOG)
        page[off:off + CATALOG_RECORD_SIZE] = vol.pack() if vol.flags else bytes(
            CATALOG_RECORD_SIZE)

    def update_volume(self, vol: VolumeRecord, **changes: Any) -> None:
        """Change fields of a volume record inside the current mini-transaction."""
        old = {k: getattr(vol, k) for k in changes}
        for k, v in changes.items():
            setattr(vol, k, v)
        if "flags" in changes:
            self._pages_promised = None

        def undo() -> None:
            for k, v in old.items():
                setattr(vol, k, v)
            self._pages_promised = None

        self.cache.add_undo(undo)
        self._write_record(vol)

    def update_state(self, **changes: int) -> None:
        """Change counters of the state page inside the current mini-transaction."""
        old = {k: getattr(self.state, k) for k in changes}
        for k, v in changes.items():
            setattr(self.state, k, v)

        def undo() -> None:
            for k, v in old.items():
                setattr(self.state, k, v)

        self.cache.add_undo(undo)
        self.state.pack_into(self.cache.modify(self.layout.state_page, PT_STATE))

    def live_volumes(self) -> list[VolumeRecord]:
        return sorted((v for v in self.volumes.values() if not v.deleted), key=lambda v: v.id)

    def find_volume(self, name: str) -> VolumeRecord | None:
        """The live volume called `name`, or None."""
        for vol in self.volumes.values():
            if vol.name == name and not vol.deleted:
                return vol
        return None

    def volume(self, name: str) -> VolumeRecord:
        vol = self.find_volume(name)
        if vol is not None:
            return vol
        raise UserError(f"no volume {name!r} in pool {self.path} "
                        f"({_some_names([v.name for v in self.live_volumes()], name)})")

    def ancestry(self, vol: VolumeRecord) -> list[int]:
        """Ids from `vol` up through its parents (deleted ones included)."""
        chain = [vol.id]
        seen = {vol.id}
        parent = vol.parent
        while parent and parent not in seen and parent in self.volumes:
            chain.append(parent)
            seen.add(parent)
            parent = self.volumes[parent].parent
        return chain

    def depth(self, vol: VolumeRecord) -> int:
        return len(self.ancestry(vol)) - 1

    def _free_slot(self) -> int:
        used = {v.slot for v in self.volumes.values()}
        for slot in range(self.layout.max_volumes):
            if slot not in used:
                return slot
        raise UserError(f"the pool's catalog is full ({self.layout.max_volumes} volumes)")

    # -- space accounting -------------------------------------------------------------------------

    @property
    def free_chunks(self) -> int:
        """Chunks not referenced by any volume (quarantined ones included)."""
        return self.data.free

    def available_chunks(self) -> int:
        """Chunks a thin volume may still take: free, not in flight, not promised."""
        return self.data.takeable() - self.state.data_reserved

    def claim_chunk(self, vol: VolumeRecord, hint: int | None = None, *,
                    ahead: bool = False) -> int:
        """A free chunk for a write of `vol` now in flight (ENOSPC if none may be taken);
        `ahead`: from a run claimed ahead (see RefTable.claim)."""
        self._may_take(vol, 1)
        return self.data.claim(hint, ahead=ahead)

    def claim_chunk_ahead(self, vol: VolumeRecord) -> int:
        """:meth:`claim_chunk` with `ahead` and no hint, outside a mini-transaction: the
        next chunk of the spare run in one call (every 4 KiB first write of radix)."""
        data = self.data
        spare = data.spare
        if spare and not self.state.data_reserved:  # (_may_take and RefTable.claim, inline)
            data.spare = spare[1:]
            return spare[0]
        return self.claim_chunk(vol, None, ahead=True)

    def claim_chunks(self, vol: VolumeRecord, hint: int | None,
                     count: int) -> list[tuple[int, int]]:
        """`count` free chunks for a write of `vol` now in flight, as (first, n) runs, the
        first at or after `hint` and each next run as close after the last as can be
        (ENOSPC if `count` chunks may not be taken)."""
        self._may_take(vol, count)
        runs: list[tuple[int, int]] = []
        while count:
            first, n = self.data.claim_run(hint, count)
            runs.append((first, n))
            count -= n
            hint = first + n
        return runs

    def _may_take(self, vol: VolumeRecord, count: int) -> None:
        """ENOSPC unless `vol` may take `count` more chunks now: from the free chunks not
        in flight or quarantined and not promised to guaranteed volumes, and a guaranteed
        volume also from what is promised to it (never from another's promise: after a
        trim of its own, it waits for the commit that frees its old chunks instead)."""
        if count <= len(self.data.spare) and not self.state.data_reserved:
            return  # nothing promised, and the spare run alone is room enough (it is free
            # space takeable() counts): every 4 KiB first write, without the arithmetic
        room = self.data.takeable() - self.state.data_reserved
        if vol.guaranteed:
            room += vol.reserved
        if room < count:
            raise NbdError(errno.ENOSPC, f"pool {self.path.name} has no free space")

    def charge(self, vol: VolumeRecord, chunks: int = 1) -> None:
        """`chunks` fresh chunks were mapped into `vol` where it held no chunk alone (a
        hole, or a chunk it shared): consume its guarantee (inside the mini-transaction).
        A fresh chunk that replaced one the volume held alone (its map change freed the
        old one: the write was planned while it was shared, and the sharing ended before
        it was mapped) changes nothing the volume may still need, and is not charged;
        callers count those through ``data.frees``."""
        if vol.guaranteed and vol.reserved > 0 and chunks > 0:
            chunks = min(chunks, vol.reserved)
            self.update_volume(vol, reserved=vol.reserved - chunks)
            self.update_state(data_reserved=self.state.data_reserved - chunks)

    def unmap(self, vol: VolumeRecord, lc: int,
              count: int) -> tuple[int, list[tuple[int, int]]]:
        """:meth:`BlockMap.unmap` (inside the mini-transaction), keeping a guarantee whole:
        each chunk the volume alone held and now frees must be promised to it again, or a
        thin volume could take it and the next write there would fail for lack of space."""
        used = self.data.used
        result = self.map.unmap(vol, lc, count)
        freed = used - self.data.used
        if freed > 0:
            self._unmap_frees[vol.id] = self._unmap_frees.get(vol.id, 0) + freed
        if vol.guaranteed and freed > 0:
            again = min(freed, self._chunks_for(vol.size) - vol.reserved)
            if again > 0:
                self.update_volume(vol, reserved=vol.reserved + again)
                self.update_state(data_reserved=self.state.data_reserved + again)
        return result

    # Metadata pages. A guaranteed volume is promised every page its map could ever hold
    # (BlockMap.page_bound), and thin volumes never take the last pages promised (all
    # guaranteed volumes' bounds together). That is sound without counting the pages
    # each volume holds: a guaranteed volume's map never holds more pages of its own
    # than its bound, so it can never need more new ones than its bound minus those it
    # holds, and thin volumes leave all bounds free. A clone shares the guaranteed
    # volume's map, after which it may copy every page again, so a clone is made only
    # while every bound fits in the free pages. The cost: the pages guaranteed volumes
    # already hold are promised again, which is little (a radix volume's whole tree is
    # about 1/509 of its chunk count, an extent volume's 1/83). A design with no bound
    # (extent with nodes of fewer than 4 entries, in tests) promises nothing.

    def page_promise(self, vol: VolumeRecord) -> int:
        """Metadata pages promised to `vol`: its map's bound if it is guaranteed, else 0."""
        if not vol.guaranteed or vol.deleted:
            return 0
        return self.map.page_bound(vol) or 0

    def pages_promised(self) -> int:
        """Metadata pages promised to guaranteed volumes, together (counted again after
        any change of the catalog's volumes or flags)."""
        if self._pages_promised is None:
            self._pages_promised = sum(self.page_promise(v) for v in self.volumes.values())
        return self._pages_promised

    def may_take_page(self, vol: VolumeRecord) -> None:
        """ENOSPC unless `vol` may take one more metadata page for its map now: a volume
        with a promise of pages may take any free page, another only one not promised."""
        promised = self.pages_promised()
        if promised and self.meta.free <= promised and not self.page_promise(vol):
            raise NbdError(errno.ENOSPC, f"pool {self.path.name} has no free metadata page "
                           f"for thin volume {vol.name!r}: the last {self.meta.free} are "
                           "promised to guaranteed volumes")

    def _promise_pages(self, what: str) -> None:
        """Refuse (inside the mini-transaction that made a promise, or shared a guaranteed
        volume's map) unless the free metadata pages cover every promise."""
        promised = self.pages_promised()
        if self.meta.free < promised:
            raise _NoRoomToPromise(
                f"{what}: guaranteed volumes' maps may need {promised} metadata pages "
                f"({promised * PAGE_SIZE} bytes) but only {self.meta.free} are free")

    def _chunks_for(self, size: int) -> int:
        return -(-size // self.chunk_size)

    # A promise grows when a guaranteed volume's chunks become shared (a snapshot or fork
    # of it: rewriting them needs new chunks) and must shrink back once the sharing ends
    # (the clone deleted), or the pool keeps promising space no write can need. What a
    # guaranteed volume can still need is one chunk per chunk it does not hold alone:
    # its size in chunks minus its exclusive chunks. After a deletion, that is counted
    # again for every guaranteed volume of the deleted one's family (the volumes that
    # may have shared chunks with it), a slice of the map at a time while I/O goes on.
    # The count may then go stale in one direction only: a write during the walk adds an
    # exclusive chunk (and consumes its promise), so it only makes the count too low,
    # which promises more; a copy planned while its chunk was shared and mapped once
    # the sharing ended frees the old chunk instead, and is not charged (see charge). A
    # trim frees an exclusive chunk the walk may have counted already (and promises it
    # again): so every chunk the volume's unmaps freed during the walk is taken off the
    # count. A clone of the volume during the walk makes every
    # chunk shared: then nothing is changed. Another deletion only makes chunks exclusive.

    def _families(self, vols: list[VolumeRecord]) -> list[list[VolumeRecord]]:
        """The families of `vols`, each once (a family: the volumes, deleted ones included,
        with the same eldest ancestor), found in one pass over the catalog."""
        roots = {self.ancestry(v)[-1] for v in vols}
        out: dict[int, list[VolumeRecord]] = {}
        for v in self.volumes.values():
            root = self.ancestry(v)[-1]
            if root in roots:
                out.setdefault(root, []).append(v)
        return list(out.values())

    async def _shrink_promises(self, family: list[VolumeRecord]) -> int:
        """Shrink the promise of each guaranteed volume in `family` to what it can still
        need (see above); returns the chunks no longer promised."""
        dropped = 0
        for vol in family:
            if (vol.id in self.volumes and not vol.deleted and vol.guaranteed
                    and vol.reserved and self.map.needs_reservation(vol)):
                try:
                    dropped += await self._shrink_promise(vol)
                except (OSError, NbdError, FormatError) as e:
                    # (the larger promise is safe: a deletion, or the pool's opening,
                    # must not fail for what only gives space back)
                    log.warning("%s: the promise of volume %r was not counted again: %s",
                                self.path, vol.name, _describe(e))
        return dropped

    async def _shrink_promise(self, vol: VolumeRecord) -> int:
        frees, clones, size = (self._unmap_frees.get(vol.id, 0),
                               self._clones_of.get(vol.id, 0), vol.size)
        exclusive = (await self.volume_stats(vol)).exclusive_chunks

        def op() -> int:
            if (self.volumes.get(vol.id) is not vol or vol.deleted or vol.size != size
                    or self._clones_of.get(vol.id, 0) != clones):
                return 0
            sole = exclusive - (self._unmap_frees.get(vol.id, 0) - frees)
            need = self._chunks_for(size) - max(0, sole)
            drop = vol.reserved - need
            if drop <= 0:
                return 0
            self.update_volume(vol, reserved=need)
            self.update_state(data_reserved=self.state.data_reserved - drop)
            return drop

        return await self.cache.run(op)

    def _reserve(self, vol: VolumeRecord, chunks: int) -> None:
        """Promise `chunks` more to `vol` (inside a mini-transaction); UserError if impossible."""
        if not self.map.needs_reservation(vol):
            return
        extra = chunks - vol.reserved
        if extra <= 0:
            return
        if self.available_chunks() < extra:
            raise _NoRoomToPromise(
                f"cannot guarantee {vol.name!r}: it needs {format_size(extra * self.chunk_size)}"
                f" more but only {format_size(max(0, self.available_chunks()) * self.chunk_size)}"
                " is free and not promised to other guaranteed volumes")
        self.update_volume(vol, reserved=chunks)
        self.update_state(data_reserved=self.state.data_reserved + extra)

    # -- mini-transactions and commits ----------------------------------------

    async def run(self, op: Callable[[], T]) -> T:
        """Run a synchronous metadata operation (see PageCache.run), then maybe commit.

        Back-pressure: while a commit is under way, operations go on dirtying pages for
        the next one; past ``dirty_limit`` they wait for a commit of their own, so that
        no journal record can outgrow the ring. The limit is checked right before each
        attempt (also after loading a page, when others may have dirtied more).
        """
        result = await self.cache.run(op, gate=self.dirty_room)
        self.maybe_commit()
        return result

    async def dirty_room(self) -> None:
        """Return once fewer than ``dirty_limit`` pages are dirty, and fewer than
        ``FREED_LIMIT`` chunks wait for a commit to free them (committing meanwhile):
        each such chunk costs memory until that commit, and one map page can free
        thousands (an extent record, a radix leaf)."""
        while (self.cache.dirty_count >= self.dirty_limit()
               or self.data.freed_pending_count() >= FREED_LIMIT):
            await self.commit()

    def commit_threshold(self) -> int:
        """Dirty pages at which a background commit starts."""
        return max(16, min(self.cache.capacity // 2, (self.ring.ring_pages - 8) // 4))

    def dirty_limit(self) -> int:
        """Dirty pages at which metadata operations wait for a commit (see :meth:`run`):
        half the ring, and half the largest record a commit can encode in one buffer
        (MAX_RECORD_PAGES: with the default 64 MiB journal, half the ring let a commit
        taken after a slow fdatasync hold more pages than that, fail, and the pool stop)."""
        return max(32, min(self.ring.ring_pages - 8, MAX_RECORD_PAGES) // 2)

    def record_room(self) -> int:
        """Pages one step of long metadata work (a design's unmap and release, a defrag
        window's install) may dirty before it stops to let a commit run: a quarter of
        the ring, and of MAX_RECORD_PAGES."""
        return max(8, min(self.ring.ring_pages, MAX_RECORD_PAGES) // 4)

    async def reads_drained(self) -> None:
        """Wait until every read begun before now has ended (reads never wait for writes,
        so a write may wait for this while it holds its own chunk locks and epoch)."""
        await _ended(self.epochs, reads_only=True)

    async def transfers_drained(self) -> None:
        """Wait until every transfer (read or write, of any volume) begun before now has
        ended."""
        await _ended(self.epochs)

    def metadata_pending(self) -> bool:
        """Whether a metadata change is not durable yet (dirty pages, a commit under way,
        or a failed commit: its pages are clean in memory but never reached the disk, so
        FUA and claims must commit, and get EIO)."""
        return (bool(self.cache.dirty_count) or self._commit_lock.locked()
                or self.failed is not None)

    def frees_waiting(self) -> bool:
        """Whether chunks freed by a change wait for a durable commit to be reusable, or
        defrag holds chunks for a window that will give as many back."""
        return (bool(self.data.quarantine) or bool(self.data.freed_pending())
                or self.defrag_claims.count > 0)

    @contextlib.asynccontextmanager
    async def space_wanted(self) -> AsyncIterator[None]:
        """Around a write's wait for freed space and its second try: meanwhile no defrag
        window claims chunks (it waits for ``space_waiters`` to reach zero)."""
        self.space_waiters.add(1)
        try:
            yield
        finally:
            self.space_waiters.add(-1)

    async def reuse_freed(self) -> None:
        """Wait for the defrag windows holding claims to end, commit, then wait until the
        chunks freed before may be handed out again (once every transfer begun before
        the commit has ended: see IoEpochs). Call within :meth:`space_wanted`."""
        await self.defrag_claims.zero()
        await self.commit()
        await _ended(self.epochs)

    def maybe_commit(self) -> None:
        """Start a background commit when enough metadata is dirty, or chunks freed."""
        if ((self.cache.dirty_count >= self.commit_threshold()
             or self.data.freed_pending_count() >= FREED_COMMIT)
                and not self._commit_lock.locked()):
            self._spawn(self.commit())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        """A background commit ended: its failure was said by :meth:`_fail` (or is the
        pool's earlier failure again, or an interruption), so it is taken here and not
        reported again at exit as a "Task exception was never retrieved"."""
        self._background.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, NbdError):
            log.error("background commit of pool %s failed", self.path, exc_info=error)

    async def commit(self) -> None:
        """Make every completed write and metadata change durable (FLUSH); see the module
        note. Raises EIO once the pool has failed."""
        async with self._commit_lock:
            self._raise_if_failed()
            try:
                await self._commit_locked()
            except asyncio.CancelledError:  # (the process is interrupted: Ctrl-C)
                self._fail(f"the {self._stage} of a commit was cancelled", quiet=True)
                raise
            except BaseException as e:
                self._fail(f"the {self._stage} of a commit failed ({_describe(e)})")
                raise

    def _fail(self, why: str, quiet: bool = False) -> None:
        """Stop committing for good (see the module note); the first reason is kept.
        `quiet`: an interruption, not a fault (logged at info level: the caller says it)."""
        if self.failed is None:
            self.failed = why
            if quiet:
                log.info("pool %s: %s; it recovers its last durable commit when next opened",
                         self.path, why)
                return
            log.error("pool %s: %s; no change is made durable any more (FLUSH and FUA "
                      "fail with EIO): restart the server to recover the last durable "
                      "commit from the journal", self.path, why)

    def _raise_if_failed(self) -> None:
        if self.failed is not None:
            raise NbdError(errno.EIO, f"pool {self.path.name} has failed: {self.failed}; "
                                      "restart the server to recover it")

    async def _commit_locked(self) -> None:
        self.state.data_next = self.data.cursor
        self.state.meta_next = self.meta.cursor
        self._stage = "fdatasync of the data"
        if not self.cache.dirty_count:
            await self.engine.call_blocking(self.device.flush)
            return
        self._stage = "journal write"  # (placing the record: it may not fit the ring)
        while True:
            total = journal.record_pages(self.cache.dirty_count + 1)
            placement = self.ring.place(total)
            if placement is not None:
                break
            self._stage = "checkpoint"
            await self._checkpoint()
            self._stage = "journal write"
        # The cursors are hints; record them with the commit (state page).
        with self.cache.mtr():
            self.update_state(data_next=self.data.cursor, meta_next=self.meta.cursor)
        position, padded = placement
        seq = self.ring.seq + (1 if padded else 0)
        images = self.cache.take_dirty(seq)
        total = journal.record_pages(len(images))
        self.data.snapshot_freed(seq, quarantine=True)
        self.meta.snapshot_freed(seq, quarantine=False)
        self._stage = "fdatasync of the data"
        await self.engine.call_blocking(self.device.flush)  # 2. data durable
        self._stage = "journal write"
        buf = self.buffers.get(total * PAGE_SIZE)
        try:
            journal.encode_record(seq, images, buf.view)
            if padded:
                pad = self.buffers.get(PAGE_SIZE)
                try:
                    pad.view[:PAGE_SIZE] = journal.encode_pad(self.ring.seq)
                    await self.engine.awrite(self.device.fd, pad, 0, PAGE_SIZE,
                                             (self.layout.journal_start + self.ring.head)
                                             * PAGE_SIZE, dsync=True)
                finally:
                    self.buffers.put(pad)
            await self.engine.awrite(self.device.fd, buf, 0, total * PAGE_SIZE,
                                     (self.layout.journal_start + position) * PAGE_SIZE,
                                     dsync=True)  # 3. commit durable
        finally:
            self.buffers.put(buf)
        self.ring.advance(position, total, padded)
        # Freed chunks become reusable once no transfer begun before now can touch them.
        self.epochs.defer(lambda: self.data.commit_durable(seq))
        self.commits += 1
        await self._home_done.wait()  # keep home writes of one page in commit order
        self._write_home(images)

    def _write_home(self, images: list[tuple[int, bytearray]]) -> None:
        if not images:
            return
        self._home_writes += len(images)
        self._home_done.clear()
        for page_no, image in images:
            buf = self.buffers.get(PAGE_SIZE)
            buf.view[:PAGE_SIZE] = image

            def written(res: int, page_no: int = page_no, buf: AlignedBuffer = buf) -> None:
                self.buffers.put(buf)
                if res == PAGE_SIZE:
                    self.cache.home_written(page_no)
                else:  # the page stays home-pending: in memory, never re-read from home
                    self._fail(f"writing metadata page {page_no} home failed ("
                               f"{os.strerror(-res) if res < 0 else 'short write'}; the "
                               "journal still holds it)")
                self._home_writes -= 1
                if not self._home_writes:
                    self._home_done.set()

            self.engine.write(self.device.fd, buf, 0, PAGE_SIZE, page_no * PAGE_SIZE, written)
        self.engine.kick()

    async def _checkpoint(self) -> None:
        """Move the journal tail up to the head: every record is home and synced."""
        await self._home_done.wait()
        self._raise_if_failed()  # (a page not written home still needs the journal)
        await self.engine.call_blocking(self.device.flush)
        sb = self.sb.next(journal_tail=0, journal_seq=self.ring.seq)  # the ring is empty
        await self.engine.call_blocking(_write_superblock, self.device, sb)
        self.sb = sb
        self.ring.checkpointed()

    async def close(self) -> None:
        """Commit, checkpoint and unlock; a failed pool is only unlocked (its journal
        keeps what was durable) and EIO raised."""
        if self.closed:
            return
        # Every transfer on the pool ends first: a write still in flight maps its chunk
        # when it completes, which must be in the final commit, not after it.
        await _ended(self.epochs)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.failed is not None:
            self.closed = True
            self.device.close()
            self._raise_if_failed()
        try:
            await self.commit()
            async with self._commit_lock:
                await self._checkpoint()
        finally:
            self.closed = True
            self.device.close()

    def abandon(self) -> None:
        """Close without committing (tests simulating a crash use kill -9 instead)."""
        self.closed = True
        self.device.close()

    # -- volume operations ------------------------------------------------------------------------

    def _new_record(self, name: str, size: int, *, parent: int = 0, flags: int = 0) -> VolumeRecord:
        if self.state.next_volume_id > self.map.max_volume_id:
            # (a larger id would alias another volume's in the map's owner fields)
            raise UserError(
                f"pool {self.path}: no volume ids left: the {self.map.name} block map "
                f"numbers volumes up to {self.map.max_volume_id:,}, and this pool has handed "
                f"out {self.state.next_volume_id - 1:,} over its life (an id is never "
                "reused); create a new pool and copy the volumes there")
        return VolumeRecord(id=self.state.next_volume_id, name=name, size=size, parent=parent,
                            flags=VF_IN_USE | flags, created_ns=time.time_ns(),
                            slot=self._free_slot())

    def _add_record(self, vol: VolumeRecord) -> None:
        self.volumes[vol.id] = vol
        self._pages_promised = None
        self.cache.add_undo(lambda: self._forget(vol.id))
        self.update_state(next_volume_id=vol.id + 1)
        self._write_record(vol)

    def _forget(self, vol_id: int) -> None:
        self.volumes.pop(vol_id, None)
        self._pages_promised = None

    def _check_new_names(self, names: list[str]) -> None:
        """Each of `names` a valid name, given once, of no live volume (one pass over the
        catalog, however many)."""
        taken = {v.name for v in self.volumes.values() if not v.deleted}
        given: set[str] = set()
        for name in names:
            check_volume_name(name)
            if name in given:
                raise UserError(f"the name {name!r} is given twice")
            if name in taken:
                raise UserError(f"a volume named {name!r} already exists in pool {self.path}")
            given.add(name)

    async def create_volume(self, name: str, size: int, *, guarantee: bool = False,
                            read_only: bool = False) -> VolumeRecord:
        """A new, empty (all zeros) thin volume; with `guarantee`, every chunk is promised."""
        self._check_new_names([name])
        if size <= 0:
            raise UserError("a volume's size must be positive")
        if (why := not_whole_sectors(size, "a volume's size")) is not None:
            raise UserError(why)
        flags = (VF_GUARANTEE if guarantee else 0) | (VF_READ_ONLY if read_only else 0)

        def op() -> VolumeRecord:
            vol = self._new_record(name, size, flags=flags)
            with _refused_for_lack_of_pages(f"cannot create {name!r}"):
                self.map.init_volume(vol)
            self._add_record(vol)
            if guarantee:
                self._reserve(vol, self._chunks_for(size))
                if self.page_promise(vol):
                    self._promise_pages(f"cannot guarantee {name!r}")
            return vol

        vol = await self._run_promising(op)
        self._keep_catalog_page(vol)
        await self.commit()
        return vol

    async def _run_promising(self, op: Callable[[], VolumeRecord]) -> VolumeRecord:
        """Run `op`, which may promise space (:meth:`_reserve`); if it cannot, while chunks
        a trim freed wait for their commit (free, but not yet takeable), make them
        reusable and try once more, as a write would. Each attempt waits for room among
        the dirty pages first (a batch of clones would otherwise grow one commit past what
        the journal holds)."""
        try:
            return await self.cache.run(op, gate=self.dirty_room)
        except _NoRoomToPromise:
            if not self.frees_waiting():
                raise
        async with self.space_wanted():
            await self.reuse_freed()
        return await self.cache.run(op, gate=self.dirty_room)

    async def clone_volume(self, source: str, name: str, *, snapshot: bool,
                           guarantee: bool = False) -> VolumeRecord:
        """A snapshot (read-only) or fork (writable) of `source` as it is now. O(1) for radix."""
        return (await self.clone_volumes(source, [name], snapshot=snapshot,
                                         guarantee=guarantee))[0]

    async def clone_volumes(self, source: str, names: list[str], *, snapshot: bool,
                            guarantee: bool = False) -> list[VolumeRecord]:
        """Snapshots or forks of `source` named `names`, all of it as it is now (one
        quiesce of its backend, one commit): a honeyfarm's clones of one running VM. The
        names are checked first (valid, new, none twice): a bad one changes nothing. A
        clone that fails later (no room to promise) keeps those made before it, committed,
        and says which. (Should a client open the source, not served until then, during
        the batch, the clones made after it opened include its writes.)"""
        src = self.volume(source)
        self._check_new_names(names)
        why = self.map.clone_refused(src)
        if why:
            raise UserError(why)
        made: list[VolumeRecord] = []
        # Wait for the in-flight writes of the backend serving the source, if one does.
        # A client may open one during any await below (a volume served by pattern is
        # opened by its first connection): then op() finds another backend registered than
        # the one quiesced, and the clone quiesces that one and runs again.
        resume: Callable[[], None] | None = None
        quiesced: Callable[[], Awaitable[Callable[[], None]]] | None = None
        try:
            flags = (VF_SNAPSHOT | VF_READ_ONLY) if snapshot else 0
            # A guaranteed source that needs no reservation of its own (linear's thick
            # origin) keeps its guarantee only if the clone does: overwriting the
            # origin copies the old chunks out into the clone.
            if guarantee or (src.guaranteed and not self.map.needs_reservation(src)):
                flags |= VF_GUARANTEE

            def op(name: str) -> VolumeRecord:
                if self.quiesce.get(src.id) is not quiesced:
                    raise _QuiesceAgain
                self._clones_of[src.id] = self._clones_of.get(src.id, 0) + 1
                vol = self._new_record(name, src.size, parent=src.id, flags=flags)
                with _refused_for_lack_of_pages(f"cannot clone {src.name!r}"):
                    self.map.clone(src, vol)
                self._add_record(vol)
                if src.guaranteed:  # its chunks are shared now: rewriting them needs new ones
                    try:
                        self._reserve(src, self._chunks_for(src.size))
                    except _NoRoomToPromise as e:
                        raise _NoRoomToPromise(
                            f"cannot clone {src.name!r} into {name!r}: {src.name!r} is "
                            "guaranteed, and once it shares its chunks each rewrite needs a "
                            f"new one, promised now; {e}") from None
                if vol.guaranteed:
                    try:
                        self._reserve(vol, self._chunks_for(vol.size))
                    except _NoRoomToPromise as e:
                        if guarantee:
                            raise
                        raise _NoRoomToPromise(
                            f"cannot clone {src.name!r}: it is guaranteed, and overwriting "
                            f"it copies its old chunks into {name!r}, which must then be "
                            f"guaranteed too; {e}") from None
                if self.page_promise(src) or self.page_promise(vol):
                    # (src's pages are shared now: it may need a copy of each again)
                    self._promise_pages(f"cannot clone {src.name!r}")
                return vol

            try:
                for name in names:
                    while True:
                        if self.quiesce.get(src.id) is not quiesced:
                            if resume is not None:
                                resume()
                                resume = None
                            quiesced = self.quiesce.get(src.id)
                            if quiesced is not None:
                                resume = await quiesced()  # (then look again: it awaited)
                            continue
                        try:
                            vol = await self._run_promising(partial(op, name))
                        except _QuiesceAgain:
                            continue
                        break
                    self._keep_catalog_page(vol)
                    made.append(vol)
            except UserError as e:
                if not made:
                    raise
                await self.commit()
                raise UserError(f"{e} (made before it: {some_names(v.name for v in made)})"
                                ) from None
            await self.commit()
            return made
        finally:
            if resume is not None:
                resume()

    async def delete_volume(self, name: str,
                            progress: Callable[[int], None] | None = None) -> int:
        """Delete a volume, freeing every chunk and page no other volume references;
        `progress` is called after each step of the release (a long one for a big map)
        with the data chunks freed so far. Returns the data chunks the delete freed
        (counted in its own steps: what other volumes take or free meanwhile is not)."""
        return (await self.delete_volumes([name], progress))[0]

    async def delete_volumes(self, names: list[str],
                             progress: Callable[[int], None] | None = None) -> list[int]:
        """Delete volumes (see delete_volume): the data chunks each delete freed. The names
        are checked first (live volumes, none twice, none served, each deletable in this
        design when the ones before it are): a bad one deletes nothing. All are marked
        deleting in one commit, released one after the other (`progress` gets the chunks
        freed so far by all), and the frees made durable in one more: a honeyfarm's
        hundreds of clones cost two commits, not two each."""
        vols: list[VolumeRecord] = []
        given: set[str] = set()
        for name in names:
            if name in given:
                raise UserError(f"the name {name!r} is given twice")
            given.add(name)
            vols.append(self.volume(name))
        pages = len({self._catalog_page(v) for v in vols}) + 1  # (and the state page)
        if len(vols) > 1 and pages > self.dirty_limit():  # (marked in one commit: see below)
            most = (self.dirty_limit() - 1) * RECORDS_PER_CATALOG_PAGE
            raise UserError(f"{len(vols)} deletes at once would change {pages} catalog pages "
                            f"in one commit, more than this pool's journal takes "
                            f"({self.dirty_limit()}): delete at most about {most} at a time")
        waited = 0.0
        while any(v.id in self.in_use for v in vols) and waited < IN_USE_WAIT_SECONDS:
            await asyncio.sleep(IN_USE_POLL_SECONDS)  # (a client that has just left)
            waited += IN_USE_POLL_SECONDS

        def mark() -> None:
            for vol in vols:
                if vol.id in self.in_use:  # (checked here: a client may connect until now)
                    raise UserError(f"volume {vol.name!r} is in use ({self.in_use[vol.id]}); "
                                    "it cannot be deleted while it is served")
                why = self.map.delete_refused(vol)
                if why:
                    raise UserError(why)
                self.update_volume(vol, flags=vol.flags | VF_DELETING)
                if vol.reserved:
                    self.update_state(data_reserved=self.state.data_reserved - vol.reserved)
                    self.update_volume(vol, reserved=0)

        # All or none: a refusal rolls the others back. (The gate: the marks start a commit
        # of their own size at most, which the check above keeps within the journal.)
        await self.cache.run(mark, gate=self.dirty_room)
        await self.commit()
        families = self._families(vols)
        freed_each: list[int] = []
        damaged: list[str] = []
        before = 0
        for vol in vols:
            tally = [0]  # (what its release freed, also when it stops at a damaged page)
            step = None if progress is None else (
                lambda chunks, before=before: progress(before + chunks))
            try:
                await self._release(vol, step, tally)
            except FormatError as e:
                damaged.append(f"volume {vol.name!r} is deleted, but not all of its space "
                               f"could be freed: {e}")
            freed_each.append(tally[0])
            before += tally[0]
        for family in families:
            await self._shrink_promises(family)
        await self.commit()
        if damaged:
            raise PoolDamaged("; ".join(damaged) + " (the pool tries again each time it is "
                              f"opened; 'nbdserver pool check {self.path}' names what is "
                              "damaged)")
        return freed_each

    async def _release(self, vol: VolumeRecord,
                       progress: Callable[[int], None] | None = None,
                       tally: list[int] | None = None) -> int:
        """Release `vol`'s map in steps; the data chunks that freed (also kept in
        `tally[0]` as they go, for a caller that must know them when a step fails)."""
        freed = 0

        def step() -> bool:
            nonlocal freed
            used = self.data.used
            done = self.map.release(vol, RELEASE_BUDGET)
            freed += used - self.data.used  # (synchronous: only this step's frees)
            if tally is not None:
                tally[0] = freed
            return done

        while not await self.run(step):
            if progress is not None:
                progress(freed)
        await self.cache.run(lambda: self._bury(vol))
        self._let_go_catalog_pages()
        return freed

    def _let_go_catalog_pages(self) -> None:
        """Unpin the catalog pages left without a record (by a burial just done)."""
        holding = {self._catalog_page(v) for v in self.volumes.values()}
        for page_no in self._catalog_kept - holding:
            self.cache.unpin(page_no)
            self._catalog_kept.discard(page_no)

    def _bury(self, vol: VolumeRecord) -> None:
        """Drop a released volume's record, or keep a tombstone while others descend from it."""
        children = [v for v in self.volumes.values() if v.parent == vol.id and v.id != vol.id]
        if children:
            self.update_volume(vol, flags=(vol.flags & ~VF_DELETING) | VF_DELETED)
            return
        self.update_volume(vol, flags=0)
        self.volumes.pop(vol.id)
        self._unmap_frees.pop(vol.id, None)  # (ids are never used again)
        self._clones_of.pop(vol.id, None)
        self.cache.add_undo(lambda: self.volumes.__setitem__(vol.id, vol))
        parent = self.volumes.get(vol.parent)
        if parent is not None and parent.flags & VF_DELETED:
            self._bury(parent)  # a tombstone with no descendants left

    async def _finish_deletions(self) -> None:
        dying = [v for v in self.volumes.values() if v.flags & VF_DELETING]
        families = self._families(dying)  # (before the burials: one pass, a batch's too)
        for vol in dying:
            log.info("%s: finishing the deletion of volume %r", self.path, vol.name)
            try:
                await self._release(vol)
            except FormatError as e:  # the pool still opens: the rest is unharmed
                log.error("%s: the deletion of volume %r cannot finish: %s; what it "
                          "still holds stays allocated ('nbdserver pool check' names "
                          "what is damaged)", self.path, vol.name, e)
        for family in families:
            await self._shrink_promises(family)
        await self.commit()

    async def set_read_only(self, name: str, read_only: bool) -> None:
        vol = self.volume(name)
        flags = (vol.flags | VF_READ_ONLY) if read_only else (vol.flags & ~VF_READ_ONLY)
        await self.cache.run(lambda: self.update_volume(vol, flags=flags))
        await self.commit()

    # -- inspection -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        chunk = self.chunk_size
        live = self.live_volumes()
        return {
            "path": os.path.abspath(self.path),  # (as a server or the CLI opened it)
            "uuid": self.sb.uuid_str,
            "blockmap": self.sb.blockmap,
            "size_bytes": self.sb.size,
            "allocated_bytes": self.device.allocated,
            "chunk_size": chunk,
            "data_bytes": self.layout.data_chunks * chunk,
            "free_bytes": self.data.free * chunk,
            "used_bytes": self.data.used * chunk,
            "reserved_bytes": self.state.data_reserved * chunk,
            "available_bytes": max(0, self.available_chunks()) * chunk,
            "metadata_bytes": self.layout.meta_pages * PAGE_SIZE,
            "metadata_used_bytes": self.meta.used * PAGE_SIZE,
            "metadata_reserved_bytes": self.pages_promised() * PAGE_SIZE,
            "journal_bytes": self.layout.journal_pages * PAGE_SIZE,
            "volumes": len(live),
            "max_volumes": self.layout.max_volumes,
            "map_params": list(self.sb.map_params),
            "created": _iso(self.sb.created_ns),
            "failed": self.failed,
        }

    async def volume_stats(self, vol: VolumeRecord) -> MapStats:
        """Walk the volume's map a slice at a time (see BlockMap.exclusive_range): memory
        stays within the cache plus one slice's pages, a page miss restarts only its
        slice, and the event loop serves I/O every STATS_TURN seconds; while volumes
        have I/O in flight, the walk then rests as long as it worked, so that their
        clients keep at least half the time."""
        stats = MapStats()
        total = self._chunks_for(vol.size)
        base = self.stats_slice or self.map.stats_slice()
        step = base
        end = None  # the physical chunk after the last mapped run, if it continues
        lc = 0
        loop = asyncio.get_running_loop()
        turn = loop.time()  # when this turn of work began
        hole = True  # whether the walk stands in a hole (the holes ahead may be skipped)
        while lc < total:
            if hole:
                lc = await self.cache.run(partial(self.map.skip_empty, vol, lc, total))
                end = None
                if lc >= total:
                    break
            n = min(step, total - lc)

            def walk(lc: int = lc, n: int = n) -> tuple[list[Run], int, int]:
                runs = self.map.lookup(vol, lc, n)
                return (runs, *self.map.exclusive_range(vol, lc, n, runs))

            loads = self.cache.loads
            began = loop.time()
            runs, exclusive, pages = await self.cache.run(walk)
            took = loop.time() - began
            stats.exclusive_chunks += exclusive
            stats.metadata_pages += pages
            for run in runs:  # extents: runs that differ only in their writer are one
                if run.pc == HOLE:
                    end = None
                    continue
                stats.mapped_chunks += run.count
                if run.pc != end:
                    stats.extents += 1
                end = run.pc + run.count
            hole = bool(runs) and runs[-1].pc == HOLE
            lc += n
            # Where the map is simple (holes, long runs: few pages per chunk) and cached,
            # the slices grow, up to STATS_GROWTH times: a mostly empty or sequentially
            # written 1 TiB volume is not half a million steps. A fragmented slice, or
            # one that had to load pages (a miss restarts the slice), starts over; one
            # that took long (a linear origin's slice is looked up in each of its
            # snapshots) halves: no slice holds the event loop much past STATS_TURN.
            if len(runs) > 8 or self.cache.loads != loads:
                step = base
            elif took >= STATS_TURN / 4:
                step = max(base, step // 2)
            else:
                step = min(step * 2, base * STATS_GROWTH)
            now = loop.time()
            if now - turn >= STATS_TURN:  # let the server serve I/O meanwhile
                await asyncio.sleep(min(now - turn, 4 * STATS_TURN)
                                    if self.epochs.in_flight else 0)
                turn = loop.time()
        return stats

    def volume_summary(self, vol: VolumeRecord) -> dict[str, Any]:
        """What the catalog says about `vol`: :meth:`volume_info` without the map
        statistics, in O(depth) whatever the size of its map (the answer of create,
        snapshot and fork, which must stay instant)."""
        parent = self.volumes.get(vol.parent)
        return {
            "name": vol.name,
            "id": vol.id,
            "size": vol.size,
            "parent": parent.name if parent is not None and not parent.deleted else None,
            "parent_id": vol.parent or None,  # (also once the parent is deleted)
            "read_only": vol.read_only,
            "snapshot": vol.is_snapshot,
            "guarantee": vol.guaranteed,
            "reserved_bytes": vol.reserved * self.chunk_size,
            "metadata_reserved_bytes": self.page_promise(vol) * PAGE_SIZE,
            "depth": self.depth(vol),
            "created": _iso(vol.created_ns),
            "in_use": self.in_use.get(vol.id),
        }

    async def volume_info(self, vol: VolumeRecord, *,
                          damaged_ok: bool = False) -> dict[str, Any]:
        """:meth:`volume_summary` and the map statistics (a walk of the volume's map).
        `damaged_ok`: a map that cannot be read whole (a damaged page) gives null
        statistics and a `damaged` field saying why, instead of the FormatError."""
        try:
            stats: MapStats | None = await self.volume_stats(vol)
        except FormatError as e:
            if not damaged_ok:
                raise
            stats, damaged = None, f"damaged metadata: {e}"
        info = self.volume_summary(vol)
        in_use = info.pop("in_use")  # (listed last, after the statistics)
        if stats is None:
            return {**info, **dict.fromkeys(MAP_STATS), "in_use": in_use, "damaged": damaged}
        chunk = self.chunk_size
        mapped = stats.mapped_chunks * chunk
        gib = vol.size / (1 << 30)
        return {
            **info,
            "mapped_bytes": mapped,
            "exclusive_bytes": stats.exclusive_chunks * chunk,
            "shared_bytes": mapped - stats.exclusive_chunks * chunk,
            "extents": stats.extents,
            "extents_per_gib": round(stats.extents / gib, 3) if gib else 0.0,
            "mean_extent_bytes": (mapped // stats.extents) if stats.extents else 0,
            "metadata_pages": stats.metadata_pages,
            "in_use": in_use,
        }

    def _exclusive_chunks_sync(self, vol: VolumeRecord) -> int:
        """Chunks only `vol` references (see BlockMap.exclusive_range), counted a slice at
        a time with the check's synchronous page reader."""
        total = self._chunks_for(vol.size)
        step = self.stats_slice or self.map.stats_slice()
        exclusive = 0
        for lc in range(0, total, step):
            n = min(step, total - lc)
            exclusive += self.map.exclusive_range(vol, lc, n, self.map.lookup(vol, lc, n))[0]
        return exclusive

    async def check(self, progress: Callable[[str, int, int, int], None] | None = None,
                    ) -> CheckReport:
        """Recount every reference and compare with the space maps; name each problem.
        `progress(volume name, its number, volumes, references counted so far)` is called
        before each volume and every CHECK_PROGRESS chunk references within one."""
        report = CheckReport()
        page_refs = Recount(self.meta.count)
        chunk_refs = Recount(self.data.count)
        ref_page = page_refs.add
        volumes = sorted(self.volumes.values(), key=lambda v: v.id)
        at: list[Any] = ["", 0, 0]  # the volume being counted, its number, references so far
        counts, limit, saturated = chunk_refs.counts, chunk_refs.count, Recount.SATURATED

        def ref_chunk(c: int) -> None:
            if 0 <= c < limit and 0 < counts[c] < saturated:
                counts[c] += 1  # (the common case of a shared chunk, inline)
            else:
                chunk_refs.add(c)
            at[2] += 1
            if progress is not None and not at[2] % CHECK_PROGRESS:
                progress(at[0], at[1], len(volumes), at[2])

        names: dict[str, int] = {}
        seen: set[int] = set()
        complete = True  # every map was read whole (else a lower count proves no leak)
        old_reader = self.cache.sync_reader
        self.cache.sync_reader = self._read_page_sync
        try:
            for number, vol in enumerate(volumes, 1):
                at[:2] = vol.name, number
                if progress is not None:
                    progress(vol.name, number, len(volumes), at[2])
                if vol.parent and vol.parent not in self.volumes:
                    report.problems.append(f"volume {vol.name!r}: parent #{vol.parent} is missing")
                if vol.flags & VF_DELETED:
                    continue
                if not vol.deleted:  # (one being deleted still holds its references)
                    report.volumes += 1
                    if vol.name in names:
                        report.problems.append(f"two live volumes are named {vol.name!r}")
                    names[vol.name] = vol.id
                try:
                    self.map.references(vol, seen, ref_page, ref_chunk, report.problems.append)
                    if vol.guaranteed and not vol.deleted and self.map.needs_reservation(vol):
                        need = self._chunks_for(vol.size) - self._exclusive_chunks_sync(vol)
                        if vol.reserved < need:
                            report.problems.append(
                                f"volume {vol.name!r} is guaranteed but promised {vol.reserved}"
                                f" chunks, and its holes and shared chunks need {need}")
                except FormatError as e:
                    report.problems.append(f"volume {vol.name!r}: {e}")
                    complete = False
            for recount, table, what in ((page_refs, self.meta, "metadata page"),
                                         (chunk_refs, self.data, "data chunk")):
                problems, leaked, _used = recount.compare(table, self.cache.get, what,
                                                          complete)
                report.problems += problems
                if table is self.data:
                    report.leaked_chunks = leaked if complete else None
                else:
                    report.leaked_pages = leaked if complete else None
        finally:
            self.cache.sync_reader = old_reader
        report.data_chunks_referenced = chunk_refs.referenced + len(chunk_refs.outside)
        report.metadata_pages_referenced = page_refs.referenced + len(page_refs.outside)
        reserved = sum(v.reserved for v in self.volumes.values())
        if reserved != self.state.data_reserved:
            report.problems.append(f"reserved chunks: volumes hold {reserved}, the pool counts "
                                   f"{self.state.data_reserved}")
        async with self._commit_lock:  # (no checkpoint writing a copy meanwhile)
            for copy in range(SUPERBLOCK_COPIES):
                try:
                    sb = Superblock.unpack(_read_pages_sync(self.device, copy, 1))
                except FormatError as e:
                    report.warnings.append(
                        f"superblock copy {copy} is damaged ({e}); the other copy serves, "
                        "and the pool's next checkpoint (at the latest when it is closed) "
                        "rewrites this one")
                    continue
                if sb.uuid != self.sb.uuid:
                    report.problems.append(f"superblock copy {copy} belongs to another pool")
        return report


# -- helpers ------------------------------------------------------------


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9)) if ns else ""


def _lock(device: BlockDevice) -> None:
    _flock(device.fd, device.path)


def _flock(fd: int, path: str | Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PoolBusy(f"{path}: the pool is in use by another process (a running "
                       "nbdserver serve, or an nbdserver command working on it offline, "
                       "such as a volume list or delete)") from None


def _create_exclusive(path: Path, made_dirs: list[Path] | None) -> bool:
    """Create `path` empty if it does not exist; whether this call created it (so that
    only the file it made is removed if the create fails, not one another process made
    meanwhile). Missing directories above it are made only if `made_dirs` is a list (the
    ones made are appended, so that a failed create can remove them)."""
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if missing and made_dirs is None:
        raise UserError(f"{path}: cannot create: directory {path.parent} does not exist")
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise UserError(f"{path}: cannot create: {d} is not a directory") from None
            continue  # made by another process meanwhile: not ours to remove
        except OSError as e:
            raise UserError(f"{path}: cannot create {d}: {e.strerror}") from None
        assert made_dirs is not None
        made_dirs.append(d)
    if not path.parent.is_dir():
        raise UserError(f"{path}: cannot create: {path.parent} is not a directory")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except FileExistsError:
        if path.is_symlink() and not path.exists():
            try:
                os.stat(path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UserError(f"{path}: cannot create: it is a symbolic link in a loop "
                                    "(remove the link)") from None
            raise UserError(f"{path}: cannot create: it is a symbolic link to "
                            f"{os.readlink(path)}, which does not exist (create the pool "
                            "there, or remove the link)") from None
        return False
    except OSError as e:
        raise UserError(f"{path}: cannot create: {e.strerror}") from None
    return True


def _undo_create(path: Path, holder: int | None, made: bool, grown: bool,
                 dirs: list[Path]) -> None:
    """After a failed create, leave the file as it was: removed if the create made it,
    empty again if it grew an empty one; then close the holder (and so unlock), and
    remove the directories made for it (those still empty)."""
    try:
        if made:
            path.unlink(missing_ok=True)
        elif grown and holder is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(holder, 0)
    finally:
        if holder is not None:
            os.close(holder)
        for d in reversed(dirs):
            with contextlib.suppress(OSError):
                d.rmdir()


# The fields of volume_info that come from a walk of the volume's map.
MAP_STATS = ("mapped_bytes", "exclusive_bytes", "shared_bytes", "extents", "extents_per_gib",
             "mean_extent_bytes", "metadata_pages")
NAMES_SHOWN = 8  # a message about a missing volume lists the pool's volumes up to this


def _some_names(names: list[str], wanted: str) -> str:
    """The volumes a message about a missing one shows: all of a few, else a count and
    the names closest to `wanted`."""
    if len(names) <= NAMES_SHOWN:
        return "volumes: " + (", ".join(names) or "none")
    close = difflib.get_close_matches(wanted, names, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ";"
    return f"{len(names):,} volumes{hint} 'nbdserver volume list' lists them"


async def _ended(epochs: IoEpochs, *, reads_only: bool = False) -> None:
    """Wait until every transfer (or, `reads_only`, every read) `epochs` saw begin before
    now has ended."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ended() -> None:
        if not fut.done():
            fut.set_result(None)

    if reads_only:
        epochs.defer_after_reads(ended)
    else:
        epochs.defer(ended)
    await fut


def _read_pages_sync(device: BlockDevice, first: int, count: int) -> bytes:
    buf = AlignedBuffer(count * PAGE_SIZE, 0)
    try:
        n = os.preadv(device.fd, [buf.view[:count * PAGE_SIZE]], first * PAGE_SIZE)
        if n != count * PAGE_SIZE:
            raise FormatError(f"short read of pages {first}..{first + count - 1}: the pool "
                              "is smaller than its layout says")
        return bytes(buf.view[:count * PAGE_SIZE])
    finally:
        buf.close()


def _write_page_sync(device: BlockDevice, page_no: int, data: bytes | bytearray) -> None:
    buf = AlignedBuffer(PAGE_SIZE, 12)
    try:
        buf.view[:PAGE_SIZE] = data
        device.pwrite(buf, PAGE_SIZE, page_no * PAGE_SIZE)
    finally:
        buf.close()


def _write_superblock(device: BlockDevice, sb: Superblock) -> None:
    """Write `sb` over the older copy (the other one stays valid if this write tears)."""
    _write_page_sync(device, sb.seq % SUPERBLOCK_COPIES, sb.pack())
    device.flush()


def _not_empty(path: str | Path) -> None:
    """An empty file named as a pool: say that it holds none (open_device's message
    about sizes is for file exports)."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise UserError(f"{path}: not an nbdserver pool (the file is empty); create one "
                            "with 'nbdserver pool create'")


def read_superblock(path: str | Path) -> Superblock:
    """The current superblock of the pool at `path` (no lock needed). Raises UserError."""
    _not_empty(path)
    device = open_device(path, read_only=True)
    try:
        return _read_superblock(device)
    except FormatError as e:
        raise UserError(f"{path}: {e}") from None
    finally:
        device.close()


def _refuse_to_overwrite(device: BlockDevice, path: Path) -> None:
    """UserError unless the first MiB of the block device `device` holds only zeros:
    it may be a pool, a file system or a partition table (pool create --force)."""
    try:
        sb: Superblock | None = _read_superblock(device)
    except NotAPool:
        sb = None
    except FormatError as e:
        raise UserError(f"{path} holds what looks like a damaged nbdserver pool ({e}); "
                        "refusing to overwrite it (--force destroys it)") from None
    if sb is not None:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(sb.created_ns / 1e9))
        raise UserError(f"{path} holds an nbdserver pool ({sb.blockmap}, "
                        f"{format_size(sb.size)}, created {created}); refusing to overwrite "
                        "it (--force destroys it and every volume in it)")
    pages = min(OVERWRITE_CHECK_BYTES, device.size) // PAGE_SIZE
    head = _read_pages_sync(device, 0, pages) if pages else b""  # (too small: refused later)
    if head != bytes(len(head)):
        raise UserError(f"{path} holds data in its first "
                        f"{format_size(OVERWRITE_CHECK_BYTES)} (a file system or a partition "
                        "table?); refusing to overwrite it (--force writes a new pool over "
                        "it)")


def _holds_a_pool(path: Path) -> bool:
    """Whether `path` holds a pool (a valid superblock: read_superblock)."""
    try:
        read_superblock(path)
    except (UserError, OSError):
        return False
    return True


def _read_superblock(device: BlockDevice) -> Superblock:
    """The newest valid superblock copy; NotAPool if no copy has the magic (or the device
    ends before it), FormatError if the copies are damaged."""
    found: list[Superblock] = []
    errors: list[str] = []
    absent = zeros = 0
    for copy in range(SUPERBLOCK_COPIES):
        if (copy + 1) * PAGE_SIZE > device.size:
            absent += 1
            continue
        raw = _read_pages_sync(device, copy, 1)
        try:
            found.append(Superblock.unpack(raw))
        except FormatError as e:
            absent += isinstance(e, NotAPool)
            zeros += not any(raw)
            errors.append(f"copy {copy}: {e}")
    if not found:
        if zeros == SUPERBLOCK_COPIES:  # what a `pool create` stopped mid-way leaves
            raise NotAPool("not an nbdserver pool (no superblock: it begins with zeros, as "
                           "an empty disk image does, and a pool file whose creation was "
                           "stopped before the end): a disk image is served as a file "
                           "export (file: in the config); if it is such a pool file, delete "
                           "it to create the pool again")
        if absent == SUPERBLOCK_COPIES:
            raise NotAPool("not an nbdserver pool (no superblock): a disk image is served "
                           "as a file export (file: in the config); 'nbdserver pool create' "
                           "makes a pool in a new file or on a device")
        raise FormatError("no valid superblock (" + "; ".join(errors) + ")")
    if len({sb.uuid for sb in found}) > 1:
        raise FormatError("the two superblock copies belong to different pools")
    return max(found, key=lambda sb: sb.seq)


def _recover(device: BlockDevice, sb: Superblock) -> Superblock:
    """Replay committed journal records home; returns the superblock to continue with."""
    layout = sb.layout

    def read(ring_page: int, count: int) -> bytes:
        return _read_pages_sync(device, layout.journal_start + ring_page, count)

    images: dict[int, bytes] = {}
    end: tuple[int, int] = (sb.journal_tail, sb.journal_seq)
    records = 0
    for item in journal.read_records(read, layout.journal_pages, sb.journal_tail,
                                     sb.journal_seq):
        if isinstance(item, tuple):
            end = item
        else:
            images.update(item.images)
            records += 1
    if not records:
        return sb
    log.info("%s: replaying %d journal record(s), %d page(s)", device.path, records, len(images))
    for page_no, image in sorted(images.items()):
        _write_page_sync(device, page_no, image)
    device.flush()
    position, seq = end
    new = sb.next(journal_tail=position % layout.journal_pages, journal_seq=seq)
    _write_superblock(device, new)
    return new

