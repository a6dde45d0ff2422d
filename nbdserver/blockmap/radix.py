"""``radix``: the Parallax design. A fixed-height radix tree per volume, shared by forks.

Each volume's map is a tree of metadata pages. A node holds ``fanout`` 8-byte
entries (510 in a 4 KiB page after its 16-byte header; tests shrink it to force
deep trees). A leaf entry points at a data chunk, an interior entry at a node::

    bits 0..39   target + 1 (0 = nothing mapped below)
    bit  40      writable: the path down to here is this volume's alone
    bits 41..63  owner: id of the volume that wrote the chunk (leaves only)

The height is fixed per volume (the smallest with fanout^height >= chunks), so
a lookup reads exactly `height` pages, cached.

**Snapshot and fork are O(1)**: the new volume gets a reference to the same
root page, and both root entries lose their writable bit. **The first write
below a shared node copies the path**: walking down, an entry without the
writable bit leads to a node that may be shared. If its reference count is 1
(the others have gone) it is *claimed*: its entries' writable bits are
cleared (they are stale) and the entry becomes writable. Otherwise it is
*copied*: a new page with the same entries, none writable, each child gaining
a reference; the old node loses one. The writable bit is trusted only along a
path that is writable from the root: an entry reached through a read-only one
says nothing, which is why claiming clears the bits below it.

A data chunk reached through a writable path is written in place. One reached
through a read-only path is copied (``Redirect``) unless it and every node on
the read-only part of the path have a reference count of 1 (``Claim``).

Unmapping (trim, delete) drops a shared subtree that the range covers whole by
one reference, without visiting it, and walks exclusive subtrees to free
their chunks, in bounded steps.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Iterator
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
    full_tree_pages,
    merge_target,
    register,
)
from nbdserver.pool.format import PAGE_HEADER_SIZE, PAGE_SIZE, PT_RADIX, VolumeRecord
from nbdserver.pool.pages import Page

MAX_FANOUT = (PAGE_SIZE - PAGE_HEADER_SIZE) // 8  # 510
TARGET_MASK = (1 << 40) - 1
WRITABLE = 1 << 40
OWNER_SHIFT = 41
MAX_OWNER = (1 << 23) - 1
_VOLUME_IDS = MAX_OWNER + 1  # leaf-memory keys: leaf index * _VOLUME_IDS + volume id
LEAF_MEMORY = 1 << 16  # leaves remembered at most, then forgotten all at once (see __init__)
_Q = struct.Struct("<Q")
_HEADER_WORDS = PAGE_HEADER_SIZE // 8  # a node's entry k is its page's word k + this
# The leaf memory reads entries as native words (Page.words): little-endian hosts only.
_KEEP_LEAVES = sys.byteorder == "little"
_STATE = struct.Struct("<QB")  # root entry, height


def _entry(target: int, writable: bool, owner: int = 0) -> int:
    return (target + 1) | (WRITABLE if writable else 0) | (owner << OWNER_SHIFT)


def _target(entry: int) -> int:
    return (entry & TARGET_MASK) - 1


def _target_runs(entries: list[int]) -> Iterator[tuple[int, int]]:
    """(first, count) for each run of consecutive targets among the mapped `entries`."""
    first = count = 0
    for e in entries:
        if not e & TARGET_MASK:
            continue
        t = _target(e)
        if count and t == first + count:
            count += 1
            continue
        if count:
            yield first, count
        first, count = t, 1
    if count:
        yield first, count


@register
class RadixMap(BlockMap):
    """Parallax-style radix tree; see the module note."""

    name: ClassVar[str] = "radix"
    max_volume_id: ClassVar[int] = MAX_OWNER  # (the owner field of an entry: 23 bits)
    description: ClassVar[str] = "Parallax-style radix tree: O(1) forks, path copy on write"
    next_fit: ClassVar[bool] = True
    fresh_for_claims: ClassVar[bool] = True

    def __init__(self, pool: object) -> None:
        super().__init__(pool)  # type: ignore[arg-type]
        self.check_params(self.pool.sb.map_params)
        self.fanout = fanout = self.pool.sb.map_params[0] or MAX_FANOUT
        self.meta_start = self.pool.layout.meta_start
        self.chunk_size = self.pool.sb.chunk_size
        # Leaves reached through a writable path (this volume's alone, so only its own
        # structural changes can move them): (leaf index, volume id) -> the cached page
        # (PageCache.keep). A walk that hits it reads one entry instead of `height`
        # pages, without even the cache's lookup while the page stays cached. Filled
        # only outside a mini-transaction (what it sees is complete), emptied by every
        # change of a root or of interior nodes (_forget_leaves); a copy or claim of a
        # leaf forgets that leaf of that volume only (_own_node).
        self._leaves: dict[int, Page] = {}
        # Every leaf a lookup reached, through a writable path or not (a fork reading
        # what it shares): for reads only, since a shared leaf's entries keep the
        # writable bits of the volume that wrote them. A node another volume can reach
        # never changes in place (a writer copies it, or claims it once it is the only
        # path to it, and both forget what the writer remembers of it), so what these
        # pages say stays true for the volume that reached them until its own tree
        # changes (a root, a copy, a claim, an unmap, a release).
        self._read_leaves: dict[int, Page] = {}
        # ...and no more than the cache holds: a remembered page that has left the cache
        # is of no use, and the memory it takes is no longer the cache's.
        self._leaf_limit = min(LEAF_MEMORY, self.cache.capacity)
        # height -> chunks below one entry at each level, root first (fanout**level).
        self._spans = [tuple(fanout ** level for level in range(h - 1, -1, -1))
                       for h in range(65)]  # 64 levels cover 2**64 chunks at fan-out 2

    @classmethod
    def default_params(cls) -> tuple[int, int, int, int]:
        return (MAX_FANOUT, 0, 0, 0)

    # -- map state ------------------------------------------------------------------------

    def _height(self, vol: VolumeRecord) -> int:
        chunks = max(1, -(-vol.size // self.chunk_size))
        height, cap = 1, self.fanout
        while cap < chunks:
            height += 1
            cap *= self.fanout
        return height

    def _root(self, vol: VolumeRecord) -> tuple[int, int]:
        root, height = _STATE.unpack_from(vol.map_state)
        return root, height

    def _forget_leaves(self) -> None:
        self._leaves.clear()
        self._read_leaves.clear()

    def _set_root(self, vol: VolumeRecord, root: int) -> None:
        self._forget_leaves()
        _, height = self._root(vol)
        state = bytearray(vol.map_state)
        _STATE.pack_into(state, 0, root, height)
        self.pool.update_volume(vol, map_state=bytes(state))

    def _page(self, meta_index: int) -> int:
        return self.meta_start + meta_index

    def init_volume(self, vol: VolumeRecord) -> None:
        state = bytearray(vol.map_state)
        _STATE.pack_into(state, 0, 0, self._height(vol))
        vol.map_state = bytes(state)

    @classmethod
    def check_params(cls, params: tuple[int, int, int, int]) -> None:
        fanout = params[0] or MAX_FANOUT
        if not 2 <= fanout <= MAX_FANOUT:
            raise ValueError(f"radix fan-out {fanout} out of range 2..{MAX_FANOUT}")

    def page_bound(self, vol: VolumeRecord) -> int:
        """Every node of a tree of the volume's height over its chunks (a copy on write
        replaces a node, so the tree never holds two for one place)."""
        chunks = max(1, -(-vol.size // self.chunk_size))
        return full_tree_pages(chunks, self.fanout, self.fanout, self._height(vol))

    def clone(self, src: VolumeRecord, dst: VolumeRecord) -> None:
        root, height = self._root(src)
        state = bytearray(dst.map_state)
        if root:
            self.meta.incref(_target(root))
            shared = root & ~WRITABLE
            self._set_root(src, shared)
            _STATE.pack_into(state, 0, shared, height)
        else:
            _STATE.pack_into(state, 0, 0, height)
        dst.map_state = bytes(state)

    # -- lookups ---------------------------------------------------------------------------

    def _entry_at(self, vol: VolumeRecord, lc: int) -> int:
        """The leaf entry of chunk `lc` (0 when nothing is mapped there): one word of a
        known leaf, or one walk from the root (which learns the leaf)."""
        fanout = self.fanout
        key = lc // fanout * _VOLUME_IDS + vol.id
        leaf = self._read_leaves.get(key)
        if leaf is not None and leaf.cached:
            leaf.recent = True
            return leaf.words[_HEADER_WORDS + lc % fanout]  # type: ignore[index]
        e, height = _STATE.unpack_from(vol.map_state)
        if not e:
            return 0
        get = self.cache.get
        unpack = _Q.unpack_from
        writable = e & WRITABLE
        pages = self.meta_start - 1
        for span in self._spans[height]:
            page = pages + (e & TARGET_MASK)
            e = unpack(get(page), PAGE_HEADER_SIZE + 8 * ((lc // span) % fanout))[0]
            if span == 1:
                self._know_leaf(key, page, bool(writable))
            elif writable:
                writable = e & WRITABLE
            if not e & TARGET_MASK:
                return 0
        return int(e)

    def chunk_at(self, vol: VolumeRecord, lc: int) -> int:
        fanout = self.fanout
        leaf = self._read_leaves.get(lc // fanout * _VOLUME_IDS + vol.id)
        if leaf is not None and leaf.cached:  # (_entry_at, inlined: every 4 KiB read)
            leaf.recent = True
            e = leaf.words[_HEADER_WORDS + lc % fanout]  # type: ignore[index]
        else:
            e = self._entry_at(vol, lc)
        return (e & TARGET_MASK) - 1  # (an empty entry gives HOLE)

    def lookup(self, vol: VolumeRecord, lc: int, count: int) -> list[Run]:
        if count == 1:
            e = self._entry_at(vol, lc)
            if not e & TARGET_MASK:
                return [Run(lc, 1, HOLE)]
            return [Run(lc, 1, (e & TARGET_MASK) - 1, e >> OWNER_SHIFT)]
        root, height = self._root(vol)
        if not root:
            return [Run(lc, count, HOLE)]
        out: list[Run] = []
        self._collect(root, height - 1, 0, lc, lc + count, out)
        return out

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

    def _collect(self, e: int, level: int, base: int, lo: int, hi: int, out: list[Run]) -> None:
        if not e & TARGET_MASK:
            self._emit(out, lo, hi - lo, HOLE, 0)
            return
        node = self.cache.get(self._page(_target(e)))
        span = self.fanout ** level
        first = (lo - base) // span
        last = (hi - 1 - base) // span
        if level == 0:  # a leaf: one pass over its entries, runs built locally
            entries = memoryview(node)[PAGE_HEADER_SIZE + 8 * first:
                                       PAGE_HEADER_SIZE + 8 * (last + 1)].cast("Q").tolist()
            run_lc, run_n, run_pc, run_owner = base + first, 0, HOLE, 0
            for k, child in enumerate(entries):
                if child & TARGET_MASK:
                    pc, owner = (child & TARGET_MASK) - 1, child >> OWNER_SHIFT
                    if run_n and run_pc != HOLE and owner == run_owner and run_pc + run_n == pc:
                        run_n += 1
                        continue
                elif run_n and run_pc == HOLE:
                    run_n += 1
                    continue
                else:
                    pc, owner = HOLE, 0
                if run_n:
                    self._emit(out, run_lc, run_n, run_pc, run_owner)
                run_lc, run_n, run_pc, run_owner = base + first + k, 1, pc, owner
            if run_n:
                self._emit(out, run_lc, run_n, run_pc, run_owner)
            return
        for i in range(first, last + 1):
            child = _Q.unpack_from(node, PAGE_HEADER_SIZE + 8 * i)[0]
            start = max(lo, base + i * span)
            end = min(hi, base + (i + 1) * span)
            if level == 0:
                if child & TARGET_MASK:
                    self._emit(out, start, 1, _target(child), child >> OWNER_SHIFT)
                else:
                    self._emit(out, start, 1, HOLE, 0)
            elif not child & TARGET_MASK:
                self._emit(out, start, end - start, HOLE, 0)
            else:
                self._collect(child, level - 1, base + i * span, start, end, out)

    def write_target(self, vol: VolumeRecord, lc: int) -> WriteTarget:
        fanout = self.fanout
        get = self.cache.get
        unpack = _Q.unpack_from
        key = lc // fanout * _VOLUME_IDS + vol.id
        leaf = self._leaves.get(key)
        if leaf is not None and leaf.cached:  # a writable path: the leaf entry decides
            leaf.recent = True
            e = leaf.words[_HEADER_WORDS + lc % fanout]  # type: ignore[index]
            if not e & TARGET_MASK:
                return Redirect(HOLE)
            pc = (e & TARGET_MASK) - 1
            if e & WRITABLE:
                return InPlace(pc)
            return Claim(pc) if self.data.get(pc) == 1 else Redirect(pc)
        e, height = _STATE.unpack_from(vol.map_state)
        if not e:
            return Redirect(HOLE)
        writable = e & WRITABLE
        sole = True  # every node on the read-only part of the path has one reference
        pages = self.meta_start - 1  # page of the node an entry points at: pages + (e & mask)
        page = 0
        for span in self._spans[height]:
            if not writable and sole and self.meta.get((e & TARGET_MASK) - 1) != 1:
                sole = False
            page = pages + (e & TARGET_MASK)
            e = unpack(get(page), PAGE_HEADER_SIZE + 8 * ((lc // span) % fanout))[0]
            if not e & TARGET_MASK:
                if writable and span == 1:
                    self._know_leaf(key, page, True)
                return Redirect(HOLE)
            if writable:
                if span == 1:
                    self._know_leaf(key, page, True)
                writable = e & WRITABLE
        pc = (e & TARGET_MASK) - 1
        if writable:
            return InPlace(pc)
        if sole and self.data.get(pc) == 1:
            return Claim(pc)
        return Redirect(pc)

    def write_chunk(self, vol: VolumeRecord, lc: int) -> int:
        fanout = self.fanout
        leaf = self._leaves.get(lc // fanout * _VOLUME_IDS + vol.id)
        if leaf is None or not leaf.cached:
            return super().write_chunk(vol, lc)  # a walk, which may learn the leaf
        leaf.recent = True
        e = leaf.words[_HEADER_WORDS + lc % fanout]  # type: ignore[index]
        target = e & TARGET_MASK
        if target and e & WRITABLE:  # (the common case first)
            return target - 1
        # A hole, or a chunk the path does not own: a write of the whole chunk goes into
        # a fresh one, which needs nothing of the old bytes. Even a chunk no other volume
        # holds any more (write_target's Claim) is not claimed for it: a claim may have
        # to commit first, while a redirect frees the old chunk like any overwrite. Not
        # for a guaranteed volume (fresh_for_claims): its redirect would take a chunk
        # from its promise while the old one waits in quarantine for the next commit,
        # and that chunk may be the last another guaranteed volume was promised.
        if target and vol.guaranteed and self.data.get(target - 1) == 1:
            return ASK
        return FRESH

    def _know_leaf(self, key: int, page: int, writable: bool) -> None:
        """Remember a leaf a walk reached, for writes too if through a writable path
        (see __init__)."""
        if _KEEP_LEAVES and not self.cache.in_mtr:
            if len(self._read_leaves) >= self._leaf_limit:
                self._forget_leaves()
            kept = self._read_leaves[key] = self.cache.keep(page)
            if writable:
                self._leaves[key] = kept

    def write_runs(self, vol: VolumeRecord, lc: int, count: int) -> list[TargetRun]:
        """:meth:`write_target` over a range: one walk per leaf, and a leaf's stretch of
        entries on a writable path that point at consecutive chunks is one run."""
        if count == 1:  # the hot path: one 4 KiB write
            return [TargetRun(lc, 1, self.write_target(vol, lc))]
        root, height = self._root(vol)
        if not root:
            return [TargetRun(lc, count, Redirect(HOLE))]
        runs: list[TargetRun] = []
        self._write_runs(root, bool(root & WRITABLE), True, height - 1, 0, lc, lc + count, runs)
        return runs

    def _write_runs(self, e: int, writable: bool, sole: bool, level: int, base: int,
                    lo: int, hi: int, runs: list[TargetRun]) -> None:
        """Targets of [lo, hi) below entry `e`, a node of `level` covering from `base`;
        `writable` and `sole` describe the path down to `e` (as in write_target)."""
        target = _target(e)
        if not writable and sole and self.meta.get(target) != 1:
            sole = False
        node = self.cache.get(self._page(target))
        span = self.fanout ** level
        first = (lo - base) // span
        last = (hi - 1 - base) // span
        entries = memoryview(node)[PAGE_HEADER_SIZE + 8 * first:
                                   PAGE_HEADER_SIZE + 8 * (last + 1)].cast("Q").tolist()
        if level:
            for k, child in enumerate(entries):
                start = max(lo, base + (first + k) * span)
                end = min(hi, base + (first + k + 1) * span)
                if child & TARGET_MASK:
                    self._write_runs(child, writable and bool(child & WRITABLE), sole,
                                     level - 1, base + (first + k) * span, start, end, runs)
                else:
                    merge_target(runs, start, end - start, Redirect(HOLE))
            return
        lc0 = base + first
        e0 = entries[0]
        if (writable and e0 & WRITABLE and e0 & TARGET_MASK
                and entries == list(range(e0, e0 + len(entries)))):
            merge_target(runs, lc0, len(entries), InPlace(_target(e0)))  # the common case
            return
        data = self.data
        for k, child in enumerate(entries):
            t: WriteTarget
            if not child & TARGET_MASK:
                t = Redirect(HOLE)
            elif writable and child & WRITABLE:
                t = InPlace(_target(child))
            elif sole and data.get(_target(child)) == 1:
                t = Claim(_target(child))
            else:
                t = Redirect(_target(child))
            merge_target(runs, lc0 + k, 1, t)

    # -- changes ---------------------------------------------------------------------------

    def _own_node(self, vol: VolumeRecord, e: int, level: int, lc: int | None = None) -> int:
        """Make the node `e` points at (a node of `level` in `vol`'s tree, on the path to
        chunk `lc` if known) this path's alone: claim or copy.

        Returns the writable entry to store in its parent.
        """
        if e & WRITABLE:
            return e
        if level == 0 and lc is not None:
            # A leaf: only what `vol` remembers of this one leaf changes (a copy is a new
            # page; a claimed page only `vol` reaches). Other volumes' leaves and this
            # volume's others stay as they are: a honeyfarm's clones each copying their
            # leaves do not make every other clone walk again.
            key = lc // self.fanout * _VOLUME_IDS + vol.id
            self._leaves.pop(key, None)
            self._read_leaves.pop(key, None)
        else:
            self._forget_leaves()  # (a copy or a claim changes which leaves are whose)
        target = _target(e)
        if self.meta.get(target) == 1:  # claim: clear the stale writable bits below
            node = self.cache.modify(self._page(target), PT_RADIX)
            for i in range(self.fanout):
                off = PAGE_HEADER_SIZE + 8 * i
                child = _Q.unpack_from(node, off)[0]
                if child & WRITABLE:
                    _Q.pack_into(node, off, child & ~WRITABLE)
            return e | WRITABLE
        # copy: the new node shares every child, so each gains a reference
        old = self.cache.get(self._page(target))
        new_target = self._new_map_page(vol)
        new = self.cache.create(self._page(new_target), PT_RADIX)
        children = self.data if level == 0 else self.meta
        end = PAGE_HEADER_SIZE + 8 * self.fanout
        with memoryview(old) as src, memoryview(new) as dst, \
                src[PAGE_HEADER_SIZE:end].cast("Q") as q_old, \
                dst[PAGE_HEADER_SIZE:end].cast("Q") as q_new:
            entries = q_old.tolist()
            q_new[:] = array("Q", [e & ~WRITABLE for e in entries])
        # Each child gains a reference: a run of consecutive targets at a time (a leaf of
        # a volume written sequentially is one run), not one count at a time.
        for first, count in _target_runs(entries):
            children.incref_run(first, count)
        self.meta.decref(target)
        return _entry(new_target, True, e >> OWNER_SHIFT)

    def _new_node(self, vol: VolumeRecord) -> int:
        target = self._new_map_page(vol)
        self.cache.create(self._page(target), PT_RADIX)
        return _entry(target, True)

    def _writable_leaf(self, vol: VolumeRecord, lc: int) -> bytearray:
        """The leaf page holding `lc`, made this volume's alone (creating the path)."""
        leaf = self._leaves.get(lc // self.fanout * _VOLUME_IDS + vol.id)
        if leaf is not None:  # known through a writable path: nothing to copy on the way
            return self.cache.modify(leaf.no, PT_RADIX)
        root, height = self._root(vol)
        new_root = self._new_node(vol) if not root else self._own_node(vol, root, height - 1,
                                                                         lc)
        if new_root != root:
            self._set_root(vol, new_root)
        e = new_root
        fanout = self.fanout
        for level in range(height - 1, 0, -1):
            node = self.cache.get(self._page(_target(e)))  # changed below only if needed
            off = PAGE_HEADER_SIZE + 8 * ((lc // fanout ** level) % fanout)
            child = _Q.unpack_from(node, off)[0]
            new_child = self._new_node(vol) if not child & TARGET_MASK else self._own_node(
                vol, child, level - 1, lc)
            if new_child != child:
                node = self.cache.modify(self._page(_target(e)), PT_RADIX)
                _Q.pack_into(node, off, new_child)
            e = new_child
        return self.cache.modify(self._page(_target(e)), PT_RADIX)

    def claim(self, vol: VolumeRecord, lc: int) -> None:
        if vol.id > MAX_OWNER:
            raise ValueError(f"volume id {vol.id} too large for the radix design")
        leaf = self._writable_leaf(vol, lc)
        off = PAGE_HEADER_SIZE + 8 * (lc % self.fanout)
        e = _Q.unpack_from(leaf, off)[0]
        if not e & TARGET_MASK or self.data.get(_target(e)) != 1:
            raise AssertionError(f"claim of chunk {lc} that is not solely referenced")
        # This volume's own from now on (its write follows): allocation depth 0.
        _Q.pack_into(leaf, off, _entry(_target(e), True, vol.id))

    def map(self, vol: VolumeRecord, lc: int, pc: int) -> None:
        self._point(vol, lc, pc)
        self.data.incref(pc)

    def map_run(self, vol: VolumeRecord, lc: int, pc: int, count: int) -> None:
        """:meth:`map` a run: one walk and one slice of entries per leaf."""
        self.map_fresh(vol, lc, pc, count, None)

    def map_fresh(self, vol: VolumeRecord, lc: int, pc: int, count: int,
                  born: list[tuple[int, int]] | None) -> None:
        if count == 1:
            self._point(vol, lc, pc)
        else:
            fanout = self.fanout
            done = 0
            while done < count:
                n = min(count - done, fanout - (lc + done) % fanout)
                self._point(vol, lc + done, pc + done, n)
                done += n
        if born is not None:
            born.append((pc, count))
        elif count == 1:
            self.data.incref(pc)
        else:
            self.data.incref_run(pc, count)

    def map_fresh_chunk(self, vol: VolumeRecord, lc: int, pc: int,
                        born: list[tuple[int, int]]) -> None:
        vid = vol.id
        leaf = self._leaves.get(lc // self.fanout * _VOLUME_IDS + vid)
        if leaf is None or not leaf.cached:
            self.map_fresh(vol, lc, pc, 1, born)  # a walk, which may copy the path
            return
        # A leaf known through a writable path (as _writable_leaf): one entry to change.
        i = _HEADER_WORDS + lc % self.fanout
        self.cache.modify_span(leaf.no, 8 * i, 8, PT_RADIX)  # (leaf.words views the bytes)
        words = leaf.words
        assert words is not None
        old = words[i]
        words[i] = (pc + 1) | WRITABLE | (vid << OWNER_SHIFT)  # _entry(pc, True, vid)
        if old & TARGET_MASK:
            self.data.decref((old & TARGET_MASK) - 1)
        born.append((pc, 1))

    def _point(self, vol: VolumeRecord, lc: int, pc: int, n: int = 1) -> None:
        """Point chunks [lc, lc+n), within one leaf, at [pc, pc+n) (no reference counted
        for those) and drop the references to what they pointed at."""
        if vol.id > MAX_OWNER:
            raise ValueError(f"volume id {vol.id} too large for the radix design")
        leaf = self._writable_leaf(vol, lc)
        k = lc % self.fanout
        if n == 1:
            off = PAGE_HEADER_SIZE + 8 * k
            old = _Q.unpack_from(leaf, off)[0]
            _Q.pack_into(leaf, off, _entry(pc, True, vol.id))
            if old & TARGET_MASK:
                self.data.decref(_target(old))
            return
        first = _entry(pc, True, vol.id)
        with memoryview(leaf) as view, view[PAGE_HEADER_SIZE + 8 * k:
                                            PAGE_HEADER_SIZE + 8 * (k + n)].cast("Q") as q:
            olds = q.tolist()
            q[:] = array("Q", range(first, first + n))
        for e in olds:
            if e & TARGET_MASK:
                self.data.decref(_target(e))

    def unmap(self, vol: VolumeRecord, lc: int, count: int) -> tuple[int, list[tuple[int, int]]]:
        root, height = self._root(vol)
        if not root:
            return count, []
        self._begin_step()
        self._forget_leaves()  # subtrees may be freed or copied
        budget = 4 * self.fanout
        new_root, stop = self._unmap(vol, root, height - 1, 0, lc, lc + count, budget)
        if new_root != root:
            self._set_root(vol, new_root)
        return (stop - lc if stop is not None else count), []

    def _unmap(self, vol: VolumeRecord, e: int, level: int, base: int, lo: int, hi: int,
               budget: int) -> tuple[int, int | None]:
        """Unmap [lo, hi) below entry `e` (a node of `level` of `vol`'s tree covering from
        `base`).

        Returns the entry's new value and, if the budget ran out, the first chunk
        not yet unmapped.
        """
        if not e & TARGET_MASK:
            return e, None
        span = self.fanout ** level
        cover = span * self.fanout
        target = _target(e)
        whole = lo <= base and hi >= base + cover
        if whole and (not e & WRITABLE) and self.meta.get(target) > 1:
            self.meta.decref(target)  # drop a shared subtree without visiting it
            self._work += 1
            return 0, None
        e = self._own_node(vol, e, level)
        target = _target(e)
        page = self._page(target)
        first = (lo - base) // span
        last = (hi - 1 - base) // span
        children = self.data if level == 0 else self.meta
        stop: int | None = None
        for i in range(first, last + 1):
            off = PAGE_HEADER_SIZE + 8 * i
            child = _Q.unpack_from(self.cache.get(page), off)[0]
            if not child & TARGET_MASK:
                continue
            if self._work >= budget or (self._work and self._dirty_full()):
                stop = max(lo, base + i * span)
                break
            if level == 0:
                children.decref(_target(child))
                _Q.pack_into(self.cache.modify(page, PT_RADIX), off, 0)
                self._work += 1
                continue
            start = max(lo, base + i * span)
            end = min(hi, base + (i + 1) * span)
            new_child, child_stop = self._unmap(vol, child, level - 1, base + i * span, start,
                                                end, budget)
            if new_child != child:
                _Q.pack_into(self.cache.modify(page, PT_RADIX), off, new_child)
            if child_stop is not None:
                stop = child_stop
                break
        node = self.cache.get(page)
        if not any(memoryview(node)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 8 * self.fanout]):
            self.meta.decref(target)
            return 0, stop
        return e, stop

    def release(self, vol: VolumeRecord, budget: int) -> bool:
        root, height = self._root(vol)
        if not root:
            return True
        self._begin_step()
        self._forget_leaves()
        chunks = self.fanout ** height
        new_root, _ = self._unmap(vol, root, height - 1, 0, 0, chunks, budget)
        if new_root != root:
            self._set_root(vol, new_root)
        return not new_root

    # -- inspection ------------------------------------------------------------------------

    def references(self, vol: VolumeRecord, seen: set[int], ref_page: Callable[[int], None],
                   ref_chunk: Callable[[int], None], problem: Callable[[str], None]) -> None:
        root, height = self._root(vol)
        if height != self._height(vol):
            problem(f"volume {vol.name!r}: radix height {height}, expected {self._height(vol)}")
        if not root:
            return
        ref_page(_target(root))
        limit = -(-vol.size // self.chunk_size)
        self._refs(root, height - 1, 0, limit, seen, ref_page, ref_chunk, problem, vol.name)

    def _refs(self, e: int, level: int, base: int, limit: int, seen: set[int],
              ref_page: Callable[[int], None], ref_chunk: Callable[[int], None],
              problem: Callable[[str], None], name: str) -> None:
        target = _target(e)
        if target in seen:
            return
        seen.add(target)
        if not 0 <= target < self.meta.count:
            problem(f"volume {name!r}: radix node {target} outside the metadata area")
            return
        node = self.cache.get(self._page(target))
        span = self.fanout ** level
        for i in range(self.fanout):
            child = _Q.unpack_from(node, PAGE_HEADER_SIZE + 8 * i)[0]
            if not child & TARGET_MASK:
                continue
            if base + i * span >= limit:
                problem(f"volume {name!r}: radix entry beyond the end of the volume "
                        f"(chunk {base + i * span})")
            if level == 0:
                pc = _target(child)
                if not 0 <= pc < self.data.count:
                    problem(f"volume {name!r}: chunk {pc} outside the data area")
                else:
                    ref_chunk(pc)
            else:
                ref_page(_target(child))
                self._refs(child, level - 1, base + i * span, limit, seen, ref_page, ref_chunk,
                           problem, name)

    def stats_slice(self) -> int:
        return self.fanout  # one leaf

    def skip_empty(self, vol: VolumeRecord, lc: int, end: int) -> int:
        """One descent, and a scan of the entries after `lc` in the nodes on its way."""
        root, height = self._root(vol)
        found = self._next_used(root, height - 1, 0, lc) if root else None
        return end if found is None else min(found, end)

    def _next_used(self, e: int, level: int, base: int, lc: int) -> int | None:
        """Below the node `e` points at (of `level`, covering from `base`): the first chunk
        at or after `lc` that is mapped or where a page starts, or None."""
        if base >= lc:
            return base  # the node's own page starts here
        node = self.cache.get(self._page(_target(e)))
        span: int = self.fanout ** level
        first = (lc - base) // span
        entries: list[int] = memoryview(node)[PAGE_HEADER_SIZE + 8 * first:
                                              PAGE_HEADER_SIZE + 8 * self.fanout
                                              ].cast("Q").tolist()
        for k, child in enumerate(entries):
            if not child & TARGET_MASK:
                continue
            start = base + (first + k) * span
            if not level:
                return max(start, lc)
            found = self._next_used(child, level - 1, start, lc)
            if found is not None:
                return found
        return None

    def exclusive_range(self, vol: VolumeRecord, lc: int, count: int,
                        runs: list[Run]) -> tuple[int, int]:
        root, height = self._root(vol)
        out = [0, 0]
        if root:
            self._exclusive(root, height - 1, 0, lc, lc + count, True, out)
        return out[0], out[1]

    def _exclusive(self, e: int, level: int, base: int, lo: int, hi: int, sole: bool,
                   out: list[int]) -> None:
        """Count into `out` [exclusive chunks, pages starting in the range] the part of
        [lo, hi) below the node `e` points at (a node of `level` covering from `base`)."""
        target = _target(e)
        sole = sole and self.meta.get(target) == 1
        if lo <= base:
            out[1] += 1
        node = self.cache.get(self._page(target))
        span = self.fanout ** level  # chunks per entry
        first = max(0, lo - base) // span
        last = min(self.fanout, -(-(hi - base) // span))
        entries = memoryview(node)[PAGE_HEADER_SIZE + 8 * first:
                                   PAGE_HEADER_SIZE + 8 * last].cast("Q").tolist()
        if level == 0:
            if sole:  # count by runs of consecutive chunks (one read of their counts)
                for pc, n in _target_runs(entries):
                    out[0] += self.data.get_run(pc, n).count(1)
            return
        for k, child in enumerate(entries):
            if child & TARGET_MASK:
                self._exclusive(child, level - 1, base + (first + k) * span, lo, hi, sole, out)
