"""``linear``: LVM2 classic snapshots (dm-snapshot), the baseline the other designs beat.

**Origins are thick.** Creating a volume allocates every chunk of it at once,
as one physically contiguous run when the pool has one (LVM allocates extents
contiguously), else as the fewest, largest free runs (at most ``max_segments``,
recorded in a segment page). An origin's map is therefore arithmetic, never a
lookup: chunk ``lc`` lives at ``segment.pc + lc - segment.lc``. Creation fails
with a UserError when the pool has not that many chunks free and unpromised.

**Never-written chunks read as zeros.** A chunk handed to a new origin may
still hold an old volume's bytes, and zeroing a whole volume at creation would
cost its full size in writes. So each origin keeps a *write-epoch map*: a
u32 per chunk, 0 while the chunk has never been written (it reads, and
reports in block status, as a hole), else the origin's snapshot epoch when it
was first written. Its pages (a small radix tree of u32 entries) are allocated
as chunks get written: a fresh origin has none. The first write to a chunk is
``Redirect(HOLE, into=pc)``: the volume layer writes the whole chunk in place
(zeros around the new bytes), and only then does ``map`` record the epoch, so
neither a racing read nor a crash can show the old bytes. TRIM of an origin
chunk that no snapshot still reads sets it back to 0 (the chunk stays
allocated: the volume is thick). Cost: 4 bytes of metadata per written chunk
(0.1% at 4 KiB chunks), against 1 bit for a plain bitmap, bought so that a
first write never touches the snapshots (below).

**Snapshots (``snapshot``: read-only, ``fork``: writable) are dm-snapshot
exception stores**: an empty, sparse radix tree per snapshot (``exc_fanout``
8-byte entries per page), created in O(1) with no copying. A leaf entry is
*none* (read the origin), *zero* (reads as zeros: trimmed in the snapshot),
or the snapshot's own chunk (its exception). An interior entry may also be
*zero* for a whole subtree, so a TRIM of a large range costs O(pages), not
O(chunks). Pages are never shared, so every reference count here is 1.

The origin keeps the list of its snapshots (one page of volume ids), as LVM
does, and an epoch that every snapshot taken of it increments; the snapshot
records the epoch it was taken at. A snapshot reads an origin chunk it holds
no exception for only if the chunk was first written at or before its epoch;
a chunk first written later was zeros when the snapshot was taken.

**A write to a written origin chunk** first preserves it for every snapshot
that still reads it from the origin: ``CopyOut(pc, preserve)``. The volume
layer copies the chunk into a fresh chunk for each, maps it into that
snapshot, commits (durably: dm-snapshot's persistent exception store), and
only then overwrites the origin in place. **The cost grows with the number of
snapshots**: with k snapshots lacking the chunk, the first write costs k chunk
reads and writes, k exception inserts and one durable commit before the write
itself; later writes to the chunk are plain in-place writes, but every origin
write still checks k exception stores (O(k x tree height) cached page reads).
The first write to an *unwritten* origin chunk copies nothing and touches no
snapshot: its epoch tells every older snapshot that it was zeros. So no
mini-transaction's size grows with the number of snapshots (each copy-out is
its own), and the journal bounds no snapshot count.

**Claims.** When a snapshot stops reading an origin chunk (its own write, a
trim, a copy-out), the origin chunk's entry gets a CLAIM flag (its top bit).
The origin's next write of the chunk answers ``Claim`` instead of ``InPlace``:
the volume layer first commits if metadata is pending (a crash must not lose
the snapshot's new exception while keeping the origin's overwrite) and waits
for reads begun before (the snapshot may still be reading the old bytes), then
``claim`` clears the flag and later writes go in place. After a ``CopyOut`` the
volume layer claims the chunk the same way. An origin TRIM never makes a
flagged chunk unwritten (it zero-writes it, through the claim).

**A snapshot read** takes its exception if there is one (owner: the snapshot),
else the origin's chunk (owner: the origin, so ``qemu:allocation-depth`` says
2). **A snapshot write** goes in place into its exception, else is redirected
to a fresh chunk (filled from the origin's chunk) that ``map`` records as the
exception.

**What LVM refuses, this refuses**: a snapshot or fork of a snapshot (dm-
snapshot cannot stack snapshots; see :meth:`LinearMap.clone_refused`), and
deleting an origin that still has snapshots. Deleting a snapshot unlinks it
from its origin first, then frees its exceptions and tree pages in bounded
steps; the unlink comes after the delete's mark is durable, and until then the
origin preserves chunks for it as for any snapshot (a crash brings it back).
Unlike LVM, a snapshot's exception store is not a fixed-size COW volume that
becomes invalid when full: exceptions come from the pool, and an origin write
fails with ENOSPC when the pool cannot hold its copies.

**TRIM / WRITE_ZEROES**: on a snapshot, the range becomes *zero* exceptions
(its exception chunks are freed); dropping them would expose the origin's
bytes instead. On an origin, a chunk no snapshot reads from the origin (each
holds an exception, or was taken before the chunk's first write) becomes
unwritten again; a chunk some snapshot still reads from the origin cannot
(the snapshot needs the old bytes), so it is returned for the caller to
overwrite with zeros, which goes through ``CopyOut``.

Metadata and memory stay bounded: every structure lives in pages read through
the page cache; no Python structure holds per-chunk state between calls.

``map_params`` (superblock): exception-tree fan-out (2..510), entries per
write-epoch leaf (2..1020), write-epoch node fan-out (2..1020), and the segment
limit (1..255); 0 means the default. Tests shrink them.
"""

from __future__ import annotations

import heapq
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import ClassVar, NamedTuple

from nbdserver.blockmap.base import (
    HOLE,
    BlockMap,
    Claim,
    CopyOut,
    InPlace,
    Redirect,
    Run,
    TargetRun,
    WriteTarget,
    full_tree_pages,
    merge_target,
    register,
)
from nbdserver.errors import UserError, some_names
from nbdserver.pool.format import (
    MAP_STATE_SIZE,
    PAGE_HEADER_SIZE,
    PAGE_PAYLOAD,
    PT_LINEAR,
    REFS_PER_PAGE,
    VolumeRecord,
)
from nbdserver.sizes import format_size

ORIGIN = 1
SNAPSHOT = 2

MAX_EXC_FANOUT = PAGE_PAYLOAD // 8  # 510 exception entries per page
MAX_LEAF = PAGE_PAYLOAD // 4  # 1020 write epochs per leaf
MAX_FANOUT = PAGE_PAYLOAD // 4  # 1020 child pointers per write-epoch node
MAX_SEGMENTS = PAGE_PAYLOAD // 16  # 255 segments in the segment page
MAX_SNAPSHOTS = PAGE_PAYLOAD // 4  # 1020 snapshot ids in the snapshot list page

# Exception entries (leaf and interior): nothing, zeros, or target + 2.
NONE = 0
ZERO = 1

WORK_BUDGET = 2048  # entries and pages one unmap call may change
NO_BUDGET = 1 << 62  # a walk that must finish
JOURNAL_SHARE = 2  # a volume creation may dirty at most 1/JOURNAL_SHARE of the journal ring

_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_SEG = struct.Struct("<QQ")  # first logical chunk, first physical chunk
# kind, write-epoch map height, snapshots, segments, segment (pc, or page when several),
# write-epoch map root (page + 1), snapshot list (page + 1), chunks released (delete),
# epoch (the next snapshot's)
_ORIGIN = struct.Struct("<BBHIQQQQI")
_SNAP = struct.Struct("<BBHIQI")  # kind, tree height, 0, origin id, root entry, epoch
EPOCH_MASK = 0x7FFFFFFF  # a write-epoch entry: the epoch, and ...
CLAIM = 0x80000000  # ... a snapshot stopped reading the chunk: claim before writing in place
MAX_EPOCH = EPOCH_MASK

LIMITATION = ("the linear block map models LVM2 classic snapshots (dm-snapshot), which "
              "cannot snapshot or fork a snapshot")


class _Origin(NamedTuple):
    wm_height: int
    nsnap: int
    nsegs: int
    seg: int
    wm_root: int
    snaplist: int
    released: int
    epoch: int


class _Snap(NamedTuple):
    height: int
    origin: int
    root: int
    epoch: int


def _u64(page: bytes | bytearray, i: int) -> int:
    return int(_Q.unpack_from(page, PAGE_HEADER_SIZE + 8 * i)[0])


def _u32(page: bytes | bytearray, i: int) -> int:
    return int(_I.unpack_from(page, PAGE_HEADER_SIZE + 4 * i)[0])


def _resolve(params: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The parameters with 0 read as the default: exception fan-out, write-epoch leaf,
    write-epoch fan-out, segment limit. ValueError when one is out of range."""
    exc_fanout = params[0] or MAX_EXC_FANOUT
    leaf = params[1] or MAX_LEAF
    fanout = params[2] or MAX_FANOUT
    max_segments = params[3] or MAX_SEGMENTS
    if not 2 <= exc_fanout <= MAX_EXC_FANOUT:
        raise ValueError(f"linear exception fan-out {exc_fanout} out of range "
                         f"2..{MAX_EXC_FANOUT}")
    if not 2 <= leaf <= MAX_LEAF:
        raise ValueError(f"linear write-epoch leaf of {leaf} entries out of range 2..{MAX_LEAF}")
    if not 2 <= fanout <= MAX_FANOUT:
        raise ValueError(f"linear write-epoch fan-out {fanout} out of range 2..{MAX_FANOUT}")
    if not 1 <= max_segments <= MAX_SEGMENTS:
        raise ValueError(f"linear segment limit {max_segments} out of range 1..{MAX_SEGMENTS}")
    return exc_fanout, leaf, fanout, max_segments


@register
class LinearMap(BlockMap):
    """LVM2 classic snapshots: thick origins, per-snapshot exception stores."""

    name: ClassVar[str] = "linear"
    description: ClassVar[str] = ("LVM2 classic snapshots: thick contiguous origins; an origin "
                                  "write copies the old chunk into every snapshot")
    supports_clone_of_clone: ClassVar[bool] = False

    @classmethod
    def check_params(cls, params: tuple[int, int, int, int]) -> None:
        _resolve(params)

    def __init__(self, pool: object) -> None:
        super().__init__(pool)  # type: ignore[arg-type]
        self.exc_fanout, self.leaf, self.fanout, self.max_segments = _resolve(
            self.pool.sb.map_params)
        self.meta_start = self.pool.layout.meta_start
        self.chunk_size = self.pool.sb.chunk_size
        self._zero_node = _Q.pack(ZERO) * self.exc_fanout
        self._dirty_stop = NO_BUDGET  # (a walk that must finish: see _begin_step)

    def _spent(self, budget: int) -> bool:
        """Whether a bounded step must stop here (NO_BUDGET: never; it finishes)."""
        return budget < NO_BUDGET and (self._work >= budget or self._dirty_full())

    @classmethod
    def default_params(cls) -> tuple[int, int, int, int]:
        return (MAX_EXC_FANOUT, MAX_LEAF, MAX_FANOUT, MAX_SEGMENTS)

    @classmethod
    def small_params(cls) -> tuple[int, int, int, int]:
        """Tiny pages for tests: deep exception trees and write-epoch maps from few chunks."""
        return (4, 16, 3, 16)

    # -- map state ------------------------------------------------------------------------

    def _chunks(self, vol: VolumeRecord) -> int:
        return max(1, -(-vol.size // self.chunk_size))

    def _page(self, index: int) -> int:
        return self.meta_start + index

    @staticmethod
    def _kind(vol: VolumeRecord) -> int:
        return vol.map_state[0]

    @staticmethod
    def _origin(vol: VolumeRecord) -> _Origin:
        f = _ORIGIN.unpack_from(vol.map_state)
        if f[0] != ORIGIN:
            raise AssertionError(f"volume {vol.name!r} is not a linear origin")
        return _Origin(*f[1:])

    @staticmethod
    def _snap(vol: VolumeRecord) -> _Snap:
        f = _SNAP.unpack_from(vol.map_state)
        if f[0] != SNAPSHOT:
            raise AssertionError(f"volume {vol.name!r} is not a linear snapshot")
        return _Snap(f[1], f[3], f[4], f[5])

    @staticmethod
    def _origin_bytes(st: _Origin) -> bytes:
        return _ORIGIN.pack(ORIGIN, *st).ljust(MAP_STATE_SIZE, b"\0")

    @staticmethod
    def _snap_bytes(st: _Snap) -> bytes:
        packed = _SNAP.pack(SNAPSHOT, st.height, 0, st.origin, st.root, st.epoch)
        return packed.ljust(MAP_STATE_SIZE, b"\0")

    def _set_origin(self, vol: VolumeRecord, st: _Origin) -> None:
        self.pool.update_volume(vol, map_state=self._origin_bytes(st))

    def _set_snap(self, vol: VolumeRecord, st: _Snap) -> None:
        self.pool.update_volume(vol, map_state=self._snap_bytes(st))

    def _new_page(self, vol: VolumeRecord) -> int:
        """A fresh zero-filled metadata page of `vol`'s map; returns its index."""
        index = self._new_map_page(vol)
        self.cache.create(self._page(index), PT_LINEAR)
        return index

    def _spans(self, height: int) -> list[int]:
        """spans[l]: chunks one write-epoch node of level l covers (level 0: a leaf)."""
        spans = [self.leaf]
        for _ in range(1, height):
            spans.append(spans[-1] * self.fanout)
        return spans

    def _wm_height(self, chunks: int) -> int:
        height, cap = 1, self.leaf
        while cap < chunks:
            height += 1
            cap *= self.fanout
        return height

    def _exc_height(self, chunks: int) -> int:
        height, cap = 1, self.exc_fanout
        while cap < chunks:
            height += 1
            cap *= self.exc_fanout
        return height

    # -- lifecycle ------------------------------------------------------------------------

    def init_volume(self, vol: VolumeRecord) -> None:
        """Allocate the origin thick: one contiguous run if the pool has one. O(chunks)."""
        n = self._chunks(vol)
        available = self.pool.available_chunks()
        if available < n:
            raise UserError(
                f"cannot create {vol.name!r}: the linear block map allocates volumes thick "
                f"(LVM), and it needs {format_size(n * self.chunk_size)} but only "
                f"{format_size(max(0, available) * self.chunk_size)} is free and not "
                "promised")
        limit = self.pool.ring.ring_pages // JOURNAL_SHARE * REFS_PER_PAGE
        if n > limit:
            raise UserError(
                f"cannot create {vol.name!r}: a thick volume of {n} chunks would change more "
                f"reference-count pages than this pool's journal holds in one transaction "
                f"(at most {limit} chunks); use a larger --chunk-size")
        runs = self._find_runs(n)
        if runs is None:
            raise UserError(
                f"cannot create {vol.name!r}: the pool's free space is too fragmented for a "
                f"thick volume of {n * self.chunk_size} bytes (it would take more than "
                f"{self.max_segments} separate runs)")
        # Load every refcount page first: a page missing half way through would roll back
        # (and redo) all the counting before it, once per page (quadratic online).
        for pc, count in runs:
            for pi in range(pc // REFS_PER_PAGE, (pc + count - 1) // REFS_PER_PAGE + 1):
                self.cache.get(self.data.first_page + pi)
        for pc, count in runs:
            self.data.incref_run(pc, count)
        if len(runs) == 1:
            seg = runs[0][0]
        else:
            seg = self._new_page(vol)
            page = self.cache.modify(self._page(seg), PT_LINEAR)
            lc = 0
            for i, (pc, count) in enumerate(runs):
                _SEG.pack_into(page, PAGE_HEADER_SIZE + 16 * i, lc, pc)
                lc += count
        vol.map_state = self._origin_bytes(
            _Origin(self._wm_height(n), 0, len(runs), seg, 0, 0, 0, 1))

    def _free_runs(self, excluded: list[int]) -> Iterator[tuple[int, int]]:
        """Maximal runs (first, count) of free, usable chunks, in order. Skips full pages
        without reading them; reads only partly used refcount pages."""
        table = self.data
        start = -1
        for pi in range(table.pages):
            free = table.free_in_page[pi]
            n = table.entries_in_page(pi)
            base = pi * REFS_PER_PAGE
            if free == n:
                # wholly free: one stretch, cut by the excluded units inside it
                lo = bisect_left(excluded, base)
                hi = bisect_left(excluded, base + n)
                if start < 0:
                    start = base
                for unit in excluded[lo:hi]:
                    if unit > start:
                        yield start, unit - start
                    start = unit + 1
                if start >= base + n:
                    start = -1
                continue
            if not free:
                if start >= 0:
                    yield start, base - start
                    start = -1
                continue
            raw = self.cache.get(table.first_page + pi)
            counts = memoryview(raw)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * n].cast("I")
            lo = bisect_left(excluded, base)
            hi = bisect_left(excluded, base + n)
            skip = set(excluded[lo:hi])
            for i, c in enumerate(counts):
                unit = base + i
                if c or unit in skip:
                    if start >= 0:
                        yield start, unit - start
                        start = -1
                elif start < 0:
                    start = unit
        if start >= 0:
            yield start, table.count - start

    def _find_runs(self, n: int) -> list[tuple[int, int]] | None:
        """Free runs covering `n` chunks: the first single run that fits (first fit), else
        the fewest largest ones, in physical order; None if more than max_segments needed."""
        table = self.data
        excluded = sorted(table.claimed | table.quarantine)
        largest: list[tuple[int, int]] = []  # min-heap of (count, first), max_segments long
        for first, count in self._free_runs(excluded):
            if count >= n:
                return [(first, n)]
            if len(largest) < self.max_segments:
                heapq.heappush(largest, (count, first))
            elif count > largest[0][0]:
                heapq.heapreplace(largest, (count, first))
        chosen: list[tuple[int, int]] = []
        need = n
        for count, first in sorted(largest, reverse=True):
            take = min(count, need)
            chosen.append((first, take))
            need -= take
            if not need:
                return sorted(chosen)
        return None

    def clone_refused(self, src: VolumeRecord) -> str | None:
        if self._kind(src) == SNAPSHOT:
            origin = self.pool.volumes.get(self._snap(src).origin)
            where = f"snapshot or fork the origin {origin.name!r} instead" if origin else (
                "snapshot or fork its origin instead")
            what = "a snapshot" if src.is_snapshot else "a fork (a writable snapshot)"
            return (f"volume {src.name!r} is {what}: {LIMITATION} (no snapshot or fork of "
                    f"one); {where}, or use a pool with the radix or extent block map")
        if self._kind(src) == ORIGIN:
            st = self._origin(src)
            if st.nsnap >= MAX_SNAPSHOTS:
                return (f"volume {src.name!r} already has {MAX_SNAPSHOTS} snapshots, the most "
                        "the linear block map keeps per origin")
            if st.epoch >= MAX_EPOCH:
                return f"volume {src.name!r} has been snapshotted {MAX_EPOCH} times, the most"
        return None

    def delete_refused(self, vol: VolumeRecord) -> str | None:
        if self._kind(vol) != ORIGIN:
            return None
        st = self._origin(vol)
        if not st.nsnap:
            return None
        names = sorted(v.name for v in self.pool.volumes.values()
                       if v.parent == vol.id and not v.deleted and self._kind(v) == SNAPSHOT)
        listed = some_names(names) or f"{st.nsnap} being deleted"
        return (f"volume {vol.name!r} is the origin of {st.nsnap} snapshot(s) ({listed}): "
                "the linear block map (LVM2 classic snapshots) cannot delete an origin while "
                "snapshots depend on it; delete the snapshots first")

    def clone(self, src: VolumeRecord, dst: VolumeRecord) -> None:
        """A new, empty exception store, linked into the origin's snapshot list. O(1)."""
        why = self.clone_refused(src)
        if why:
            raise UserError(why)
        st = self._origin(src)
        listed = st.snaplist or self._new_page(src) + 1
        page = self.cache.modify(self._page(listed - 1), PT_LINEAR)
        _I.pack_into(page, PAGE_HEADER_SIZE + 4 * st.nsnap, dst.id)
        self._set_origin(src, st._replace(nsnap=st.nsnap + 1, snaplist=listed,
                                          epoch=st.epoch + 1))
        dst.map_state = self._snap_bytes(
            _Snap(self._exc_height(self._chunks(dst)), src.id, 0, st.epoch))

    def _snapshot_ids(self, st: _Origin) -> list[int]:
        if not st.nsnap:
            return []
        page = self.cache.get(self._page(st.snaplist - 1))
        return [_u32(page, i) for i in range(st.nsnap)]

    def _linked_snapshots(self, st: _Origin) -> list[VolumeRecord]:
        """The origin's snapshots, which its writes preserve chunks for: every one in its
        list, also one being deleted. A delete unlinks the snapshot only once its mark is
        durable (:meth:`release`); before, a crash brings the snapshot back whole, so the
        origin may not overwrite in place, nor make unwritten, a chunk it still reads.
        (The volume layer copies nothing into a snapshot being deleted, and :meth:`map`
        drops a copy begun before its mark; the commit the origin's write waits for before
        it writes in place makes the mark durable.)"""
        out = []
        for sid in self._snapshot_ids(st):
            snap = self.pool.volumes.get(sid)
            if snap is not None:
                out.append(snap)
        return out

    def unmap_may_write(self, vol: VolumeRecord) -> bool:
        """An origin: a chunk a snapshot still reads, or read until lately (CLAIM, which
        outlives the snapshot's deletion), is written with zeros, not unmapped (see
        :meth:`unmap`); telling which would walk the range, so any origin says yes."""
        return self._kind(vol) == ORIGIN

    def _unlink(self, snap: VolumeRecord, origin_id: int) -> None:
        origin = self.pool.volumes.get(origin_id)
        if origin is None or self._kind(origin) != ORIGIN:
            return
        st = self._origin(origin)
        ids = self._snapshot_ids(st)
        if snap.id not in ids:
            return
        i = ids.index(snap.id)
        if st.nsnap == 1:
            self.meta.decref(st.snaplist - 1)
            self._set_origin(origin, st._replace(nsnap=0, snaplist=0))
            return
        page = self.cache.modify(self._page(st.snaplist - 1), PT_LINEAR)
        _I.pack_into(page, PAGE_HEADER_SIZE + 4 * i, ids[-1])
        _I.pack_into(page, PAGE_HEADER_SIZE + 4 * (st.nsnap - 1), 0)
        self._set_origin(origin, st._replace(nsnap=st.nsnap - 1))

    def release(self, vol: VolumeRecord, budget: int) -> bool:
        if self._kind(vol) == SNAPSHOT:
            sst = self._snap(vol)
            self._unlink(vol, sst.origin)  # first, so that no copy-out targets it any more
            if sst.root == NONE:
                return True
            self._begin_step()
            n = self.exc_fanout ** sst.height
            root, _ = self._exc_fill(vol, sst.root, sst.height - 1, 0, 0, n, NONE, budget)
            if root != sst.root:
                self._set_snap(vol, sst._replace(root=root))
            return root == NONE
        if self._kind(vol) != ORIGIN:
            return True  # never initialised
        st = self._origin(vol)
        if st.nsnap:
            raise AssertionError(f"release of origin {vol.name!r} with snapshots")
        n = self._chunks(vol)
        if st.released < n:
            stop = min(n, st.released + budget)
            for _, count, pc in self._pieces(vol, st, st.released, stop - st.released):
                self.data.decref_run(pc, count)
            self._set_origin(vol, st._replace(released=stop))
            return False
        if st.wm_root:
            self._begin_step()
            root = self._wm_clear(st.wm_root, st.wm_height - 1, 0, 0,
                                  self._spans(st.wm_height)[-1], budget)
            self._set_origin(vol, st._replace(wm_root=root))
            return False
        if st.nsegs > 1:
            self.meta.decref(st.seg)
        if st.nsegs:
            self._set_origin(vol, st._replace(nsegs=0, seg=0))
        return True

    # -- origin geometry ----------------------------------------------------------------------

    def _segment(self, vol: VolumeRecord, st: _Origin, lc: int) -> tuple[int, int, int]:
        """(first lc, first pc, end lc) of the segment holding `lc`. O(log segments)."""
        if st.nsegs == 1:
            return 0, st.seg, self._chunks(vol)
        page = self.cache.get(self._page(st.seg))
        lo, hi = 0, st.nsegs - 1
        while lo < hi:  # the last segment starting at or before lc
            mid = (lo + hi + 1) // 2
            if _SEG.unpack_from(page, PAGE_HEADER_SIZE + 16 * mid)[0] <= lc:
                lo = mid
            else:
                hi = mid - 1
        first, pc = _SEG.unpack_from(page, PAGE_HEADER_SIZE + 16 * lo)
        end = (_SEG.unpack_from(page, PAGE_HEADER_SIZE + 16 * (lo + 1))[0]
               if lo + 1 < st.nsegs else self._chunks(vol))
        return int(first), int(pc), int(end)

    def _pc(self, vol: VolumeRecord, st: _Origin, lc: int) -> int:
        first, pc, _ = self._segment(vol, st, lc)
        return pc + lc - first

    def _pieces(self, vol: VolumeRecord, st: _Origin, lc: int,
                count: int) -> Iterator[tuple[int, int, int]]:
        """(lc, count, pc) pieces of [lc, lc+count) that are physically contiguous."""
        end = lc + count
        while lc < end:
            first, pc, seg_end = self._segment(vol, st, lc)
            n = min(end, seg_end) - lc
            yield lc, n, pc + lc - first
            lc += n

    # -- the write-epoch map -------------------------------------------------------------------

    def _wentry(self, st: _Origin, lc: int) -> int:
        """The write-epoch entry of chunk `lc`: the epoch it was first written at (0 if
        never; ``& EPOCH_MASK``) and the CLAIM flag. O(height)."""
        leaf = self._wm_leaf(st, lc)
        return 0 if leaf is None else _u32(leaf, lc % self.leaf)

    def _wm_leaf(self, st: _Origin, lc: int) -> bytearray | None:
        """The write-epoch leaf page holding chunk `lc`, or None while it has none."""
        e = st.wm_root
        if not e:
            return None
        spans = self._spans(st.wm_height)
        get = self.cache.get
        for level in range(st.wm_height - 1, 0, -1):
            e = _u32(get(self._page(e - 1)), (lc // spans[level - 1]) % self.fanout)
            if not e:
                return None
        return get(self._page(e - 1))

    def _visible(self, st: _Origin, lo: int, hi: int,
                 limit: int = MAX_EPOCH) -> Iterator[tuple[int, int, bool]]:
        """(first, count, visible) runs covering [lo, hi), merged: a chunk is visible to a
        snapshot of epoch `limit` if it was first written at or before it (to the origin
        itself: if it was written at all)."""
        spans = self._spans(st.wm_height)
        first, count, state = lo, 0, False
        for s, n, v in self._wm_walk(st.wm_root, st.wm_height - 1, 0, lo, hi, spans, limit):
            if count and v == state:
                count += n
                continue
            if count:
                yield first, count, state
            first, count, state = s, n, v
        if count:
            yield first, count, state

    def _wm_walk(self, e: int, level: int, base: int, lo: int, hi: int, spans: list[int],
                 limit: int) -> Iterator[tuple[int, int, bool]]:
        if not e:
            yield lo, hi - lo, False
            return
        node = self.cache.get(self._page(e - 1))
        if level == 0:
            a = lo - base
            epochs = memoryview(node)[PAGE_HEADER_SIZE + 4 * a:
                                      PAGE_HEADER_SIZE + 4 * (hi - base)].cast("I")
            if not any(epochs):
                yield lo, hi - lo, False
                return
            for i, w in enumerate(epochs):
                yield lo + i, 1, 0 < w & EPOCH_MASK <= limit
            return
        span = spans[level - 1]
        for i in range((lo - base) // span, (hi - 1 - base) // span + 1):
            s = max(lo, base + i * span)
            t = min(hi, base + (i + 1) * span)
            yield from self._wm_walk(_u32(node, i), level - 1, base + i * span, s, t, spans,
                                     limit)

    def _wm_set(self, vol: VolumeRecord, st: _Origin, lc: int, epoch: int) -> None:
        """Record that chunk `lc` was first written at `epoch` (creating the path)."""
        if not st.wm_root:
            st = st._replace(wm_root=self._new_page(vol) + 1)
            self._set_origin(vol, st)
        spans = self._spans(st.wm_height)
        e = st.wm_root
        for level in range(st.wm_height - 1, 0, -1):
            page_no = self._page(e - 1)
            i = (lc // spans[level - 1]) % self.fanout
            child = _u32(self.cache.get(page_no), i)
            if not child:
                child = self._new_page(vol) + 1
                _I.pack_into(self.cache.modify(page_no, PT_LINEAR), PAGE_HEADER_SIZE + 4 * i,
                             child)
            e = child
        leaf = self.cache.modify(self._page(e - 1), PT_LINEAR)
        _I.pack_into(leaf, PAGE_HEADER_SIZE + 4 * (lc % self.leaf), epoch)

    def _wm_put(self, st: _Origin, lc: int, entry: int) -> None:
        """Change the entry of a chunk whose leaf exists (a written one)."""
        spans = self._spans(st.wm_height)
        e = st.wm_root
        for level in range(st.wm_height - 1, 0, -1):
            e = _u32(self.cache.get(self._page(e - 1)), (lc // spans[level - 1]) % self.fanout)
        leaf = self.cache.modify(self._page(e - 1), PT_LINEAR)
        _I.pack_into(leaf, PAGE_HEADER_SIZE + 4 * (lc % self.leaf), entry)

    def _unshare(self, origin: VolumeRecord, lo: int, hi: int, epoch: int) -> None:
        """A snapshot of `epoch` stops reading the origin's chunks [lo, hi): flag those it
        read (CLAIM), so that the origin claims them before writing them in place."""
        st = self._origin(origin)
        hi = min(hi, self._chunks(origin))
        seen = [(first, n) for first, n, visible in self._visible(st, lo, hi, epoch) if visible]
        for first, n in seen:
            for c in range(first, first + n):
                entry = self._wentry(st, c)
                if not entry & CLAIM:
                    self._wm_put(st, c, entry | CLAIM)

    def _sees(self, origin: VolumeRecord, lo: int, hi: int, epoch: int) -> bool:
        """Whether a snapshot of `epoch` would read any origin chunk of [lo, hi)."""
        st = self._origin(origin)
        hi = min(hi, self._chunks(origin))
        return lo < hi and any(v for _, _, v in self._visible(st, lo, hi, epoch))

    def _wm_clear(self, e: int, level: int, base: int, lo: int, hi: int, budget: int) -> int:
        """Mark [lo, hi) below entry `e` unwritten, freeing pages left empty, in at most
        about `budget` page visits (self._work). Returns the entry's new value."""
        if not e:
            return 0
        page_no = self._page(e - 1)
        spans = self._spans(level + 1)
        whole = lo <= base and hi >= base + spans[level]
        self._work += 1
        if level == 0:
            if not whole:
                node = self.cache.modify(page_no, PT_LINEAR)
                node[PAGE_HEADER_SIZE + 4 * (lo - base):PAGE_HEADER_SIZE + 4 * (hi - base)] = \
                    bytes(4 * (hi - lo))
                if any(memoryview(node)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * self.leaf]):
                    return e
            self.meta.decref(e - 1)
            return 0
        span = spans[level - 1]
        for i in range((lo - base) // span, (hi - 1 - base) // span + 1):
            child = _u32(self.cache.get(page_no), i)
            if not child:
                continue
            if self._spent(budget):
                break
            s = max(lo, base + i * span)
            t = min(hi, base + (i + 1) * span)
            new = self._wm_clear(child, level - 1, base + i * span, s, t, budget)
            if new != child:
                _I.pack_into(self.cache.modify(page_no, PT_LINEAR), PAGE_HEADER_SIZE + 4 * i,
                             new)
        node = self.cache.get(page_no)
        if any(memoryview(node)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * self.fanout]):
            return e
        self.meta.decref(e - 1)
        return 0

    def _origin_runs(self, vol: VolumeRecord, st: _Origin, lc: int, count: int,
                     out: list[Run], limit: int = MAX_EPOCH) -> None:
        """Runs of the origin's chunks [lc, lc+count) as a reader of epoch `limit` sees them."""
        for first, n, visible in self._visible(st, lc, lc + count, limit):
            if not visible:
                self._emit(out, first, n, HOLE, 0)
                continue
            for plc, pn, pc in self._pieces(vol, st, first, n):
                self._emit(out, plc, pn, pc, vol.id)

    # -- exception stores ---------------------------------------------------------------------

    def _exc_get(self, st: _Snap, lc: int) -> int:
        """The leaf entry for `lc`: NONE, ZERO or chunk + 2. O(height)."""
        e = st.root
        fanout = self.exc_fanout
        get = self.cache.get
        for level in range(st.height - 1, -1, -1):
            if e <= ZERO:
                return e
            e = _u64(get(self._page(e - 2)), (lc // fanout ** level) % fanout)
        return e

    def _exc_node(self, snap: VolumeRecord, fill: int) -> int:
        """A new page of `snap`'s exception tree whose entries are all `fill`; returns its
        entry."""
        index = self._new_page(snap)
        if fill == ZERO:
            page = self.cache.modify(self._page(index), PT_LINEAR)
            page[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 8 * self.exc_fanout] = self._zero_node
        return index + 2

    def _exc_set(self, snap: VolumeRecord, lc: int, value: int) -> int:
        """Set the leaf entry of `lc` (creating or splitting the path); returns the old one."""
        st = self._snap(snap)
        fanout = self.exc_fanout
        e = st.root
        if e <= ZERO:
            e = self._exc_node(snap, e)
            self._set_snap(snap, st._replace(root=e))
        for level in range(st.height - 1, 0, -1):
            page_no = self._page(e - 2)
            off = PAGE_HEADER_SIZE + 8 * ((lc // fanout ** level) % fanout)
            child = int(_Q.unpack_from(self.cache.get(page_no), off)[0])
            if child <= ZERO:
                child = self._exc_node(snap, child)
                _Q.pack_into(self.cache.modify(page_no, PT_LINEAR), off, child)
            e = child
        page_no = self._page(e - 2)
        off = PAGE_HEADER_SIZE + 8 * (lc % fanout)
        old = int(_Q.unpack_from(self.cache.get(page_no), off)[0])
        if old != value:
            _Q.pack_into(self.cache.modify(page_no, PT_LINEAR), off, value)
        return old

    def _exc_fill(self, snap: VolumeRecord, e: int, level: int, base: int, lo: int, hi: int,
                  value: int, budget: int, origin: VolumeRecord | None = None,
                  epoch: int = 0) -> tuple[int, int | None]:
        """Set every entry of [lo, hi) below `e` (a node of `level` covering from `base`,
        in `snap`'s exception tree) to
        `value` (NONE or ZERO), freeing the chunks and pages this drops, within `budget`
        work (self._work). Returns the entry's new value and, if the budget ran out, the
        first chunk not done. With `origin` (a trim: ZERO), origin chunks the snapshot (of
        `epoch`) read and no longer does are flagged CLAIM, one entry at a time."""
        if e == value:
            return e, None
        fanout = self.exc_fanout
        span = fanout ** level
        if e <= ZERO:
            whole = lo <= base and hi >= base + span * fanout
            if whole and not (e == NONE and origin is not None
                              and self._sees(origin, base, base + span * fanout, epoch)):
                return value, None
            e = self._exc_node(snap, e)
            self._work += 1
        page_no = self._page(e - 2)
        stop: int | None = None
        for i in range((lo - base) // span, (hi - 1 - base) // span + 1):
            off = PAGE_HEADER_SIZE + 8 * i
            child = int(_Q.unpack_from(self.cache.get(page_no), off)[0])
            if child == value:
                continue
            if self._spent(budget):
                stop = max(lo, base + i * span)
                break
            if level == 0:
                if child > ZERO:
                    self.data.decref(child - 2)
                elif origin is not None:  # NONE -> ZERO
                    self._unshare(origin, base + i, base + i + 1, epoch)
                self._work += 1
                _Q.pack_into(self.cache.modify(page_no, PT_LINEAR), off, value)
                continue
            s = max(lo, base + i * span)
            t = min(hi, base + (i + 1) * span)
            new, child_stop = self._exc_fill(snap, child, level - 1, base + i * span, s, t,
                                             value, budget, origin, epoch)
            if new != child:
                _Q.pack_into(self.cache.modify(page_no, PT_LINEAR), off, new)
            if child_stop is not None:
                stop = child_stop
                break
        node = memoryview(self.cache.get(page_no))[PAGE_HEADER_SIZE:
                                                   PAGE_HEADER_SIZE + 8 * fanout]
        if (value == NONE and not any(node)) or (value == ZERO and node == self._zero_node):
            self.meta.decref(e - 2)
            return value, stop
        return e, stop

    def _snap_runs(self, snap: VolumeRecord, st: _Snap, lc: int, count: int,
                   out: list[Run]) -> None:
        origin = self.pool.volumes.get(st.origin)
        ost = self._origin(origin) if origin is not None else None

        def leaf(start: int, n: int, e: int) -> None:
            if e == ZERO or (e == NONE and (ost is None or origin is None)):
                self._emit(out, start, n, HOLE, 0)
            elif e == NONE:
                assert origin is not None and ost is not None
                self._origin_runs(origin, ost, start, n, out, st.epoch)
            else:
                self._emit(out, start, n, e - 2, snap.id)

        self._exc_walk(st.root, st.height - 1, 0, lc, lc + count, leaf)

    def _exc_walk(self, e: int, level: int, base: int, lo: int, hi: int,
                  leaf: Callable[[int, int, int], None]) -> None:
        if e <= ZERO:
            leaf(lo, hi - lo, e)
            return
        node = self.cache.get(self._page(e - 2))
        span = self.exc_fanout ** level
        for i in range((lo - base) // span, (hi - 1 - base) // span + 1):
            child = _u64(node, i)
            s = max(lo, base + i * span)
            t = min(hi, base + (i + 1) * span)
            if level == 0:
                leaf(s, 1, child)
            else:
                self._exc_walk(child, level - 1, base + i * span, s, t, leaf)

    # -- data path ----------------------------------------------------------------------------

    @staticmethod
    def _emit(out: list[Run], lc: int, count: int, pc: int, owner: int) -> None:
        if out:
            last = out[-1]
            if last.lc + last.count == lc and last.owner == owner and (
                (pc == HOLE and last.pc == HOLE)
                or (pc != HOLE and last.pc != HOLE and last.pc + last.count == pc)
            ):
                out[-1] = Run(last.lc, last.count + count, last.pc, owner)
                return
        out.append(Run(lc, count, pc, owner))

    def lookup(self, vol: VolumeRecord, lc: int, count: int) -> list[Run]:
        out: list[Run] = []
        if self._kind(vol) == ORIGIN:
            st = self._origin(vol)
            if count == 1:  # the hot path
                if not self._wentry(st, lc) & EPOCH_MASK:
                    return [Run(lc, 1, HOLE)]
                return [Run(lc, 1, self._pc(vol, st, lc), vol.id)]
            self._origin_runs(vol, st, lc, count, out)
            return out
        sst = self._snap(vol)
        if count == 1:
            e = self._exc_get(sst, lc)
            if e > ZERO:
                return [Run(lc, 1, e - 2, vol.id)]
            origin = self.pool.volumes.get(sst.origin)
            if e == ZERO or origin is None:
                return [Run(lc, 1, HOLE)]
            ost = self._origin(origin)
            if not 0 < self._wentry(ost, lc) & EPOCH_MASK <= sst.epoch:
                return [Run(lc, 1, HOLE)]
            return [Run(lc, 1, self._pc(origin, ost, lc), origin.id)]
        self._snap_runs(vol, sst, lc, count, out)
        return out

    def write_target(self, vol: VolumeRecord, lc: int) -> WriteTarget:
        if self._kind(vol) == ORIGIN:
            st = self._origin(vol)
            pc = self._pc(vol, st, lc)
            entry = self._wentry(st, lc)
            written = entry & EPOCH_MASK
            if not written:
                return Redirect(HOLE, into=pc)
            preserve = tuple(snap.id for snap in self._linked_snapshots(st)
                             if self._reads_origin(self._snap(snap), written, lc))
            if preserve:
                return CopyOut(pc, preserve)
            return Claim(pc) if entry & CLAIM else InPlace(pc)
        st_s = self._snap(vol)
        e = self._exc_get(st_s, lc)
        if e > ZERO:
            return InPlace(e - 2)
        if e == ZERO:
            return Redirect(HOLE)
        origin = self.pool.volumes[st_s.origin]
        ost = self._origin(origin)
        if not 0 < self._wentry(ost, lc) & EPOCH_MASK <= st_s.epoch:
            return Redirect(HOLE)
        return Redirect(self._pc(origin, ost, lc))

    def write_runs(self, vol: VolumeRecord, lc: int, count: int) -> list[TargetRun]:
        """:meth:`write_target` over a range; an origin without snapshots reads its write
        epochs a leaf at a time (written chunks are ``InPlace`` runs, the arithmetic map
        gives their places), anything else goes chunk by chunk."""
        if count == 1 or self._kind(vol) != ORIGIN:
            return super().write_runs(vol, lc, count)
        st = self._origin(vol)
        if st.nsnap:  # (every snapshot listed is preserved, one being deleted too)
            return super().write_runs(vol, lc, count)
        entries = self._wm_entries(st, lc, lc + count)
        runs: list[TargetRun] = []
        for plc, pn, pc in self._pieces(vol, st, lc, count):
            piece = entries[plc - lc:plc - lc + pn]
            if min(piece) > 0 and max(piece) < CLAIM:  # written, unflagged: the common case
                merge_target(runs, plc, pn, InPlace(pc))
                continue
            for k in range(pn):
                entry = entries[plc - lc + k]
                t: WriteTarget
                if not entry & EPOCH_MASK:
                    t = Redirect(HOLE, into=pc + k)
                elif entry & CLAIM:
                    t = Claim(pc + k)
                else:
                    t = InPlace(pc + k)
                merge_target(runs, plc + k, 1, t)
        return runs

    def _wm_entries(self, st: _Origin, lo: int, hi: int) -> list[int]:
        """The write-epoch entries of chunks [lo, hi), one leaf read at a time."""
        out: list[int] = []
        pos = lo
        leaf = self.leaf
        while pos < hi:
            end = min(hi, (pos // leaf + 1) * leaf)
            node = self._wm_leaf(st, pos)
            if node is None:
                out += [0] * (end - pos)
            else:
                out += memoryview(node)[PAGE_HEADER_SIZE + 4 * (pos % leaf):
                                        PAGE_HEADER_SIZE + 4 * ((end - 1) % leaf + 1)
                                        ].cast("I").tolist()
            pos = end
        return out

    def claim(self, vol: VolumeRecord, lc: int) -> None:
        """The origin writes chunk `lc` in place from now on: no snapshot reads it any more,
        and the volume layer made that durable and waited for the reads begun before."""
        if self._kind(vol) != ORIGIN:
            raise AssertionError(f"claim on the linear snapshot {vol.name!r}")
        st = self._origin(vol)
        entry = self._wentry(st, lc)
        if entry & CLAIM:
            self._wm_put(st, lc, entry & EPOCH_MASK)

    def needs_reservation(self, vol: VolumeRecord) -> bool:
        """An origin is thick, its chunks allocated at creation: nothing to promise.
        A snapshot's exception store may grow to the origin's size."""
        return self._kind(vol) != ORIGIN

    def page_bound(self, vol: VolumeRecord) -> int:
        """An origin: every page of its write-epoch map, its segment page and its snapshot
        list. A snapshot: every page of its exception tree (its pages are never shared)."""
        n = self._chunks(vol)
        if self._kind(vol) == ORIGIN:
            return full_tree_pages(n, self.leaf, self.fanout, self._wm_height(n)) + 2
        return full_tree_pages(n, self.exc_fanout, self.exc_fanout, self._exc_height(n))

    def can_relocate(self, vol: VolumeRecord) -> bool:
        """A thick origin's map is arithmetic: its chunks never move. A snapshot's
        exceptions may (``map`` replaces one, freeing the old)."""
        return self._kind(vol) != ORIGIN

    def _reads_origin(self, sst: _Snap, written: int, lc: int) -> bool:
        """Whether a snapshot reads chunk `lc` (first written at epoch `written`, nonzero)
        from its origin: it was written before the snapshot, which holds no exception."""
        return written <= sst.epoch and self._exc_get(sst, lc) == NONE

    def map(self, vol: VolumeRecord, lc: int, pc: int) -> None:
        if self._kind(vol) == ORIGIN:
            # Only the first write to an unwritten chunk maps (Redirect into the own chunk).
            st = self._origin(vol)
            own = self._pc(vol, st, lc)
            if pc != own:
                raise AssertionError(f"linear origin {vol.name!r}: chunk {lc} is {own}, "
                                     f"not {pc}")
            if not self._wentry(st, lc) & EPOCH_MASK:  # older snapshots read zeros there
                self._wm_set(vol, st, lc, st.epoch)
            return
        st_s = self._snap(vol)
        origin = self.pool.volumes.get(st_s.origin)
        if vol.deleted or origin is None or vol.id not in self._snapshot_ids(
                self._origin(origin)):
            # A copy-out for a snapshot being deleted: drop the copy.
            self.data.unclaim(pc)
            self.cache.add_undo(lambda: self.data.claimed.add(pc))
            return
        self.data.incref(pc)
        old = self._exc_set(vol, lc, pc + 2)
        if old > ZERO:
            self.data.decref(old - 2)
        elif old == NONE:  # it stops reading the origin's chunk
            self._unshare(origin, lc, lc + 1, st_s.epoch)

    def unmap(self, vol: VolumeRecord, lc: int, count: int) -> tuple[int, list[tuple[int, int]]]:
        self._begin_step()
        if self._kind(vol) == SNAPSHOT:
            st_s = self._snap(vol)
            origin = self.pool.volumes.get(st_s.origin)
            root, stop = self._exc_fill(vol, st_s.root, st_s.height - 1, 0, lc, lc + count,
                                        ZERO, WORK_BUDGET, origin, st_s.epoch)
            if root != st_s.root:
                self._set_snap(vol, st_s._replace(root=root))
            return (stop - lc if stop is not None else count), []
        st = self._origin(vol)
        snaps = [self._snap(s) for s in self._linked_snapshots(st)]
        end = lc + count
        pos = lc
        work = 0
        clear: list[list[int]] = []
        fill: list[list[int]] = []
        for first, n, written in self._visible(st, lc, end):
            if not written:
                pos = first + n
                work += 1
                continue
            for c in range(first, first + n):
                if c > lc and (work >= WORK_BUDGET or self._dirty_full()):
                    break
                work += 1 + len(snaps)
                entry = self._wentry(st, c)
                # Unwritten again only if no snapshot reads it now, nor did before a change
                # that is maybe not durable, or with a read maybe still in flight (CLAIM).
                needed = bool(entry & CLAIM) or any(
                    self._reads_origin(s, entry & EPOCH_MASK, c) for s in snaps)
                runs = fill if needed else clear
                if runs and runs[-1][0] + runs[-1][1] == c:
                    runs[-1][1] += 1
                else:
                    runs.append([c, 1])
                pos = c + 1
            if pos < first + n:
                break
            if work >= WORK_BUDGET or self._dirty_full():
                break
        for first, n in clear:  # (the runs decided above are cleared whole)
            st = self._origin(vol)
            root = self._wm_clear(st.wm_root, st.wm_height - 1, 0, first, first + n,
                                  NO_BUDGET)
            if root != st.wm_root:
                self._set_origin(vol, st._replace(wm_root=root))
        return pos - lc, [(first, n) for first, n in fill]

    # -- inspection ---------------------------------------------------------------------------

    def references(self, vol: VolumeRecord, seen: set[int], ref_page: Callable[[int], None],
                   ref_chunk: Callable[[int], None], problem: Callable[[str], None]) -> None:
        kind = self._kind(vol)
        n = self._chunks(vol)
        name = vol.name

        def page(index: int, what: str) -> bool:
            if not 0 <= index < self.meta.count:
                problem(f"volume {name!r}: {what} page {index} outside the metadata area")
                return False
            ref_page(index)
            seen.add(index)
            return True

        if kind == ORIGIN:
            st = self._origin(vol)
            if st.wm_height != self._wm_height(n):
                problem(f"volume {name!r}: write-epoch map height {st.wm_height}, expected "
                        f"{self._wm_height(n)}")
                return
            if not 1 <= st.nsegs <= MAX_SEGMENTS and not (vol.deleted and st.nsegs == 0):
                problem(f"volume {name!r}: {st.nsegs} segments")
                return
            if st.nsegs > 1:
                if not page(st.seg, "segment"):
                    return
                self._check_segments(vol, st, problem)
            if st.nsegs:
                for _, count, pc in self._pieces(vol, st, st.released, n - st.released):
                    if not 0 <= pc <= pc + count <= self.data.count:
                        problem(f"volume {name!r}: chunks {pc}..{pc + count - 1} outside the "
                                "data area")
                        continue
                    for unit in range(pc, pc + count):
                        ref_chunk(unit)
            if st.wm_root:
                self._wm_refs(st.wm_root, st.wm_height - 1, 0, n, st.epoch, page, problem, name)
            if st.nsnap:
                if st.nsnap > MAX_SNAPSHOTS or not page(st.snaplist - 1, "snapshot list"):
                    problem(f"volume {name!r}: bad snapshot list ({st.nsnap} snapshots)")
                    return
                ids = self._snapshot_ids(st)
                if len(set(ids)) != len(ids):
                    problem(f"volume {name!r}: a snapshot is listed twice")
                for sid in ids:
                    snap = self.pool.volumes.get(sid)
                    if snap is None or self._kind(snap) != SNAPSHOT or \
                            self._snap(snap).origin != vol.id:
                        problem(f"volume {name!r}: lists #{sid} as a snapshot, which it is not")
                    elif self._snap(snap).epoch >= st.epoch:
                        problem(f"volume {name!r}: snapshot #{sid} has epoch "
                                f"{self._snap(snap).epoch}, not before the origin's {st.epoch}")
            elif st.snaplist:
                problem(f"volume {name!r}: a snapshot list page but no snapshots")
            return
        if kind != SNAPSHOT:
            if not vol.deleted:
                problem(f"volume {name!r}: no linear map state (kind {kind})")
            return
        sst = self._snap(vol)
        if sst.height != self._exc_height(n):
            problem(f"volume {name!r}: exception tree height {sst.height}, expected "
                    f"{self._exc_height(n)}")
            return
        origin = self.pool.volumes.get(sst.origin)
        if origin is None or self._kind(origin) != ORIGIN:
            if not vol.deleted:
                problem(f"volume {name!r}: its origin #{sst.origin} is missing")
        elif vol.id not in self._snapshot_ids(self._origin(origin)) and not vol.deleted:
            problem(f"volume {name!r}: not in the snapshot list of its origin {origin.name!r}")
        elif origin.size != vol.size:
            problem(f"volume {name!r}: size {vol.size}, its origin's {origin.size}")
        if sst.root > ZERO:
            self._exc_refs(sst.root, sst.height - 1, 0, n, page, ref_chunk, problem, name)

    def _check_segments(self, vol: VolumeRecord, st: _Origin,
                        problem: Callable[[str], None]) -> None:
        raw = self.cache.get(self._page(st.seg))
        prev = -1
        for i in range(st.nsegs):
            first = _SEG.unpack_from(raw, PAGE_HEADER_SIZE + 16 * i)[0]
            if first <= prev or (i == 0 and first != 0) or first >= self._chunks(vol):
                problem(f"volume {vol.name!r}: segment {i} starts at chunk {first}, out of "
                        "order")
            prev = first

    def _wm_refs(self, e: int, level: int, base: int, limit: int, epoch: int,
                 page: Callable[[int, str], bool], problem: Callable[[str], None],
                 name: str) -> None:
        if not page(e - 1, "write-epoch"):
            return
        node = self.cache.get(self._page(e - 1))
        if level == 0:
            epochs = memoryview(node)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * self.leaf].cast("I")
            for i, w in enumerate(epochs):
                if w and base + i >= limit:
                    problem(f"volume {name!r}: chunk {base + i} beyond the end of the volume "
                            "is marked written")
                elif w & EPOCH_MASK > epoch:
                    problem(f"volume {name!r}: chunk {base + i} written at epoch "
                            f"{w & EPOCH_MASK}, after the origin's epoch {epoch}")
                elif w == CLAIM:
                    problem(f"volume {name!r}: chunk {base + i} flagged but never written")
            return
        span = self._spans(level)[level - 1]
        for i in range(self.fanout):
            child = _u32(node, i)
            if not child:
                continue
            if base + i * span >= limit:
                problem(f"volume {name!r}: write-epoch entry beyond the end of the volume")
                continue
            self._wm_refs(child, level - 1, base + i * span, limit, epoch, page, problem, name)

    def _exc_refs(self, e: int, level: int, base: int, limit: int,
                  page: Callable[[int, str], bool], ref_chunk: Callable[[int], None],
                  problem: Callable[[str], None], name: str) -> None:
        if not page(e - 2, "exception"):
            return
        node = self.cache.get(self._page(e - 2))
        span = self.exc_fanout ** level
        for i in range(self.exc_fanout):
            child = _u64(node, i)
            if child <= ZERO:
                continue
            if base + i * span >= limit:
                problem(f"volume {name!r}: exception beyond the end of the volume "
                        f"(chunk {base + i * span})")
            if level == 0:
                pc = child - 2
                if not 0 <= pc < self.data.count:
                    problem(f"volume {name!r}: exception chunk {pc} outside the data area")
                else:
                    ref_chunk(pc)
            else:
                self._exc_refs(child, level - 1, base + i * span, limit, page, ref_chunk,
                               problem, name)

    def stats_slice(self) -> int:
        return min(512, self.leaf)

    def exclusive_range(self, vol: VolumeRecord, lc: int, count: int,
                        runs: list[Run]) -> tuple[int, int]:
        hi = lc + count
        if self._kind(vol) == ORIGIN:
            st = self._origin(vol)
            # exclusive: written chunks no snapshot reads from the origin any more
            shared: list[tuple[int, int]] = []
            for snap in self._linked_snapshots(st):
                shared.extend((r.lc, r.lc + r.count) for r in self.lookup(snap, lc, count)
                              if r.owner == vol.id and r.pc != HOLE)
            mapped = sum(r.count for r in runs if r.pc != HOLE)
            pages = (int(st.nsegs > 1) + int(bool(st.nsnap))) if lc == 0 else 0
            if st.wm_root:
                pages += self._wm_pages(st.wm_root, st.wm_height - 1, 0, lc, hi)
            return mapped - _union_length(shared), pages
        sst = self._snap(vol)
        pages = self._exc_pages(sst.root, sst.height - 1, 0, lc, hi) if sst.root > ZERO else 0
        return sum(r.count for r in runs if r.owner == vol.id), pages

    def _wm_pages(self, e: int, level: int, base: int, lo: int, hi: int) -> int:
        """Write-epoch map pages below `e` (of `level`, from `base`) starting in [lo, hi)."""
        pages = int(lo <= base)
        if level:
            node = self.cache.get(self._page(e - 1))
            span = self._spans(level)[level - 1]
            for i in range(max(0, lo - base) // span, min(self.fanout, -(-(hi - base) // span))):
                child = _u32(node, i)
                if child:
                    pages += self._wm_pages(child, level - 1, base + i * span, lo, hi)
        return pages

    def _exc_pages(self, e: int, level: int, base: int, lo: int, hi: int) -> int:
        """Exception-store pages below `e` (of `level`, from `base`) starting in [lo, hi)."""
        pages = int(lo <= base)
        if level:
            node = self.cache.get(self._page(e - 2))
            span = self.exc_fanout ** level
            for i in range(max(0, lo - base) // span,
                           min(self.exc_fanout, -(-(hi - base) // span))):
                child = _u64(node, i)
                if child > ZERO:
                    pages += self._exc_pages(child, level - 1, base + i * span, lo, hi)
        return pages

def _union_length(intervals: list[tuple[int, int]]) -> int:
    """Total length of the union of half-open intervals."""
    total = 0
    end = -1
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total
