"""``extent``: extent trees. Each volume maps logical ranges to physical ranges.

**The map.** A volume's map is a copy-on-write B+tree of *extent records* in
4 KiB metadata pages (``PT_EXTENT``). A record says "logical chunks
[lc, lc+n) are physical chunks [pc, pc+n), written by volume `owner`"::

    node header (after the 16-byte page header, 8 bytes):  "XT", level, 0, count, 0
    leaf record (level 0, 24 bytes):  lc u64, pc u64, n u32 | owner u31 << 32 | W << 63
    interior entry (16 bytes):        key u64 (first logical chunk of the child),
                                      child u63 | W << 63

A leaf holds up to 169 records, an interior node up to 254 children (tests
shrink both through ``map_params`` = (leaf capacity, interior capacity,
longest extent, features)). Entries are sorted and records do not overlap.
Key j > 0 of an interior node is the lower bound of child j's range; a node's range
comes from its parent, and routing ignores key 0 (written as the node's lower
bound; a shared node's range can grow when a sibling is removed from one
volume's copy of the parent, so key 0 may then lie above it). A record never
crosses a key. The volume record's ``map_state`` holds the root (meta index
+ 1, 0 when empty, | W << 63) and the height. W is the writable bit (below).

Lookups binary-search each node in place (``bisect`` over a strided
``memoryview`` of the page: no decoding, no node cache to invalidate on
rollback). Costs, with n records in the volume:

- ``lookup`` of one chunk: O(height * log fanout), height = O(log n), every
  page cached; of a range: one descent per leaf touched plus one step per
  record; returns runs merged where contiguous (one run per extent).
- ``write_target``: one descent; on a path that is not writable, also one
  reference count per level and one for the chunk.
- ``map`` (after a copy-on-write write): one descent and an edit of the leaf in
  place: the covering extent and its two neighbours are decoded and replaced by
  at most five records (split into left, new and right, merging the new chunk
  into a neighbour that is logically and physically contiguous and has the same
  owner: sequential writes grow one record), the records after them move by one
  memmove; no other record is decoded. A full leaf is rebuilt and split:
  O(height) splits at worst.
- ``alloc_hint``: one descent (two when `lc` is at the edge of its leaf's range),
  a look at the extents either side of `lc`, and one reference count when the
  chunk it would pick is not already known to be taken.
- ``clone`` (snapshot, fork): **O(1)**: the clone shares the root page, which
  gains a reference; nothing else is read or written, whatever the size.

**Sharing and ownership.** Extents are shared between volumes by sharing
tree nodes: a record is never copied into another volume's tree except when
a whole shared leaf is. Reference counts say who shares what: a node's
in ``pool.meta``, a chunk's in ``pool.data`` (which counts references from leaf
records). *Writable bits* say what may be written in place, as in radix: bit
63 of the root in ``map_state``, of each interior entry, and of each record
(the top bit of its owner field). They are trusted only along a path that is
writable from the root. A chunk on such a path whose record is writable is the
volume's alone: ``InPlace``, no reference count read. Otherwise, if every node
on the path and the chunk have one reference, the answer is ``Claim``: the
sharing ended by a change (the other volume rewrote or trimmed the chunk, or
was deleted) that may not be durable yet, and a read of it may still be in
flight, so the volume layer commits and waits for those reads before
:meth:`claim` sets the bits; else ``Redirect``. A snapshot or fork clears the
root bit of both volumes, so everything below becomes untrusted at once.

The first change below a shared node copies the path: a node reached through
an entry without the bit is *taken*: claimed if its count is 1 (every bit
inside it is cleared first: bits there may be stale), else copied (the copy's
children, or for a leaf the chunks of every record, gain a reference; the
original loses one; the copy's bits are clear). A leaf copy costs one
reference per chunk the leaf maps, so records are capped at ``max_extent``
chunks (256 by default, at most 1 MiB per record with 4 KiB chunks) and a leaf
copy at 169 * 256 = 43,264 increments, done a refcount page at a time
(:meth:`RefTable.incref_run`). Per chunk mapped, that is the same total as
radix's copies; it comes in fewer, larger steps. A new chunk mapped by
:meth:`map` is writable from the start (nothing else can reference it).

**Unmapping** (trim, delete) works top-down over the range: a subtree that
the range covers and that is shared is dropped by one reference without
being visited; a shared leaf that the range cuts is copied without the
records being dropped (no increment then decrement); owned subtrees are
walked and their chunks freed a refcount page at a time. Work per call is
bounded (nodes visited plus chunks freed, ``UNMAP_BUDGET``), and the call
reports how far it got. Empty nodes are freed and a root with a single child
collapses.

**Every node but the root is at least half full** (``_fill_min``: 84 of 169
records, 127 of 254 children), which bounds a volume's map pages
(:meth:`ExtentMap.page_bound`: at most one record per chunk, so at most
chunks / 84 leaves, about 1/83 of the chunk count in all) and lets a
guarantee promise them. Splits leave both halves so (a sequential append's
split fills the first full and the last to half; before splitting, a leaf
that overflows at its end gives its first records to its left neighbour if
that is this path's own and has room, so a stream of records fills all but its
last two leaves, ``_shift_left``). A node that a trim, or a
write that joined records (or a claim), leaves short is joined with a
neighbour (``_join``): into one node if both fit, else into two evenly
filled ones. A neighbour still shared is not changed: what it points at
gains a reference and this path drops it (so a join may take a page, as a
copy on write does). Joining two interior nodes puts the children either
side of the seam next to each other, and a short child can only have
survived there (as the single child of its node), so the seam is joined
too, down the tree. A deleted volume's release skips all this: it must never
need a page, and its nodes are going. Pools made since carry ``HALF_FULL`` in
their features; an older pool's maps may hold short nodes, so its volumes get
no bound (and ``pool check`` does not ask for half-full nodes there).

**Allocation keeps contiguity on purpose** (:meth:`ExtentMap.alloc_hint`):
a new chunk for `lc` goes right after the chunk of `lc - 1`; if `lc - 1` is
a hole but an extent ends or starts within ``HINT_REACH`` chunks, at the
position that keeps the logical distance (so pipelined and slightly
out-of-order writes still land in sequence). When that chunk is taken and
the volume is streaming (the neighbour is its own writing, and its previous
allocation was at most ``STREAM_STEP`` chunks before), the chunk goes into
the largest free run nearby, ``SPREAD`` chunks (or half the run) past its
start, so that two volumes written side by side alternate in long runs, not
chunk by chunk: whoever owns the chunk before the run can keep growing into
its start. Otherwise (a fork rewriting its parent's data here and there,
random writes) spreading would scatter chunks all over the free space and
fragment it for everyone, so they are packed densely by the pool's next-fit
cursor instead (measured: spreading them left a sequential rewrite of the
parent in 6,000 extents per 64 MiB, and cost 240 us per write in free-run
searches).
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from functools import partial
from typing import ClassVar

from nbdserver.blockmap.base import (
    ASK,
    FRESH,
    HOLE,
    BlockMap,
    Claim,
    InPlace,
    Redirect,
    Run,
    TargetRun,
    WriteTarget,
    merge_target,
    register,
)
from nbdserver.pool.format import PAGE_HEADER_SIZE, PAGE_SIZE, PT_EXTENT, VolumeRecord

MAGIC = b"XT"
_IN_PLACE, _CLAIM, _REDIRECT = 0, 1, 2  # what a write of one chunk does (_target)
_NODE = struct.Struct("<2sBBHH")  # magic, level, 0, count, 0
ENTRIES = PAGE_HEADER_SIZE + _NODE.size  # 24: first entry
LEAF_ENTRY = 24
INNER_ENTRY = 16
MAX_LEAF = (PAGE_SIZE - ENTRIES) // LEAF_ENTRY  # 169 records
MAX_INNER = (PAGE_SIZE - ENTRIES) // INNER_ENTRY  # 254 children
DEFAULT_MAX_EXTENT = 256  # chunks per record: bounds what a leaf copy costs
WRITABLE = 1 << 63  # in the root (map_state), interior entries and records: see the note
IDX_MASK = WRITABLE - 1
TAG_WRITABLE = 1 << 31  # the same bit in a record's tag (its top 32 bits)
MAX_OWNER = TAG_WRITABLE - 1
LEN_MASK = (1 << 32) - 1
INF = 1 << 62  # upper bound of the root's range
UNMAP_BUDGET = 8192  # nodes visited plus chunks freed per unmap call
HINT_REACH_BYTES = 4 << 20  # a neighbouring extent this close still guides placement
SPREAD_BYTES = 4 << 20  # how far into a free run a displaced chunk goes
NEAR_PAGES = 4  # refcount pages searched for a nearby free run (4080 chunks)
STREAM_STEP = 64  # a volume allocating this close after its last allocation is streaming
_STATE = struct.Struct("<QB")  # root (meta index + 1, | WRITABLE), height
# map_params[3], features: every node but the root is half full in every map of the pool
# (set in pools made since; an older pool's maps may hold short nodes).
HALF_FULL = 1

Rec = tuple[int, int, int, int]  # lc, count, pc, tag (owner | TAG_WRITABLE)
Path = tuple[bool, bool]  # of the path to a leaf: writable, every node on it sole
Entry = tuple[int, int]  # key, child (meta index | WRITABLE)
# k leaf records packed at once (`map` replaces at most 3 records by at most 5 in place).
_RECS = [struct.Struct("<" + "QQQ" * k) for k in range(6)]
_COUNT = PAGE_HEADER_SIZE + 4  # offset of a node's count (u16)


def _count(node: bytearray) -> int:
    return node[PAGE_HEADER_SIZE + 4] | node[PAGE_HEADER_SIZE + 5] << 8


def _leaf_view(node: bytearray) -> memoryview:
    """The leaf's records as u64s: [lc, pc, n | tag << 32] * count."""
    return memoryview(node)[ENTRIES:ENTRIES + LEAF_ENTRY * _count(node)].cast("Q")


def _inner_view(node: bytearray) -> memoryview:
    """The interior node's entries as u64s: [key, child] * count."""
    return memoryview(node)[ENTRIES:ENTRIES + INNER_ENTRY * _count(node)].cast("Q")


def _records(node: bytearray) -> list[Rec]:
    q = _leaf_view(node).tolist()
    return [(q[i], q[i + 2] & LEN_MASK, q[i + 1], q[i + 2] >> 32) for i in range(0, len(q), 3)]


def _entries(node: bytearray) -> list[Entry]:
    q = _inner_view(node).tolist()
    return [(q[i], q[i + 1]) for i in range(0, len(q), 2)]


def _clear_bits(node: bytearray, level: int) -> None:
    """Clear every writable bit in the node (a copy, or a node being claimed)."""
    if level:
        q = _inner_view(node)
        q[1::2] = array("Q", [c & IDX_MASK for c in q[1::2].tolist()])
    else:
        q = _leaf_view(node)
        q[2::3] = array("Q", [w & IDX_MASK for w in q[2::3].tolist()])


def _write_node(page: bytearray, level: int, flat: list[int]) -> None:
    """Fill `page` (header and entries) with `flat` u64s; the rest is zeroed."""
    width = INNER_ENTRY if level else LEAF_ENTRY
    count = len(flat) * 8 // width
    _NODE.pack_into(page, PAGE_HEADER_SIZE, MAGIC, level, 0, count, 0)
    end = ENTRIES + 8 * len(flat)
    memoryview(page)[ENTRIES:end].cast("Q")[:] = array("Q", flat)
    page[end:] = bytes(PAGE_SIZE - end)


def _flat_records(recs: list[Rec]) -> list[int]:
    flat: list[int] = []
    for lc, n, pc, tag in recs:
        flat += (lc, pc, n | tag << 32)
    return flat


def _flat_entries(entries: list[Entry]) -> list[int]:
    flat: list[int] = []
    for key, child in entries:
        flat += (key, child)
    return flat


def _marked(entries: list[Entry], writable: bool) -> list[Entry]:
    """`entries` with the writable bit set (or cleared) on every child."""
    if writable:
        return [(k, c | WRITABLE) for k, c in entries]
    return [(k, c & IDX_MASK) for k, c in entries]


def _split_sizes(n: int, cap: int, append: bool) -> list[int]:
    """How to cut `n` (> `cap`) entries into nodes of at most `cap` and at least half of
    it (:func:`_fill_min`): evenly, or, when the node grew at its end (sequential
    writes), filling the first nodes full and the last one to that half at least."""
    pieces = -(-n // cap)
    if append:
        sizes = [cap] * (pieces - 1) + [n - cap * (pieces - 1)]
        short = _fill_min(cap) - sizes[-1]
        if short > 0:  # the one before has cap entries: it can spare them
            sizes[-2] -= short
            sizes[-1] += short
        return sizes
    base, extra = divmod(n, pieces)
    return [base + (1 if i < extra else 0) for i in range(pieces)]


def _fill_min(cap: int) -> int:
    """The fewest entries a node other than the root holds, with room for `cap`."""
    return cap // 2


def _resolve(params: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The parameters with 0 read as the default: leaf capacity, interior capacity,
    longest extent, features. ValueError when one is out of range or unknown."""
    leaf, inner, longest, features = params
    leaf_cap = leaf or MAX_LEAF
    inner_cap = inner or (min(leaf, MAX_INNER) if leaf else MAX_INNER)
    max_extent = longest or DEFAULT_MAX_EXTENT
    if not 2 <= leaf_cap <= MAX_LEAF:
        raise ValueError(f"extent leaf capacity {leaf_cap} out of range 2..{MAX_LEAF}")
    if not 2 <= inner_cap <= MAX_INNER:
        raise ValueError(f"extent interior capacity {inner_cap} out of range 2..{MAX_INNER}")
    if not 1 <= max_extent <= LEN_MASK:
        raise ValueError(f"extent length cap {max_extent} out of range")
    if features & ~HALF_FULL:
        raise ValueError(f"extent features {features:#x} unknown to this version "
                         "(a pool made by a newer one?)")
    return leaf_cap, inner_cap, max_extent, features


@register
class ExtentMap(BlockMap):
    """Copy-on-write B+tree of extents per volume; see the module note."""

    name: ClassVar[str] = "extent"
    max_volume_id: ClassVar[int] = MAX_OWNER  # (the owner field of a record: 31 bits)
    description: ClassVar[str] = ("extent trees: sorted extents in a copy-on-write B+tree, "
                                  "O(1) forks, allocation that keeps data contiguous")

    def __init__(self, pool: object) -> None:
        super().__init__(pool)  # type: ignore[arg-type]
        self.leaf_cap, self.inner_cap, self.max_extent, features = _resolve(
            self.pool.sb.map_params)
        # Pools made before nodes were kept half full may hold short ones: their maps
        # have no bound (page_bound) and pool check does not ask for it.
        self.half_full = bool(features & HALF_FULL)
        self.leaf_min = _fill_min(self.leaf_cap)
        self.inner_min = _fill_min(self.inner_cap)
        self.meta_start = self.pool.layout.meta_start
        self.chunk_size = self.pool.sb.chunk_size
        self.reach = max(1, HINT_REACH_BYTES // self.chunk_size)
        self.spread = max(1, SPREAD_BYTES // self.chunk_size)
        self._dropped = 0  # see _unmap_range
        self._refilling = True  # see _unmap_range
        self._node_writes = 0  # nodes rewritten by unmapping so far (see _unmap_inner)
        # The volume whose map the current operation changes (set where each operation
        # that can take pages starts: _own_path and _unmap_range), for _new_page.
        self._taker: VolumeRecord | None = None
        # Volume id -> the logical chunk its last allocation hint was for: a hint of where
        # streams are (an old value only costs placement, never correctness).
        self._last_hint: dict[int, int] = {}

    @classmethod
    def default_params(cls) -> tuple[int, int, int, int]:
        return (MAX_LEAF, MAX_INNER, DEFAULT_MAX_EXTENT, HALF_FULL)

    @classmethod
    def check_params(cls, params: tuple[int, int, int, int]) -> None:
        _resolve(params)

    @classmethod
    def new_pool_params(cls, params: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        return (*params[:3], params[3] | HALF_FULL)

    # -- map state ------------------------------------------------------------------------

    def _state(self, vol: VolumeRecord) -> tuple[int, int]:
        """(root: meta index | WRITABLE, or -1 when empty; height)."""
        raw, height = _STATE.unpack_from(vol.map_state)
        if not raw & IDX_MASK:
            return -1, 0
        return ((raw & IDX_MASK) - 1) | (raw & WRITABLE), height

    def _set_state(self, vol: VolumeRecord, root: int, height: int) -> None:
        state = bytearray(vol.map_state)
        if root < 0:
            _STATE.pack_into(state, 0, 0, 0)
        else:
            _STATE.pack_into(state, 0, ((root & IDX_MASK) + 1) | (root & WRITABLE), height)
        self.pool.update_volume(vol, map_state=bytes(state))

    def _page(self, idx: int) -> int:
        return self.meta_start + (idx & IDX_MASK)

    def init_volume(self, vol: VolumeRecord) -> None:
        state = bytearray(vol.map_state)
        _STATE.pack_into(state, 0, 0, 0)
        vol.map_state = bytes(state)

    def page_bound(self, vol: VolumeRecord) -> int | None:
        """The most nodes a tree over the volume's chunks can hold: at most one record
        per chunk, every node but the root at least half full (see ``_join``), and a
        root of height > 1 with two children at least (a root left with one goes). None
        when that is not known (:meth:`_bounded`): the guarantee then covers chunks only."""
        if not self._bounded():
            return None
        chunks = max(1, -(-vol.size // self.chunk_size))
        pages, nodes = 1, chunks // self.leaf_min  # the root; the most leaves below one
        while nodes >= 2:  # a level below the root has two nodes at least
            pages += nodes
            nodes //= self.inner_min
        return pages

    def _bounded(self) -> bool:
        """Whether every map of the pool keeps its nodes half full, and that means two
        entries at least (with one, a node of one child is not short, so its single
        child, short, has no neighbour to join)."""
        return self.half_full and self.leaf_min >= 2 and self.inner_min >= 2

    def clone(self, src: VolumeRecord, dst: VolumeRecord) -> None:
        root, height = self._state(src)
        state = bytearray(dst.map_state)
        if root >= 0:
            self.meta.incref(root & IDX_MASK)
            if root & WRITABLE:  # shared now: nothing below is writable in either volume
                self._set_state(src, root & IDX_MASK, height)
            _STATE.pack_into(state, 0, (root & IDX_MASK) + 1, height)
        else:
            _STATE.pack_into(state, 0, 0, 0)
        dst.map_state = bytes(state)

    # -- reading ---------------------------------------------------------------------------

    def _leaf_for(self, root: int, height: int, lc: int) -> tuple[bytearray, int, int]:
        """The leaf whose range holds `lc`, and that range [lo, hi)."""
        get = self.cache.get
        start = self.meta_start
        node = get(start + (root & IDX_MASK))
        lo, hi = 0, INF
        for _ in range(height - 1):
            q = memoryview(node).cast("Q")  # entries from u64 3 on: key, child
            n = node[_COUNT] | node[_COUNT + 1] << 8
            i = bisect_right(q[3:3 + 2 * n:2], lc) - 1
            if i < 0:
                i = 0
            elif i:
                lo = q[3 + 2 * i]
            if i + 1 < n:
                hi = q[5 + 2 * i]
            node = get(start + (q[4 + 2 * i] & IDX_MASK))
        return node, lo, hi

    def _find(self, vol: VolumeRecord, lc: int) -> tuple[int, int]:
        """(physical chunk, the record's length-and-tag word) of chunk `lc`, or (HOLE, 0).
        (A binary search in Python, one unpack per step, measured 7% more instructions
        per 4 KiB read than bisecting a strided view of the leaf.)"""
        root, height = self._state(vol)
        if root >= 0:
            node, _, _ = self._leaf_for(root, height, lc)
            q = _leaf_view(node)
            i = bisect_right(q[0::3], lc) - 1
            if i >= 0:
                start, pc, w = q[3 * i:3 * i + 3]
                if lc < start + (w & LEN_MASK):
                    return pc + lc - start, w
        return HOLE, 0

    def chunk_at(self, vol: VolumeRecord, lc: int) -> int:
        return self._find(vol, lc)[0]

    def lookup(self, vol: VolumeRecord, lc: int, count: int) -> list[Run]:
        if count == 1:  # the hot path
            pc, w = self._find(vol, lc)
            return [Run(lc, 1, pc, (w >> 32) & MAX_OWNER if pc != HOLE else 0)]
        root, height = self._state(vol)
        if root < 0:
            return [Run(lc, count, HOLE)]
        out: list[Run] = []

        def leaf(pos: int) -> tuple[bytearray, int, tuple[bool, bool]]:
            node, _, hi = self._leaf_for(root, height, pos)
            return node, hi, (False, False)

        for pos, n, pc, w, _ in self._pieces(lc, count, leaf):
            _emit(out, pos, n, pc, (w >> 32) & MAX_OWNER if pc != HOLE else 0)
        return out

    @staticmethod
    def _pieces(lc: int, count: int, leaf: Callable[[int], tuple[bytearray, int, Path]]
                ) -> Iterator[tuple[int, int, int, int, Path]]:
        """Pieces covering [lc, lc+count), leaf by leaf: (first chunk, chunks, physical
        chunk of the first or HOLE, the record's length-and-tag word (0 for a hole),
        what `leaf` said of the path). `leaf(pos)` gives the leaf whose range holds pos,
        the end of that range, and something about the path to it."""
        pos, end = lc, lc + count
        while pos < end:
            node, hi, path = leaf(pos)
            q = _leaf_view(node)
            n = len(q) // 3
            i = max(0, bisect_right(q[0::3], pos) - 1)
            while i < n and pos < end:
                start, pc, w = q[3 * i:3 * i + 3]
                stop = start + (w & LEN_MASK)
                i += 1
                if stop <= pos:
                    continue
                if start > pos:
                    gap = min(start, end)
                    yield pos, gap - pos, HOLE, 0, path
                    pos = gap
                    if pos >= end:
                        break
                take = min(end, stop) - pos
                yield pos, take, pc + pos - start, w, path
                pos += take
            if pos < end:
                gap = min(end, hi)
                if gap > pos:
                    yield pos, gap - pos, HOLE, 0, path
                    pos = gap

    def _target(self, vol: VolumeRecord, lc: int) -> tuple[int, int]:
        """(what a write of chunk `lc` does: _IN_PLACE, _CLAIM or _REDIRECT, and the
        chunk it concerns: the one written in place or claimed, or the old one (HOLE))."""
        raw, height = _STATE.unpack_from(vol.map_state)
        if not raw & IDX_MASK:
            return _REDIRECT, HOLE
        get = self.cache.get
        meta = self.meta
        start = self.meta_start - 1  # the root is stored as meta index + 1
        writable = raw >= WRITABLE
        sole = writable or meta.get((raw & IDX_MASK) - 1) == 1  # only read while untrusted
        node = get(start + (raw & IDX_MASK))
        for _ in range(height - 1):
            q = memoryview(node).cast("Q")  # entries from u64 3 on: key, child
            n = node[_COUNT] | node[_COUNT + 1] << 8
            i = bisect_right(q[3:3 + 2 * n:2], lc) - 1
            child = q[4 + 2 * i] if i > 0 else q[4]
            if writable and child < WRITABLE:
                writable = False
            if not writable and sole and meta.get(child & IDX_MASK) != 1:
                sole = False
            node = get(start + 1 + (child & IDX_MASK))
        q = memoryview(node).cast("Q")  # records from u64 3 on: lc, pc, n | tag << 32
        n = node[_COUNT] | node[_COUNT + 1] << 8
        i = 3 * bisect_right(q[3:3 + 3 * n:3], lc)
        if i:
            first, pc, w = q[i:i + 3]
            if lc < first + (w & LEN_MASK):
                pc += lc - first
                if writable and w >= WRITABLE:
                    return _IN_PLACE, pc
                if sole and self.data.get(pc) == 1:
                    return _CLAIM, pc
                return _REDIRECT, pc
        return _REDIRECT, HOLE

    def write_target(self, vol: VolumeRecord, lc: int) -> WriteTarget:
        kind, pc = self._target(vol, lc)
        if kind == _IN_PLACE:
            return InPlace(pc)
        return Claim(pc) if kind == _CLAIM else Redirect(pc)

    def write_chunk(self, vol: VolumeRecord, lc: int) -> int:
        kind, pc = self._target(vol, lc)
        if kind == _IN_PLACE:
            return pc
        return ASK if kind == _CLAIM else FRESH

    def write_runs(self, vol: VolumeRecord, lc: int, count: int) -> list[TargetRun]:
        """:meth:`write_target` over a range: one descent per leaf, one step per record
        (a record on a writable path is one ``InPlace`` run)."""
        if count == 1:  # the hot path: one 4 KiB write
            return [TargetRun(lc, 1, self.write_target(vol, lc))]
        raw, height = _STATE.unpack_from(vol.map_state)
        if not raw & IDX_MASK:
            return [TargetRun(lc, count, Redirect(HOLE))]
        runs: list[TargetRun] = []
        data = self.data

        def leaf(pos: int) -> tuple[bytearray, int, tuple[bool, bool]]:
            node, hi, writable, sole = self._write_leaf_for(raw, height, pos)
            return node, hi, (writable, sole)

        for pos, take, first, w, (writable, sole) in self._pieces(lc, count, leaf):
            if first == HOLE:
                merge_target(runs, pos, take, Redirect(HOLE))
            elif writable and w >= WRITABLE:
                merge_target(runs, pos, take, InPlace(first))
            else:
                for k in range(take):
                    p = first + k
                    merge_target(runs, pos + k, 1,
                                 Claim(p) if sole and data.get(p) == 1 else Redirect(p))
        return runs

    def _write_leaf_for(self, raw: int, height: int,
                        lc: int) -> tuple[bytearray, int, bool, bool]:
        """The leaf whose range holds `lc`, the end of that range, whether the path to it
        is writable, and whether every node on it has one reference (as write_target)."""
        get = self.cache.get
        meta = self.meta
        start = self.meta_start - 1  # the root is stored as meta index + 1
        writable = raw >= WRITABLE
        sole = writable or meta.get((raw & IDX_MASK) - 1) == 1
        node = get(start + (raw & IDX_MASK))
        hi = INF
        for _ in range(height - 1):
            q = memoryview(node).cast("Q")  # entries from u64 3 on: key, child
            n = node[_COUNT] | node[_COUNT + 1] << 8
            i = max(0, bisect_right(q[3:3 + 2 * n:2], lc) - 1)
            if i + 1 < n:
                hi = q[5 + 2 * i]
            child = q[4 + 2 * i]
            if writable and child < WRITABLE:
                writable = False
            if not writable and sole and meta.get(child & IDX_MASK) != 1:
                sole = False
            node = get(start + 1 + (child & IDX_MASK))
        return node, hi, writable, sole

    def claim(self, vol: VolumeRecord, lc: int) -> None:
        """Make the path to `lc` writable, and chunk `lc` in its record. Only that chunk:
        its neighbours with one reference may have stopped being shared by a change that
        is not durable yet, or be read by the volume that shared them, and only `lc` is
        under the writer's lock, after the commit and the wait for reads a claim needs
        (claiming them too let the next write of one go in place at once: after a crash
        the other volume read that write)."""
        path = self._own_path(vol, lc)
        recs = _records(self.cache.get(self._page(path[-1][0])))
        i = bisect_right([r[0] for r in recs], lc) - 1
        if i < 0 or not recs[i][0] <= lc < recs[i][0] + recs[i][1]:
            raise AssertionError(f"claim of chunk {lc}, which is not mapped")
        start, n, pc, tag = recs[i]
        if tag & TAG_WRITABLE:
            return
        k = lc - start
        if self.data.get(pc + k) != 1:
            raise AssertionError(f"claim of chunk {lc} that is not solely referenced")
        # The claimed chunk becomes this volume's own (its write follows): its allocation
        # depth is 0 from now on (keeping the writer's tag would report the parent's
        # layer for this volume's data, which a tool copying one layer would miss).
        # Claims of neighbouring chunks merge back into one record.
        pieces = [(lc, 1, pc + k, vol.id | TAG_WRITABLE)]
        if k:
            pieces.insert(0, (start, k, pc, tag))
        if k + 1 < n:
            pieces.append((lc + 1, n - k - 1, pc + k + 1, tag))
        recs[i:i + 1] = pieces
        recs[max(0, i - 1):i + len(pieces) + 1] = self._merge(
            recs[max(0, i - 1):i + len(pieces) + 1])
        self._put_leaf(vol, path, _flat_records(recs), lc)

    def alloc_hint(self, vol: VolumeRecord, lc: int) -> int | None:
        root, height = self._state(vol)
        if root < 0:
            return None
        ideal, gap, own, taken = self._ideal(root, height, lc, vol.id)
        last = self._last_hint.get(vol.id)
        if last != lc:
            self._last_hint[vol.id] = lc
            if self.cache.in_mtr:  # (a hint only: outside one, nothing needs undoing)
                self.cache.add_undo(partial(self._set_last_hint, vol.id, last))
        if ideal is None:
            return None
        if not taken and 0 <= ideal < self.data.count and self.data.run_length_free(ideal, 1):
            return ideal
        if not own or last is None or not 0 < lc - last <= STREAM_STEP:
            return None  # not a stream this volume is writing: pack densely (next fit)
        # Displaced: pick a free run near where the stream's next chunk should have gone.
        # Chunks in flight count as free here, so the chunks of a pipelined stream (whose
        # predecessors are not mapped yet) agree on the run and follow each other in it.
        anchor = min(max(ideal - gap, 0), self.data.count - 1)
        run = self.data.find_free_run(anchor, 2 * self.spread, NEAR_PAGES, claimed_free=True)
        if run is None:
            return None
        start, length = run
        return min(start + min(length // 2, self.spread) + gap, self.data.count - 1)

    def _set_last_hint(self, vol_id: int, lc: int | None) -> None:
        if lc is None:
            self._last_hint.pop(vol_id, None)
        else:
            self._last_hint[vol_id] = lc

    def _ideal(self, root: int, height: int, lc: int,
               vol_id: int) -> tuple[int | None, int, bool, bool]:
        """Where `lc` belongs next to the nearer of its logical neighbours within reach
        (None if none is): the chunk that keeps the logical distance to it; how many chunks
        lie between `lc` and the end of the extent before it (0 when following the one
        after); whether that neighbour was written by this volume (a stream); and whether
        the chunk is known to be taken (the extent before `lc` covers `lc` too: the chunk
        is the one `lc` maps now). One descent, two when a neighbour is in another leaf."""
        best: tuple[int | None, int, bool, bool] = (None, 0, False, False)
        distance = self.reach
        node, lo, hi = self._leaf_for(root, height, lc)
        if lc > 0:
            q = _leaf_view(node if lc > lo else self._leaf_for(root, height, lc - 1)[0])
            i = bisect_right(q[0::3], lc - 1) - 1
            if i >= 0:
                start, pc, w = q[3 * i:3 * i + 3]
                end = start + (w & LEN_MASK)
                if lc - end < distance:
                    best = (int(pc + lc - start), max(0, lc - end),
                            (w >> 32) & MAX_OWNER == vol_id, end > lc)
                    distance = lc - end
        if distance > 0:  # (not when the extent before reaches lc: nothing is nearer)
            q = _leaf_view(node if lc + 1 < hi else self._leaf_for(root, height, lc + 1)[0])
            i = bisect_right(q[0::3], lc)
            if i < len(q) // 3:
                start, pc, w = q[3 * i:3 * i + 3]
                if start - lc - 1 < distance and pc >= start - lc:
                    best = int(pc - (start - lc)), 0, (w >> 32) & MAX_OWNER == vol_id, False
        return best

    # -- changing the tree -------------------------------------------------------------------

    def _new_page(self, near: int | None = None) -> tuple[int, bytearray]:
        """A free metadata page for the map of the volume being changed (``_taker``: a
        thin one never takes the pages promised to guaranteed ones)."""
        if self._taker is not None:
            self.pool.may_take_page(self._taker)
        idx = self.meta.allocate(None if near is None else near & IDX_MASK)
        return idx, self.cache.create(self._page(idx), PT_EXTENT)

    def _copy(self, idx: int, level: int) -> int:
        """A private copy of the shared node `idx`, with no writable bit: its children (or
        chunks) gain a reference, the original loses one."""
        idx &= IDX_MASK
        old = self.cache.get(self._page(idx))
        new_idx, new = self._new_page(idx)
        new[PAGE_HEADER_SIZE:] = old[PAGE_HEADER_SIZE:]
        _clear_bits(new, level)
        if level:
            for child in _inner_view(new)[1::2].tolist():
                self.meta.incref(child)
        else:
            for _, n, pc, _ in _records(new):
                self.data.incref_run(pc, n)
        self.meta.decref(idx)
        return new_idx

    def _take(self, idx: int, level: int) -> int:
        """Make node `idx`, reached through an entry without the writable bit, this path's
        own: claim it (one reference: clear the stale bits inside) or copy it."""
        idx &= IDX_MASK
        if self.meta.get(idx) == 1:
            _clear_bits(self.cache.modify(self._page(idx), PT_EXTENT), level)
            return idx
        return self._copy(idx, level)

    def _store(self, idx: int, level: int, items: list[Rec] | list[Entry], lo: int,
               append: bool = False) -> list[Entry]:
        """Write `items` into the owned node `idx`, splitting it into as many nodes as its
        capacity needs (new pages after the first). Returns the parent entries for them
        (no writable bit), the first keyed `lo`. An empty list frees the node."""
        idx &= IDX_MASK
        if not items:
            self.meta.decref(idx)
            return []
        cap = self.inner_cap if level else self.leaf_cap
        sizes = _split_sizes(len(items), cap, append) if len(items) > cap else [len(items)]
        out: list[Entry] = []
        pos = 0
        for k, size in enumerate(sizes):
            piece = items[pos:pos + size]
            pos += size
            if k == 0:
                page = self.cache.modify(self._page(idx), PT_EXTENT)
                node_idx = idx
            else:
                node_idx, page = self._new_page(idx)
            flat = _flat_entries(piece) if level else _flat_records(piece)  # type: ignore[arg-type]
            _write_node(page, level, flat)
            out.append((lo if k == 0 else piece[0][0], node_idx))
        self._node_writes += 1
        return out

    def _set_root(self, vol: VolumeRecord, entries: list[Entry], height: int) -> None:
        """Make `entries` (nodes of level height-1, with their writable bits) the volume's
        top level: grow the tree while there are several, shrink it while a root with one
        reference has a single child."""
        while len(entries) > 1:
            idx, _ = self._new_page(entries[0][1])
            entries = _marked(self._store(idx, height, entries, 0), True)  # new pages
            height += 1
        if not entries:
            if self._state(vol)[0] >= 0:
                self._set_state(vol, -1, 0)
            return
        root = entries[0][1]
        while height > 1 and self.meta.get(root & IDX_MASK) == 1:
            node = self.cache.get(self._page(root))
            if _count(node) != 1:
                break
            child = _inner_view(node)[1]
            self.meta.decref(root & IDX_MASK)  # the volume's reference moves to the child
            root = child if root & WRITABLE else child & IDX_MASK
            height -= 1
        if (root, height) != self._state(vol):
            self._set_state(vol, root, height)

    # -- keeping nodes at least half full ---------------------------------------------------

    def _join(self, left: Entry, right: Entry, level: int) -> list[Entry]:
        """Two neighbouring children of one node (entries, `right`'s key its range's lower
        bound) rebuilt as one node of `level` if their entries fit, else as two evenly
        filled. Returns the entries replacing them, writable: the nodes are this path's
        own. A node of one reference gives its page; a shared one stays as it was for
        its other holders (what it points at gains a reference) and this path drops it.
        Bits are kept only from a node reached through a writable entry and solely held
        (they are then as trustworthy as before); all others are cleared."""
        cap, width = (self.inner_cap, 2) if level else (self.leaf_cap, 3)
        flat: list[int] = []  # the entries of both, as u64s (see _leaf_view, _inner_view)
        own: list[int] = []  # pages to reuse, left first
        shared: list[int] = []
        for key, child in (left, right):
            idx = child & IDX_MASK
            refs = self.meta.get(idx)
            node = self.cache.get(self._page(idx))
            q = (_inner_view(node) if level else _leaf_view(node)).tolist()
            if flat and level:  # routing ignores key 0: the right node's range starts at key
                q[0] = key
            if refs > 1:
                if level:
                    for c in q[1::2]:
                        self.meta.incref(c & IDX_MASK)
                else:
                    for j in range(0, len(q), 3):
                        self.data.incref_run(q[j + 1], q[j + 2] & LEN_MASK)
            if not (child & WRITABLE and refs == 1):  # (bit 63: a child's, a record's tag)
                q[width - 1::width] = [w & IDX_MASK for w in q[width - 1::width]]
            if level and not flat:
                seam = len(q) // 2  # the left node's children come first
            flat += q
            (own if refs == 1 else shared).append(idx)
        if level:
            # A child short of half full survives only as the single child of its node
            # (no neighbour to join): that node is one of these two, so the child is at
            # the seam, where it has neighbours now.
            items = [(flat[j], flat[j + 1]) for j in range(0, len(flat), 2)]
            marks = [False] * len(items)
            marks[seam - 1] = marks[seam] = True
            if self._refill(items, level, marks):
                flat = _flat_entries(items)
        n = len(flat) // width
        sizes = [n] if n <= cap else _split_sizes(n, cap, False)
        out: list[Entry] = []
        pos = 0
        for size in sizes:
            if own:
                idx = own.pop(0)
                page = self.cache.modify(self._page(idx), PT_EXTENT)
            else:
                idx, page = self._new_page(left[1])
            _write_node(page, level, flat[width * pos:width * (pos + size)])
            out.append((left[0] if pos == 0 else flat[width * pos], idx | WRITABLE))
            pos += size
        self._node_writes += 1
        for idx in own + shared:  # a spare page of ours is freed; a shared one loses us
            self.meta.decref(idx)
        return out

    def _refill(self, items: list[Entry], level: int, changed: list[bool]) -> bool:
        """Bring every `changed` child of a node of `level` (its entries `items`, changed
        in place) that is under half full up to that, joining it with a neighbour.
        Returns whether any was."""
        child_level = level - 1
        least = self.inner_min if child_level else self.leaf_min
        joined_any = False
        p = 0
        while p < len(items) and len(items) > 1:
            if not changed[p] or _count(self.cache.get(self._page(items[p][1]))) >= least:
                p += 1
                continue
            a = p if p + 1 < len(items) else p - 1
            joined = self._join(items[a], items[a + 1], child_level)
            items[a:a + 2] = joined
            # One node may still be short (its neighbour was too); two are half full.
            changed[a:a + 2] = [len(joined) == 1] * len(joined)
            joined_any = True
            p = a
        return joined_any

    def _refill_path(self, vol: VolumeRecord, path: list[tuple[int, int, int]]) -> None:
        """After the writable path's leaf lost records: join it (and then each ancestor
        left under half full) with a neighbour; a root left with one child goes."""
        for k in range(len(path) - 2, -1, -1):
            level = len(path) - 1 - k  # the parent's
            node = self.cache.get(self._page(path[k + 1][0]))
            if _count(node) >= (self.inner_min if level > 1 else self.leaf_min):
                return
            parent, pos, _ = path[k]
            items = _entries(self.cache.get(self._page(parent)))
            if len(items) > 1:
                a = pos if pos + 1 < len(items) else pos - 1
                items[a:a + 2] = self._join(items[a], items[a + 1], level - 1)
                _write_node(self.cache.modify(self._page(parent), PT_EXTENT), level,
                            _flat_entries(items))
        root, height = self._state(vol)
        if height > 1:
            self._set_root(vol, [(0, root)], height)

    def _own_path(self, vol: VolumeRecord, lc: int) -> list[tuple[int, int, int]]:
        """The path from the root to the leaf for `lc`, made writable (taking nodes,
        creating the root). Items: (node, position of the child in it, its range's lo)."""
        self._taker = vol
        root, height = self._state(vol)
        if root < 0:
            idx, page = self._new_page()
            _write_node(page, 0, [])
            self._set_state(vol, idx | WRITABLE, 1)
            return [(idx, -1, 0)]
        if not root & WRITABLE:
            root = self._take(root, height - 1)
            self._set_state(vol, root | WRITABLE, height)
        path: list[tuple[int, int, int]] = []
        idx, lo = root & IDX_MASK, 0
        get = self.cache.get
        start = self.meta_start
        for level in range(height - 1, 0, -1):
            node = get(start + idx)
            q = memoryview(node).cast("Q")  # entries from u64 3 on: key, child
            n = node[_COUNT] | node[_COUNT + 1] << 8
            i = bisect_right(q[3:3 + 2 * n:2], lc) - 1
            if i < 0:
                i = 0
            child = q[4 + 2 * i]
            if child < WRITABLE:
                child = self._take(child, level - 1)
                node = self.cache.modify(start + idx, PT_EXTENT)
                struct.pack_into("<Q", node, ENTRIES + INNER_ENTRY * i + 8, child | WRITABLE)
            path.append((idx, i, lo))
            if i:
                lo = q[3 + 2 * i]
            idx = child & IDX_MASK
        path.append((idx, -1, lo))
        return path

    def map(self, vol: VolumeRecord, lc: int, pc: int) -> None:
        self._map_one(vol, lc, pc, None)

    def _map_one(self, vol: VolumeRecord, lc: int, pc: int,
                 born: list[tuple[int, int]] | None) -> None:
        """:meth:`map_fresh` of one chunk."""
        if vol.id > MAX_OWNER:
            raise ValueError(f"volume id {vol.id} too large for the extent design")
        path = self._own_path(vol, lc)
        page = self.cache.modify(self._page(path[-1][0]), PT_EXTENT)
        count = page[_COUNT] | page[_COUNT + 1] << 8
        q = memoryview(page)[ENTRIES:ENTRIES + LEAF_ENTRY * count].cast("Q")
        i = bisect_right(q[0::3], lc) - 1
        a, b = max(0, i - 1), min(count, i + 2)  # the record for lc, neighbours
        flat = q[3 * a:3 * b].tolist()
        del q
        new = (lc, 1, pc, vol.id | TAG_WRITABLE)  # a fresh chunk: nobody else can see it
        window: list[Rec] = []
        old = HOLE
        for j in range(0, len(flat), 3):
            start, rpc, w = flat[j:j + 3]
            n, tag = w & LEN_MASK, w >> 32
            if start <= lc < start + n:
                old = rpc + lc - start
                if lc > start:
                    window.append((start, lc - start, rpc, tag))
                window.append(new)
                if lc + 1 < start + n:
                    window.append((lc + 1, start + n - lc - 1, old + 1, tag))
            else:
                window.append((start, n, rpc, tag))
        if old == HOLE:
            window.append(new)
            window.sort()
        if born is None:
            self.data.incref(pc)
        else:
            born.append((pc, 1))
        if old != HOLE:
            self.data.decref(old)
        self._splice(vol, path, page, count, a, b, window, lc)

    def _splice(self, vol: VolumeRecord, path: list[tuple[int, int, int]], page: bytearray,
                count: int, a: int, b: int, window: list[Rec], lc: int) -> None:
        """Replace records [a, b) of the writable path's leaf `page` (`count` records) by
        `window` (sorted), merged where contiguous (see _merge): in place, moving the
        records after them by one memmove, or by rebuilding and splitting a full leaf."""
        cap = self.max_extent
        merged: list[int] = []  # the window merged, as u64s
        ps = pn = pp = pt = -1
        for rs, rn, rp, rt in window:
            if ps + pn == rs and pp + pn == rp and pt == rt and pn + rn <= cap:
                pn += rn
                continue
            if pt >= 0:
                merged += (ps, pp, pn | pt << 32)
            ps, pn, pp, pt = rs, rn, rp, rt
        merged += (ps, pp, pn | pt << 32)
        k = len(merged) // 3
        grown = count + k - (b - a)
        if grown > self.leaf_cap:  # split the leaf: rebuild it from all its records
            rest = _leaf_view(page).tolist()
            rest[3 * a:3 * b] = merged
            self._put_leaf(vol, path, rest, lc)
            return
        # In place: move the records after the window, then write the window's records.
        if grown != count:
            tail = ENTRIES + LEAF_ENTRY * b
            end = ENTRIES + LEAF_ENTRY * count
            to = tail + LEAF_ENTRY * (k - (b - a))
            page[to:to + end - tail] = page[tail:end]
            if grown < count:
                new_end = ENTRIES + LEAF_ENTRY * grown
                page[new_end:end] = bytes(end - new_end)
            page[_COUNT] = grown & 0xFF
            page[_COUNT + 1] = grown >> 8
        packer = _RECS[k] if k < len(_RECS) else struct.Struct("<" + "QQQ" * k)
        packer.pack_into(page, ENTRIES + LEAF_ENTRY * a, *merged)
        if grown < count and grown < self.leaf_min and len(path) > 1:
            self._refill_path(vol, path)  # records joined: the leaf may be under half full

    def map_run(self, vol: VolumeRecord, lc: int, pc: int, count: int) -> None:
        """:meth:`map` a run: per leaf, one descent and one splice of its records (the
        run's pieces become one record each, at most ``max_extent`` chunks long)."""
        self.map_fresh(vol, lc, pc, count, None)

    def map_fresh(self, vol: VolumeRecord, lc: int, pc: int, count: int,
                  born: list[tuple[int, int]] | None) -> None:
        if vol.id > MAX_OWNER:
            raise ValueError(f"volume id {vol.id} too large for the extent design")
        done = 0
        while done < count:
            at = lc + done
            if count - done == 1:
                self._map_one(vol, at, pc + done, born)
                return
            path = self._own_path(vol, at)
            root, height = self._state(vol)
            _, _, hi = self._leaf_for(root, height, at)
            n = min(count - done, self.max_extent, hi - at)
            self._map_piece(vol, path, at, pc + done, n, born)
            done += n

    def _map_piece(self, vol: VolumeRecord, path: list[tuple[int, int, int]], lc: int, pc: int,
                   n: int, born: list[tuple[int, int]] | None) -> None:
        """Point [lc, lc+n), inside the range of the writable path's leaf, at [pc, pc+n)."""
        page = self.cache.modify(self._page(path[-1][0]), PT_EXTENT)
        count = page[_COUNT] | page[_COUNT + 1] << 8
        q = memoryview(page)[ENTRIES:ENTRIES + LEAF_ENTRY * count].cast("Q")
        starts = q[0::3]
        a = max(0, bisect_right(starts, lc) - 2)  # the record before the one holding lc
        b = min(count, bisect_right(starts, lc + n - 1) + 1)  # and the one after the end
        flat = q[3 * a:3 * b].tolist()
        del q, starts
        end = lc + n
        window: list[Rec] = [(lc, n, pc, vol.id | TAG_WRITABLE)]
        olds: list[tuple[int, int]] = []  # (physical chunk, count) no longer referenced here
        for j in range(0, len(flat), 3):
            start, rpc, w = flat[j:j + 3]
            rn, tag = w & LEN_MASK, w >> 32
            stop = start + rn
            if stop <= lc or start >= end:
                window.append((start, rn, rpc, tag))
                continue
            lo, hi = max(start, lc), min(stop, end)
            olds.append((rpc + lo - start, hi - lo))
            if start < lc:
                window.append((start, lc - start, rpc, tag))
            if stop > end:
                window.append((end, stop - end, rpc + end - start, tag))
        window.sort()
        if born is None:
            self.data.incref_run(pc, n)
        else:
            born.append((pc, n))
        for old, k in olds:
            self.data.decref_run(old, k)
        self._splice(vol, path, page, count, a, b, window, lc)

    def _put_leaf(self, vol: VolumeRecord, path: list[tuple[int, int, int]], flat: list[int],
                  lc: int) -> None:
        """Write the records (`flat` u64s) of the writable path's leaf, splitting it if they
        overflow."""
        leaf, _, lo = path[-1]
        if len(flat) <= 3 * self.leaf_cap:
            _write_node(self.cache.modify(self._page(leaf), PT_EXTENT), 0, flat)
            if len(flat) < 3 * self.leaf_min and len(path) > 1:
                self._refill_path(vol, path)
            return
        append = flat[-3] <= lc
        if append and len(path) > 1 and self._shift_left(path, flat):
            return
        recs = [(flat[j], flat[j + 2] & LEN_MASK, flat[j + 1], flat[j + 2] >> 32)
                for j in range(0, len(flat), 3)]
        entries = self._store(leaf, 0, recs, lo, append=append)
        self._grow(vol, path, _marked(entries, True))

    def _shift_left(self, path: list[tuple[int, int, int]], flat: list[int]) -> bool:
        """The writable path's leaf overflows at its end (sequential writes): move its first
        records into its left neighbour instead of splitting, if that is this path's own
        and has the room. An append's split leaves its last leaf only half full (as
        every node must be); with this, a stream fills all but its last two leaves."""
        parent, pos, _ = path[-2]
        if pos == 0:
            return False
        items = _entries(self.cache.get(self._page(parent)))
        left = items[pos - 1][1]
        if not left & WRITABLE or self.meta.get(left & IDX_MASK) != 1:
            return False  # shared (or not known to be ours): split instead
        node = self.cache.get(self._page(left))
        n = len(flat) // 3
        move = min(self.leaf_cap - _count(node), n - self.leaf_min)
        if move < n - self.leaf_cap:
            return False
        _write_node(self.cache.modify(self._page(left), PT_EXTENT), 0,
                    _leaf_view(node).tolist() + flat[:3 * move])
        _write_node(self.cache.modify(self._page(path[-1][0]), PT_EXTENT), 0, flat[3 * move:])
        items[pos] = (flat[3 * move], items[pos][1])  # this leaf's range starts later
        _write_node(self.cache.modify(self._page(parent), PT_EXTENT), 1, _flat_entries(items))
        return True

    def _grow(self, vol: VolumeRecord, path: list[tuple[int, int, int]],
              entries: list[Entry]) -> None:
        """A node of the writable `path` split into `entries`: put them into its parent, and
        so on up. The pieces hold what the writable node held: their entries are writable."""
        for level, k in enumerate(range(len(path) - 2, -1, -1), 1):
            parent, pos, lo = path[k]
            items = _entries(self.cache.get(self._page(parent)))
            items[pos:pos + 1] = entries
            if len(items) <= self.inner_cap:
                _write_node(self.cache.modify(self._page(parent), PT_EXTENT), level,
                            _flat_entries(items))
                return
            entries = _marked(self._store(parent, level, items, lo,
                                          append=pos + len(entries) == len(items)), True)
        self._set_root(vol, entries, len(path))

    def _merge(self, recs: list[Rec]) -> list[Rec]:
        """Join neighbours logically and physically contiguous, with one owner and bit."""
        out: list[Rec] = []
        for r in recs:
            if out:
                p = out[-1]
                if (p[0] + p[1] == r[0] and p[2] + p[1] == r[2] and p[3] == r[3]
                        and p[1] + r[1] <= self.max_extent):
                    out[-1] = (p[0], p[1] + r[1], p[2], p[3])
                    continue
            out.append(r)
        return out

    # -- unmapping -----------------------------------------------------------------------------

    def unmap(self, vol: VolumeRecord, lc: int, count: int) -> tuple[int, list[tuple[int, int]]]:
        stop = self._unmap_range(vol, lc, lc + count, UNMAP_BUDGET)
        return (count if stop is None else stop - lc), []

    def release(self, vol: VolumeRecord, budget: int) -> bool:
        self._unmap_range(vol, 0, INF, max(1, budget))
        if self._state(vol)[0] >= 0:
            return False
        self._last_hint.pop(vol.id, None)  # (ids are never reused: it would stay for good)
        return True

    def _unmap_range(self, vol: VolumeRecord, lo: int, hi: int, budget: int) -> int | None:
        """Unmap [lo, hi) within `budget` (and, once something is dropped, a quarter of the
        journal ring of dirty pages); returns where it stopped, None if it finished."""
        root, height = self._state(vol)
        if root < 0:
            return None
        self._begin_step()
        self._taker = vol
        self._dropped = 0  # chunks and shared subtrees dropped so far in this step
        # Nodes left under half full are joined with a neighbour, except while a deleted
        # volume's map is released: that must never need a page, and no bound matters.
        self._refilling = hi < INF
        entries, stop = self._unmap(root, height - 1, 0, INF, lo, hi, budget)
        self._set_root(vol, entries, height)  # also when the root lost all but one child
        return stop

    def _unmap(self, child: int, level: int, lo: int, hi: int, ulo: int, uhi: int,
               budget: int) -> tuple[list[Entry], int | None]:
        """Unmap [ulo, uhi) in the subtree `child` (an entry: a node of `level` whose range
        is [lo, hi), with its writable bit).

        Returns the entries that replace it in its parent (none if it is gone, several if
        it split) and, if the budget ran out, the first chunk not yet unmapped. A node
        changed in place keeps the entry's bit (what it holds stays as trustworthy); a
        copy's entries are writable (its bits are clear).
        """
        self._work += 1
        idx = child & IDX_MASK
        bit = child & WRITABLE
        if self.meta.get(idx) > 1:
            if ulo <= lo and hi <= uhi:
                self.meta.decref(idx)  # a shared subtree covered whole: drop our reference
                self._dropped += 1
                return [], None
            if not self._mapped_in(idx, level, lo, hi, ulo, uhi):
                return [(lo, child)], None  # nothing to drop: do not copy the path
            if level == 0:  # copy the leaf without what goes: nothing to count twice
                return _marked(self._copy_leaf_without(idx, lo, ulo, uhi), True), None
            idx, bit = self._copy(idx, level), WRITABLE
        node = self.cache.get(self._page(idx))
        if level == 0:
            entries, stop = self._unmap_leaf(idx, node, lo, ulo, uhi, budget)
        else:
            entries, stop = self._unmap_inner(idx, node, level, lo, hi, ulo, uhi, budget)
        if entries is None:
            return [(lo, idx | bit)], stop
        return _marked(entries, bool(bit)), stop

    def _unmap_inner(self, idx: int, node: bytearray, level: int, lo: int, hi: int, ulo: int,
                     uhi: int, budget: int) -> tuple[list[Entry] | None, int | None]:
        items = _entries(node)
        out: list[Entry] = []
        stop: int | None = None
        changed = False
        touched: list[int] = []  # positions in `out` of children that changed
        first = max(0, bisect_right([e[0] for e in items], ulo) - 1)
        out += items[:first]
        for j in range(first, len(items)):
            key, child = items[j]
            clo = lo if j == 0 else key
            chi = items[j + 1][0] if j + 1 < len(items) else hi
            if clo >= uhi or stop is not None:
                out += items[j:]
                break
            if self._work >= budget or (self._dropped and self._dirty_full()):
                stop = max(ulo, clo)  # (past its budget, or past a quarter of the ring)
                out += items[j:]
                break
            writes = self._node_writes
            repl, stop = self._unmap(child, level - 1, clo, chi, ulo, uhi, budget)
            if repl != [(clo, child)]:
                changed = True
            if self._node_writes != writes:  # rewritten (in place too): it may be short
                touched += range(len(out), len(out) + len(repl))
            out += [(key, c) if k == 0 else (ck, c) for k, (ck, c) in enumerate(repl)]
        if out and out[0][0] != lo:
            out[0] = (lo, out[0][1])  # the first child's range starts where ours does
        if self._refilling and touched:
            marks = [False] * len(out)
            for p in touched:
                marks[p] = True
            changed = self._refill(out, level, marks) or changed
        if not changed:
            return None, stop
        return self._store(idx, level, out, lo), stop

    def _mapped_in(self, idx: int, level: int, lo: int, hi: int, ulo: int, uhi: int) -> bool:
        """Whether the subtree `idx` maps any chunk of [ulo, uhi). Nodes are never empty, so
        only the two edges of the range need a walk: O(height * fanout) at most."""
        node = self.cache.get(self._page(idx))
        if level == 0:
            q = _leaf_view(node)
            for j in range(max(0, bisect_right(q[0::3], ulo) - 1), len(q) // 3):
                start = q[3 * j]
                if start >= uhi:
                    return False
                if start + (q[3 * j + 2] & LEN_MASK) > ulo:
                    return True
            return False
        items = _entries(node)
        for j in range(max(0, bisect_right([e[0] for e in items], ulo) - 1), len(items)):
            clo = lo if j == 0 else items[j][0]
            chi = items[j + 1][0] if j + 1 < len(items) else hi
            if clo >= uhi:
                break
            if ulo <= clo and chi <= uhi:
                return True
            if self._mapped_in(items[j][1] & IDX_MASK, level - 1, clo, chi, ulo, uhi):
                return True
        return False

    def _unmap_leaf(self, idx: int, node: bytearray, lo: int, ulo: int, uhi: int,
                    budget: int) -> tuple[list[Entry] | None, int | None]:
        out: list[Rec] = []
        stop: int | None = None
        changed = False
        for r in _records(node):
            start, n, pc, tag = r
            end = start + n
            if stop is not None or end <= ulo or start >= uhi:
                out.append(r)
                continue
            s, e = max(start, ulo), min(end, uhi)
            room = budget - self._work
            if room <= 0:
                stop = s
                out.append(r)
                continue
            take = min(e - s, room)
            if s > start:
                out.append((start, s - start, pc, tag))
            self.data.decref_run(pc + s - start, take)
            self._work += take
            self._dropped += take
            changed = True
            if s + take < end:
                out.append((s + take, end - s - take, pc + s + take - start, tag))
            if s + take < e:
                stop = s + take
        if not changed:
            return None, stop
        return self._store(idx, 0, out, lo), stop

    def _copy_leaf_without(self, idx: int, lo: int, ulo: int, uhi: int) -> list[Entry]:
        """A private copy of the shared leaf `idx` holding only what lies outside [ulo, uhi)
        (no writable bit)."""
        keep: list[Rec] = []
        for start, n, pc, tag in _records(self.cache.get(self._page(idx))):
            end = start + n
            tag &= MAX_OWNER
            if start < ulo:
                keep.append((start, min(end, ulo) - start, pc, tag))
            if end > uhi:
                s = max(start, uhi)
                keep.append((s, end - s, pc + s - start, tag))
        self.meta.decref(idx)
        if not keep:
            return []
        for _, n, pc, _ in keep:
            self.data.incref_run(pc, n)
        new_idx, _ = self._new_page(idx)
        return self._store(new_idx, 0, keep, lo)

    # -- inspection ------------------------------------------------------------------------

    def references(self, vol: VolumeRecord, seen: set[int], ref_page: Callable[[int], None],
                   ref_chunk: Callable[[int], None], problem: Callable[[str], None]) -> None:
        root, height = self._state(vol)
        if root < 0:
            return
        if height < 1:
            problem(f"volume {vol.name!r}: extent root {root & IDX_MASK} with height {height}")
            return
        limit = -(-vol.size // self.chunk_size)
        ref_page(root & IDX_MASK)
        # A deleted volume's map is released without keeping its nodes half full.
        fill = self._bounded() and not vol.deleted
        self._refs(root, height - 1, 0, INF, limit, seen, ref_page, ref_chunk, problem,
                   vol.name, fill, root=True)

    def _refs(self, child: int, level: int, lo: int, hi: int, limit: int, seen: set[int],
              ref_page: Callable[[int], None], ref_chunk: Callable[[int], None],
              problem: Callable[[str], None], name: str, fill: bool,
              root: bool = False) -> None:
        """Check the subtree of entry `child`. Its writable bit claims the subtree is this
        volume's alone: a shared node or chunk under a writable path is a problem. With
        `fill`, every node but the `root` holds at least half its capacity, what bounds
        a map's pages (:meth:`page_bound`)."""
        idx = child & IDX_MASK
        trusted = bool(child & WRITABLE)
        where = f"volume {name!r}: extent node {idx}"
        if not 0 <= idx < self.meta.count:
            problem(f"{where} outside the metadata area")
            return
        if trusted and self.meta.get(idx) != 1:
            problem(f"{where}: writable path to a node with {self.meta.get(idx)} references")
        if idx in seen:
            return
        seen.add(idx)
        node = self.cache.get(self._page(idx))
        magic, got_level, _, count, _ = _NODE.unpack_from(node, PAGE_HEADER_SIZE)
        if magic != MAGIC or got_level != level:
            problem(f"{where}: not an extent node of level {level} (magic {magic!r}, "
                    f"level {got_level})")
            return
        cap = self.inner_cap if level else self.leaf_cap
        if not 1 <= count <= cap:
            problem(f"{where}: {count} entries (capacity {cap})")
            if count > (MAX_INNER if level else MAX_LEAF):
                return
        elif fill and not root and count < _fill_min(cap):
            problem(f"{where}: {count} entries, under the {_fill_min(cap)} every node but "
                    "the root holds")
        if level:
            items = _entries(node)
            if items and items[0][0] < lo:  # ranges only grow: it may be above lo
                problem(f"{where}: first key {items[0][0]} below the node's range from {lo}")
            for j, (key, grandchild) in enumerate(items):
                if j and not items[j - 1][0] < key < hi:
                    problem(f"{where}: key {key} out of order or outside [{lo}, {hi})")
                    continue
                chi = items[j + 1][0] if j + 1 < len(items) else hi
                ref_page(grandchild & IDX_MASK)
                self._refs(grandchild if trusted else grandchild & IDX_MASK, level - 1,
                           key if j else lo, chi, limit, seen, ref_page, ref_chunk, problem, name,
                           fill)
            return
        prev_end = lo
        for start, n, pc, tag in _records(node):
            if n < 1 or n > self.max_extent:
                problem(f"{where}: extent at chunk {start} has length {n}")
            if start < prev_end:
                problem(f"{where}: extent at chunk {start} overlaps or precedes the one "
                        f"before it (or the node's range from {lo})")
            if start + n > hi:
                problem(f"{where}: extent at chunk {start} crosses the node's range end {hi}")
            if start + n > limit:
                problem(f"{where}: extent at chunk {start} beyond the end of the volume "
                        f"({limit} chunks)")
            prev_end = max(prev_end, start + n)
            if pc < 0 or pc + n > self.data.count:
                problem(f"{where}: chunks {pc}..{pc + n - 1} outside the data area")
                continue
            if trusted and tag & TAG_WRITABLE and set(self.data.get_run(pc, n)) != {1}:
                problem(f"{where}: writable extent at chunk {start} maps shared chunks")
            for c in range(pc, pc + n):
                ref_chunk(c)

    def stats_slice(self) -> int:
        return min(512, 8 * self.leaf_cap)

    def skip_empty(self, vol: VolumeRecord, lc: int, end: int) -> int:
        """One descent, and a look at the records and children after `lc` on its way."""
        root, height = self._state(vol)
        found = None
        if root >= 0:
            found = self._next_used(root & IDX_MASK, height - 1, 0, INF, lc)
        return end if found is None else min(found, end)

    def _next_used(self, idx: int, level: int, lo: int, hi: int, lc: int) -> int | None:
        """Below node `idx` (of `level`, covering [lo, hi)): the first chunk at or after
        `lc` that a record maps or where a page starts, or None."""
        if lo >= lc:
            return lo  # the node's own page starts here
        node = self.cache.get(self._page(idx))
        if not level:
            for start, n, _, _ in _records(node):
                if start + n > lc:
                    return max(start, lc)
            return None
        entries = _entries(node)
        for i, (key, child) in enumerate(entries):
            c_lo = key if i else lo
            c_hi = entries[i + 1][0] if i + 1 < len(entries) else hi
            if c_hi <= lc:
                continue
            found = self._next_used(child & IDX_MASK, level - 1, c_lo, c_hi, lc)
            if found is not None:
                return found
        return None

    def exclusive_range(self, vol: VolumeRecord, lc: int, count: int,
                        runs: list[Run]) -> tuple[int, int]:
        root, height = self._state(vol)
        out = [0, 0]
        if root >= 0:
            idx = root & IDX_MASK
            self._exclusive(idx, height - 1, 0, INF, lc, lc + count, self.meta.get(idx) == 1,
                            out)
        return out[0], out[1]

    def _exclusive(self, idx: int, level: int, lo: int, hi: int, want_lo: int, want_hi: int,
                   sole: bool, out: list[int]) -> None:
        """Count into `out` [exclusive chunks, pages starting in the range] the part of
        [want_lo, want_hi) below node `idx` (of `level`, covering [lo, hi))."""
        if want_lo <= lo:
            out[1] += 1
        node = self.cache.get(self._page(idx))
        if level:
            entries = _entries(node)
            for i, (key, child) in enumerate(entries):
                c_lo = key if i else lo
                c_hi = entries[i + 1][0] if i + 1 < len(entries) else hi
                if c_hi <= want_lo or c_lo >= want_hi:
                    continue
                child &= IDX_MASK
                self._exclusive(child, level - 1, c_lo, c_hi, want_lo, want_hi,
                                sole and self.meta.get(child) == 1, out)
            return
        if not sole:
            return
        for start, n, pc, _ in _records(node):
            s = max(start, want_lo)
            e = min(start + n, want_hi)
            if s < e:
                out[0] += self.data.get_run(pc + s - start, e - s).count(1)


def _emit(out: list[Run], lc: int, count: int, pc: int, owner: int) -> None:
    """Append a run, merging it into the last one when contiguous (same owner)."""
    if out:
        last = out[-1]
        if last.lc + last.count == lc and last.owner == owner and (
            (pc == HOLE and last.pc == HOLE)
            or (pc != HOLE and last.pc != HOLE and last.pc + last.count == pc)
        ):
            out[-1] = Run(last.lc, last.count + count, last.pc, owner)
            return
    out.append(Run(lc, count, pc, owner))
