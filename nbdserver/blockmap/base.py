"""The block-map interface: how a volume's logical chunks map to the pool's chunks.

A block map owns the layout of its volumes' maps (a radix tree, extent lists,
an LVM-style origin with exception stores) and nothing else: the pool hands it
the page cache and the space maps, the volume layer does every data transfer.
That keeps a design to one file plus one registry line.

Every method is synchronous and runs inside a mini-transaction
(:meth:`nbdserver.pool.pages.PageCache.mtr`): it reads pages with
``cache.get`` and changes them with ``cache.modify``, and may raise
``PageMiss`` (the caller loads the page and calls again) or ``NbdError``
(ENOSPC, EINVAL...; all its changes are rolled back). So a method must be
safe to run again from the start, and must not keep in-memory state that a
rollback would not undo (use ``cache.add_undo``).

Units: ``lc`` is a logical chunk of a volume, ``pc`` a physical chunk of the
pool's data area, ``owner`` the id of the volume that wrote a chunk (the
volume layer turns it into an allocation depth for ``qemu:allocation-depth``).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from nbdserver.pool.format import VolumeRecord
    from nbdserver.pool.pool import Pool

HOLE = -1
# write_chunk's answers besides a physical chunk (InPlace): write a whole chunk into a
# fresh one (a Redirect with nothing of its own to keep), or ask write_target.
FRESH = -1
ASK = -2

# The answers below are made on every request (a lookup, a write target), so they are
# plain slotted dataclasses: a frozen one sets each field through object.__setattr__,
# which costs more than the rest of a one-chunk lookup. Treat them as values all the same.


@dataclass(slots=True)
class Run:
    """Logical chunks [lc, lc+count) map to [pc, pc+count) (or are a hole, pc == HOLE)."""

    lc: int
    count: int
    pc: int
    owner: int = 0


@dataclass(slots=True)
class InPlace:
    """Write straight into `pc`: the volume alone references it."""

    pc: int


@dataclass(slots=True)
class Claim:
    """Nothing else references `pc` any more, but the map still marks it shared.

    Call :meth:`BlockMap.claim` (cheap, metadata only), then write in place.
    """

    pc: int


@dataclass(slots=True)
class Redirect:
    """Write to a fresh chunk, then :meth:`BlockMap.map` it. `old` is the current
    chunk (HOLE if none) whose bytes fill a partial write.

    `into`, when set, is a chunk the volume already owns but has never written (thick
    provisioning, like an unwritten extent): the whole chunk is written there instead
    of a fresh one (`old`'s bytes or zeros around the new ones), then mapped as usual;
    the design does not count a second reference to it."""

    old: int
    into: int = HOLE


@dataclass(slots=True)
class CopyOut:
    """LVM-style: first preserve chunk `pc` for each volume in `preserve` (copy it to
    a fresh chunk and :meth:`BlockMap.map` that into the volume), commit, then
    :meth:`BlockMap.claim` `pc` and wait for the reads begun before (those volumes may
    still be reading it), then write in place into `pc`."""

    pc: int
    preserve: tuple[int, ...]


WriteTarget = InPlace | Claim | Redirect | CopyOut


@dataclass(slots=True)
class TargetRun:
    """Chunks [lc, lc+count) whose write targets follow from one another: chunk lc+i's
    target is `target` with its chunk numbers advanced by i (``pc`` of InPlace and
    Claim; ``old`` of a Redirect unless HOLE). A Redirect ``into`` a chunk and a
    CopyOut always come one chunk per run."""

    lc: int
    count: int
    target: WriteTarget


def target_at(target: WriteTarget, i: int) -> WriteTarget:
    """The target of the i-th chunk of a :class:`TargetRun` with this `target`."""
    if not i:
        return target
    if type(target) is InPlace:
        return InPlace(target.pc + i)
    if type(target) is Claim:
        return Claim(target.pc + i)
    if type(target) is Redirect and target.old != HOLE:
        return Redirect(target.old + i)
    return target


def _follows(prev: WriteTarget, n: int, target: WriteTarget) -> bool:
    """Whether `target` is what a run starting with `prev` has at its n-th chunk."""
    if isinstance(prev, InPlace) and isinstance(target, InPlace):
        return prev.pc + n == target.pc
    if isinstance(prev, Claim) and isinstance(target, Claim):
        return prev.pc + n == target.pc
    if isinstance(prev, Redirect) and isinstance(target, Redirect):
        if prev.into != HOLE or target.into != HOLE:
            return False
        if prev.old == HOLE:
            return target.old == HOLE
        return prev.old + n == target.old
    return False


def merge_target(runs: list[TargetRun], lc: int, count: int, target: WriteTarget) -> None:
    """Append chunks [lc, lc+count) with `target` to `runs`, extending the last run when
    the targets follow from one another (see :class:`TargetRun`)."""
    if runs:
        last = runs[-1]
        if last.lc + last.count == lc and _follows(last.target, last.count, target):
            runs[-1] = TargetRun(last.lc, last.count + count, last.target)
            return
    runs.append(TargetRun(lc, count, target))


@dataclass
class MapStats:
    """What `volume info` reports about one volume's map."""

    mapped_chunks: int = 0
    exclusive_chunks: int = 0  # chunks whose only reference is this volume's
    extents: int = 0  # maximal runs of logically and physically contiguous chunks
    metadata_pages: int = 0  # map pages reachable from this volume


class BlockMap(ABC):
    """One design; see the module note. Subclasses set `name` and register themselves."""

    name: ClassVar[str]
    description: ClassVar[str]
    supports_clone_of_clone: ClassVar[bool] = True
    # The largest volume id the design's map can record (an owner field's width). Volume
    # ids are handed out once each over a pool's life; past this, no volume is created.
    max_volume_id: ClassVar[int] = (1 << 32) - 1
    # Whether new chunks go next-fit, whatever the logical neighbours (no alloc_hint):
    # the pool may then hand out runs of chunks claimed ahead (RefTable.claim).
    next_fit: ClassVar[bool] = False
    # Whether write_chunk says FRESH where write_target says Claim (the chunk is no longer
    # shared) in a thin volume: a write of the whole chunk then goes into a fresh chunk and
    # frees the old, rather than claim it, which may have to commit first. (A guaranteed
    # volume claims: a fresh chunk would come out of its promise while the old one waits
    # for a commit, and another guaranteed volume could find its own promise gone.)
    fresh_for_claims: ClassVar[bool] = False

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.cache = pool.cache
        self.data = pool.data  # RefTable of data chunks
        self.meta = pool.meta  # RefTable of metadata pages
        self._work = 0  # work of the current bounded step (each design counts its own)
        self._dirty_stop = 0  # dirty pages at which the current step stops (_begin_step)

    def _begin_step(self) -> None:
        """Start one bounded step of long work (unmap, release). Besides its budget of
        work, a step stops once it has dirtied a quarter of the journal ring
        (:meth:`_dirty_full`): one step's commit record must fit the ring, and with a
        small fan-out one entry can dirty a page or two."""
        self._work = 0
        self._dirty_stop = self.cache.dirty_count + self.pool.record_room()

    def _dirty_full(self) -> bool:
        """Whether the current step has dirtied as many pages as it may."""
        return self.cache.dirty_count >= self._dirty_stop

    def _new_map_page(self, vol: VolumeRecord) -> int:
        """A free metadata page for `vol`'s map, counted (ENOSPC when none may be taken:
        a thin volume never takes the pages promised to guaranteed ones; see
        :meth:`nbdserver.pool.pool.Pool.may_take_page`)."""
        self.pool.may_take_page(vol)
        return self.meta.allocate()

    def page_bound(self, vol: VolumeRecord) -> int | None:
        """The most metadata pages `vol`'s map can ever hold, whatever is written, trimmed
        or shared: what a guarantee promises it beside its chunks. None when the design
        has no such bound (its guarantee then covers chunks only). A design that gives a
        bound must take every page of `vol`'s map through :meth:`_new_map_page`."""
        return None

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def default_params(cls) -> tuple[int, int, int, int]:
        """Design parameters stored in the superblock (e.g. the radix fan-out)."""
        return (0, 0, 0, 0)

    @classmethod
    def check_params(cls, params: tuple[int, int, int, int]) -> None:
        """ValueError naming what is wrong with `params` for this design (checked when a
        pool is made, and when it is opened: a pool of a newer version may set more).
        The default accepts any."""
        return None

    @classmethod
    def new_pool_params(cls, params: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """What a new pool stores: `params` with any feature the design marks in every
        pool it makes (a pool made before the feature lacks the mark)."""
        return params

    @abstractmethod
    def init_volume(self, vol: VolumeRecord) -> None:
        """Give a new, empty volume its map (sets ``vol.map_state``)."""

    @abstractmethod
    def clone(self, src: VolumeRecord, dst: VolumeRecord) -> None:
        """Make `dst` read exactly what `src` reads now (snapshot and fork)."""

    def clone_refused(self, src: VolumeRecord) -> str | None:
        """Why `src` cannot be snapshotted or forked in this design, or None."""
        return None

    def needs_reservation(self, vol: VolumeRecord) -> bool:
        """Whether `vol` can still need new chunks (and so a guarantee must reserve them).
        False for a volume allocated thick, whose every chunk is already its own."""
        return True

    def delete_refused(self, vol: VolumeRecord) -> str | None:
        """Why `vol` cannot be deleted in this design, or None."""
        return None

    @abstractmethod
    def release(self, vol: VolumeRecord, budget: int) -> bool:
        """Drop up to about `budget` chunks of the volume's map; True once nothing is left."""

    # -- data path ------------------------------------------------------------------------

    @abstractmethod
    def lookup(self, vol: VolumeRecord, lc: int, count: int) -> list[Run]:
        """Runs covering [lc, lc+count) in order, merged where contiguous. O(path + runs)."""

    @abstractmethod
    def write_target(self, vol: VolumeRecord, lc: int) -> WriteTarget:
        """What a write to chunk `lc` must do (a pure query)."""

    def chunk_at(self, vol: VolumeRecord, lc: int) -> int:
        """The physical chunk that logical chunk `lc` reads from, or HOLE: :meth:`lookup`
        of one chunk with no object made (a one-chunk read's hot path). Designs answer
        it with their shortest walk; this default asks lookup."""
        return self.lookup(vol, lc, 1)[0].pc

    def write_chunk(self, vol: VolumeRecord, lc: int) -> int:
        """:meth:`write_target` of chunk `lc` in short, with no object made (a one-chunk
        write's hot path): the physical chunk for InPlace; FRESH where a write of the
        whole chunk may go into a new chunk, needing nothing of the old (a hole, or a
        copy-on-write: a Redirect; and a Claim where ``fresh_for_claims``, in a thin
        volume); ASK for anything else, and for any write of part of the chunk whatever
        this says (call write_target). This default asks write_target."""
        target = self.write_target(vol, lc)
        if type(target) is InPlace:
            return target.pc
        if type(target) is Redirect and target.into == HOLE:
            return FRESH
        if type(target) is Claim and self.fresh_for_claims and not vol.guaranteed:
            return FRESH
        return ASK

    def write_runs(self, vol: VolumeRecord, lc: int, count: int) -> list[TargetRun]:
        """The write targets of chunks [lc, lc+count) as runs (a pure query, like
        :meth:`write_target` chunk by chunk; designs answer a range in one pass)."""
        runs: list[TargetRun] = []
        for i in range(lc, lc + count):
            merge_target(runs, i, 1, self.write_target(vol, i))
        return runs

    def claim(self, vol: VolumeRecord, lc: int) -> None:
        """Mark the path to `lc` exclusively owned (after write_target said Claim, or once
        the copies of a CopyOut are durable)."""
        raise NotImplementedError

    @abstractmethod
    def map(self, vol: VolumeRecord, lc: int, pc: int) -> None:
        """Point `lc` at the freshly written chunk `pc` (counting a reference to it) and
        drop the reference to what it pointed at before."""

    def map_run(self, vol: VolumeRecord, lc: int, pc: int, count: int) -> None:
        """:meth:`map` chunks [lc, lc+count) to the freshly written [pc, pc+count)."""
        for i in range(count):
            self.map(vol, lc + i, pc + i)

    def map_fresh(self, vol: VolumeRecord, lc: int, pc: int, count: int,
                  born: list[tuple[int, int]] | None) -> None:
        """:meth:`map_run`, but with `born` given, the references to the fresh chunks are
        the caller's to count: (pc, count) is appended to `born`, and the caller counts
        a whole batch with :meth:`RefTable.incref_runs` before the mini-transaction
        ends (chunks claimed one after another: one change of one refcount page for the
        batch). Meanwhile those chunks' counts read 0; nothing in the batch reads them.
        This default counts them at once."""
        self.map_run(vol, lc, pc, count)

    def map_fresh_chunk(self, vol: VolumeRecord, lc: int, pc: int,
                        born: list[tuple[int, int]]) -> None:
        """:meth:`map_fresh` of one chunk, with `born` (a batch of 4 KiB first writes: a
        design may take a shorter path for it)."""
        self.map_fresh(vol, lc, pc, 1, born)

    @abstractmethod
    def unmap(self, vol: VolumeRecord, lc: int, count: int) -> tuple[int, list[tuple[int, int]]]:
        """Make up to `count` chunks from `lc` read as zeros, within a bounded amount of
        work. Returns how many chunks it got through, and ranges (lc, count) that the
        design cannot unmap, which the caller must overwrite with zeros instead."""

    def unmap_may_write(self, vol: VolumeRecord) -> bool:
        """Whether :meth:`unmap` of `vol` may hand back ranges to overwrite with zeros
        (then a zeroing that must be fast, NBD's FAST_ZERO, is refused)."""
        return False

    def alloc_hint(self, vol: VolumeRecord, lc: int) -> int | None:
        """Where a new chunk for `lc` would best go (the extent design keeps locality)."""
        return None

    def can_relocate(self, vol: VolumeRecord) -> bool:
        """Whether :meth:`map` may point a chunk the volume owns (``InPlace``) at a fresh
        copy, freeing the old one (``volume defrag`` does). False where the layout is
        fixed (an arithmetic map, like a thick LVM origin)."""
        return True

    # -- inspection -----------------------------------------------------------------------

    @abstractmethod
    def references(self, vol: VolumeRecord, seen: set[int],
                   ref_page: Callable[[int], None], ref_chunk: Callable[[int], None],
                   problem: Callable[[str], None]) -> None:
        """Report every reference the volume's map holds (for `pool check`), visiting a
        page shared by several volumes only once (`seen`). Reads pages via the cache."""

    @abstractmethod
    def exclusive_range(self, vol: VolumeRecord, lc: int, count: int,
                        runs: list[Run]) -> tuple[int, int]:
        """For `volume info`, one slice [lc, lc+count) of the volume at a time: (chunks of
        the slice only this volume references, map pages *starting* in the slice, i.e.
        whose first chunk lies in it). The pool asks slice after slice from chunk 0, each
        as its own operation, so that a page miss restarts one slice and the pages a
        slice pins are few, whatever the volume size; pages that span several slices are
        counted once (in the slice of their first chunk). `runs` is :meth:`lookup` of the
        slice, which the pool has just made."""

    def stats_slice(self) -> int:
        """Chunks per slice of :meth:`exclusive_range`: few enough that the pages one
        slice can touch (its map pages, and a refcount page per chunk at worst) are few."""
        return 512

    def skip_empty(self, vol: VolumeRecord, lc: int, end: int) -> int:
        """For `volume info`: the first chunk at or after `lc` (at most `end`) where the
        volume maps a chunk or one of its map pages starts (the place
        :meth:`exclusive_range` counts it). Chunks [lc, answer) are holes that no slice
        needs to visit, so a huge thin volume is walked in steps of what it maps, not of
        its size. The default skips nothing."""
        return lc

    def owner_chain_needed(self) -> bool:
        return True


_REGISTRY: dict[str, type[BlockMap]] = {}


def register(cls: type[BlockMap]) -> type[BlockMap]:
    _REGISTRY[cls.name] = cls
    return cls


def designs() -> dict[str, type[BlockMap]]:
    """Every registered design by name (importing the built-in ones)."""
    from nbdserver.blockmap import radix  # noqa: F401  (registers itself)

    for mod in ("extent", "linear"):
        with contextlib.suppress(ImportError):
            __import__(f"nbdserver.blockmap.{mod}")
    return dict(_REGISTRY)


def design(name: str) -> type[BlockMap]:
    """The design called `name`; ValueError listing the valid names otherwise."""
    found = designs()
    if name not in found:
        raise ValueError(f"unknown block map {name!r}; valid: {', '.join(sorted(found))}")
    return found[name]


def full_tree_pages(chunks: int, leaf: int, fanout: int, height: int) -> int:
    """Pages of a tree of `height` levels over `chunks` chunks, with `leaf` chunks per leaf
    and `fanout` children per interior node, every possible node present (a bound for
    :meth:`BlockMap.page_bound`): level k holds at most ceil(chunks / (leaf * fanout**k))."""
    pages, span = 0, leaf
    for _ in range(height):
        pages += -(-chunks // span)
        span *= fanout
    return pages


def walk_runs(runs: list[Run]) -> Iterator[tuple[int, int, int]]:
    for run in runs:
        yield run.lc, run.count, run.pc
