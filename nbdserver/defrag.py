"""``volume defrag``: make each logical run of a volume's own chunks physically contiguous.

Works for every block-map design, through the interface only: ``lookup`` finds
where the chunks are, ``write_target`` tells the volume's own chunks (``InPlace``
or ``Claim``: nothing else references them) from shared ones, the space map
hands out exact free chunks (``RefTable.claim``, ``find_free_run``), the data
is copied with O_DIRECT AIO, and ``map`` points the logical chunks at their new
places in a mini-transaction, dropping the old ones. **Shared chunks stay where
they are**: moving one would un-share it, costing a copy's worth of space for
every volume that shares it.

The volume is walked in windows of ``WINDOW_BYTES`` of logical space (holes are
skipped whole). In each window, every maximal logical run of own chunks (a
*segment*) gets a target placement, the first that works of:

1. right after the chunk before the segment (the previous window's last chunk,
   or a shared neighbour), so that runs continue across windows;
2. the placement of its longest physically contiguous piece, if every other
   chunk's target there is free: only the misplaced chunks move (a fork whose
   parent was deleted: its rewritten chunks go back into the holes the
   parent's copies left);
3. a fresh free run: the rest (the *tail*) of the last one a segment went into,
   while its chunks are still free, so that one search serves many segments and
   windows; else one found by :meth:`RefTable.find_free_run` (searching on from
   the tail) long enough for the segment, the rest of the window and the next
   one, else the longest one, and on from there.

A segment already in place costs nothing. Per window with something to move:
plan and claim the targets (one mini-transaction), **quiesce** the volume if a
server exports it (``pool.quiesce``: new writes wait, those in flight finish;
reads go on), copy, install (one mini-transaction that re-checks that each
chunk is still mapped where it was and still the volume's own, and skips it
otherwise), resume, commit. So a concurrent write is never lost: it happens
either before the copy (and is copied) or after the install (and lands in the
new chunk). A backend opened on the volume meanwhile (a first export, or a
client reconnecting) was not quiesced: then the window is not installed
(``pool.backends_opened`` counts them). Old chunks are freed by ``map`` and
stay quarantined until the commit is durable and every read begun before it
has ended. The copy reads the
window's moved chunks into one buffer laid out in target order (one read per
run contiguous at both ends, all in flight at once, straight on the engine's
callbacks), then writes each target run with one write.

Costs: one lookup per window for the plan and one for the install, one
``write_target`` per mapped chunk and one more per moved chunk, one ``map`` per
moved chunk; a free-run search only when the tail runs out (searching per
segment rescanned the same refcount pages, and their claimed and quarantined
chunks, for every segment: the cost grew with the square of the volume); the
copy moves each misplaced chunk once; it needs as much free space as one
window. ``start`` and ``limit`` let a caller (the CLI, through a running
server's control socket) run it in slices and show progress between them.

A design whose layout is fixed (:meth:`BlockMap.can_relocate` False: a thick
LVM origin) is left alone. Moved chunks take the volume as their owner (``map``
records the writer), so ``qemu:allocation-depth`` reports them at depth 1
afterwards: they were the volume's own already, but may have been written by a
since-deleted ancestor.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from nbdserver.blockmap.base import HOLE, Claim, InPlace
from nbdserver.errors import NbdError, UserError
from nbdserver.pool.format import VolumeRecord
from nbdserver.pool.pool import Pool
from nbdserver.storage.buffers import AlignedBuffer

WINDOW_BYTES = 8 << 20  # logical bytes planned, copied and installed per step
SCAN_CHUNKS = 1 << 16  # logical chunks looked at at once when skipping holes
CANDIDATES = 3  # placements of existing pieces tried per segment
SEARCH_PAGES = 1024  # refcount pages searched for a fresh free run (1020 chunks each)
MIN_PIECE = 64  # chunks: a segment is split over free runs no shorter than this
COPY_BYTES = 8 << 20  # the most one copy batch buffers
INSTALL_PAGES_PER_MOVE = 8  # pages one installed move may change (a map page, a split, refcounts)
GIB = 1 << 30

Progress = Callable[[int, int, int], None]  # (bytes scanned, bytes in all, bytes moved)


@dataclass
class _Plan:
    moves: list[tuple[int, int, int]] = field(default_factory=list)  # (lc, from, to)
    shared: int = 0  # mapped chunks left alone because others reference them
    no_space: int = 0  # own chunks that could not be placed for lack of free space
    tail: tuple[int, int] | None = None  # (start, length): the unused end of a fresh run


def _runs(units: list[int]) -> list[tuple[int, int, int]]:
    """(first unit, first index, count) of each run of consecutive units in `units`."""
    out: list[tuple[int, int, int]] = []
    for i, unit in enumerate(units):
        if out and out[-1][0] + out[-1][2] == unit:
            first, at, n = out[-1]
            out[-1] = (first, at, n + 1)
        else:
            out.append((unit, i, 1))
    return out


def _summary(pool: Pool, vol: VolumeRecord, extents: int, mapped: int,
             exclusive: int) -> dict[str, Any]:
    gib = vol.size / GIB
    return {
        "extents": extents,
        "extents_per_gib": round(extents / gib, 3) if gib else 0.0,
        "mapped_bytes": mapped * pool.chunk_size,
        "exclusive_bytes": exclusive * pool.chunk_size,
    }


async def volume_summary(pool: Pool, vol: VolumeRecord) -> dict[str, Any]:
    stats = await pool.volume_stats(vol)
    return _summary(pool, vol, stats.extents, stats.mapped_chunks, stats.exclusive_chunks)


async def defrag_volume(pool: Pool, name: str, *, start: int = 0, limit: int | None = None,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Defragment volume `name` from byte `start` (rounded down to a chunk) over at least
    `limit` bytes (all by default). See the module note; returns a JSON-able report, with
    ``before`` when `start` is 0, ``after`` when the end was reached, and ``next``, the
    byte offset to resume from (None when done)."""
    vol = pool.volume(name)
    chunk = pool.chunk_size
    return await Defrag(pool, vol, progress).run(
        start // chunk, None if limit is None else max(1, -(-limit // chunk)))


class Defrag:
    """One defragmentation of one volume; see the module note."""

    def __init__(self, pool: Pool, vol: VolumeRecord, progress: Progress | None = None) -> None:
        self.pool = pool
        self.vol = vol
        self.map = pool.map
        self.data = pool.data
        self.chunk = pool.chunk_size
        self.chunks = -(-vol.size // self.chunk)
        self.window = max(1, WINDOW_BYTES // self.chunk)
        self.progress = progress
        self.moved = 0
        self.shared = 0
        self.no_space = 0
        self.tail: tuple[int, int] | None = None  # carried from window to window

    async def run(self, start: int, limit: int | None) -> dict[str, Any]:
        """Defragment logical chunks [start, start + limit)."""
        if not 0 <= start <= self.chunks:
            raise UserError(f"defrag start {start * self.chunk} is outside volume "
                            f"{self.vol.name!r} ({self.vol.size} bytes)")
        began = time.monotonic()
        end = self.chunks if limit is None else min(self.chunks, start + limit)
        report: dict[str, Any] = {"name": self.vol.name, "size": self.vol.size}
        if start == 0:
            report["before"] = await volume_summary(self.pool, self.vol)
        pos = start if self.map.can_relocate(self.vol) else end  # a fixed layout: nothing to do
        while pos < end:
            pos = await self._skip_holes(pos, end)
            if pos >= end:
                break
            stop = min(end, pos + self.window)
            await self._window(pos, stop)
            pos = stop
            self._report(pos)
        finished = end >= self.chunks
        self._report(end)
        report.update({
            "next": None if finished else end * self.chunk,
            "done": finished,
            "scanned_bytes": min(self.vol.size, end * self.chunk) - start * self.chunk,
            "moved_bytes": self.moved * self.chunk,
            "shared_bytes": self.shared * self.chunk,
            "no_space_bytes": self.no_space * self.chunk,
            "seconds": round(time.monotonic() - began, 3),
        })
        if finished:
            report["after"] = await volume_summary(self.pool, self.vol)
        return report

    def _report(self, pos: int) -> None:
        if self.progress is not None:
            self.progress(min(pos * self.chunk, self.vol.size), self.vol.size,
                          self.moved * self.chunk)

    async def _skip_holes(self, pos: int, end: int) -> int:
        """The first mapped chunk at or after `pos` (or `end`). Looks at one window first,
        then at twice as much each time up to ``SCAN_CHUNKS``: a long look-up of a mapped,
        fragmented stretch would list every run in it only to use the first."""
        n = self.window
        while pos < end:
            n = min(n, SCAN_CHUNKS, end - pos)
            runs = await self.pool.cache.run(partial(self.map.lookup, self.vol, pos, n))
            for run in runs:
                if run.pc != HOLE:
                    return max(pos, run.lc)
            pos += n
            n *= 2
            self._report(pos)
        return end

    # -- one window ---------------------------------------------------------------------------

    async def _window(self, lo: int, hi: int) -> None:
        pool = self.pool
        while True:
            await pool.space_waiters.zero()  # writes that found no free space go first
            plan = await pool.cache.run(lambda: self._plan(lo, hi))
            if not pool.space_waiters.count:
                break
            # A write began waiting for space while the plan loaded pages: it goes first.
            for _, _, dst in plan.moves:
                self.data.unclaim(dst)
        self.tail = plan.tail
        self.shared += plan.shared
        self.no_space += plan.no_space
        if not plan.moves:
            return
        installed: set[int] = set()
        vid = self.vol.id
        opened = pool.backends_opened.get(vid, 0)
        pool.defrag_claims.add(len(plan.moves))
        try:
            quiesce = pool.quiesce.get(vid)
            resume = await quiesce() if quiesce is not None else None
            try:
                epoch = pool.epochs.begin_write()
                try:
                    await self._copy(plan.moves)
                    # A backend opened meanwhile (a new export or connection) is not
                    # paused: its writes in place may be newer than the copies. Then
                    # the window is left as it is.
                    step = max(1, pool.record_room() // INSTALL_PAGES_PER_MOVE)
                    for i in range(0, len(plan.moves), step):
                        if pool.backends_opened.get(vid, 0) != opened:
                            break
                        part = plan.moves[i:i + step]
                        installed |= await pool.run(partial(self._install, part))
                finally:
                    pool.epochs.end_write(epoch)
            finally:
                if resume is not None:
                    resume()
        finally:
            for _, _, dst in plan.moves:
                if dst not in installed:
                    self.data.unclaim(dst)
            pool.defrag_claims.add(-len(plan.moves))
        self.moved += len(installed)
        await pool.commit()  # frees the old chunks for the next windows to fill

    def _plan(self, lo: int, hi: int) -> _Plan:
        """Choose targets for the window's own chunks and claim them (a mini-transaction)."""
        plan = _Plan(tail=self.tail)  # a retry (PageMiss) starts again from self.tail
        where: dict[int, int] = {}  # lc -> pc of every own mapped chunk
        mapped: dict[int, int] = {}  # lc -> pc of every mapped chunk, own or shared
        write_target = self.map.write_target
        vol = self.vol
        for run in self.map.lookup(vol, lo, hi - lo):
            if run.pc == HOLE:
                continue
            for k in range(run.count):
                lc = run.lc + k
                mapped[lc] = run.pc + k
                if isinstance(write_target(vol, lc), InPlace | Claim):
                    where[lc] = run.pc + k
                else:
                    plan.shared += 1
        lc = lo
        while lc < hi:
            if lc not in where:
                lc += 1
                continue
            first = lc
            while lc < hi and lc in where:
                lc += 1
            self._place(first, lc, where, mapped, lo, hi, plan)
        return plan

    def _place(self, a: int, b: int, where: dict[int, int], mapped: dict[int, int],
               lo: int, hi: int, plan: _Plan) -> None:
        """Choose where the segment [a, b) goes, and claim the targets of what moves."""
        pcs = [where[lc] for lc in range(a, b)]
        candidates: list[int] = []
        if a > 0:
            before = mapped.get(a - 1, HOLE) if a > lo else \
                self.map.lookup(self.vol, a - 1, 1)[0].pc  # the window's look-up began at a
            if before != HOLE:
                candidates.append(before + 1)
        in_place: dict[int, int] = {}
        for i, pc in enumerate(pcs):
            in_place[pc - i] = in_place.get(pc - i, 0) + 1
        candidates += sorted(in_place, key=lambda base: -in_place[base])[:CANDIDATES]
        for base in candidates:
            if self._fits(base, pcs):
                self._claim(a, base, pcs, plan)
                return
        # Fresh free runs: go on in the one the last fresh placement took from (its tail)
        # while it is still free; else search, from there, for room for the rest of the
        # window and the next one, else the longest runs nearby, as long as each piece is
        # worth having. One search serves many segments: searching per segment would
        # rescan the same pages (and their claimed and quarantined chunks) each time.
        tail = plan.tail
        near = tail[0] if tail is not None else candidates[0] if candidates else pcs[0]
        pos = 0
        while pos < len(pcs):
            rest = len(pcs) - pos
            tail = plan.tail
            if tail is not None and tail[1] >= rest and self._free(tail[0], rest):
                self._claim(a + pos, tail[0], pcs[pos:], plan)
                plan.tail = (tail[0] + rest, tail[1] - rest) if tail[1] > rest else None
                return
            want = rest + (hi - b) + self.window
            run = self.data.find_free_run(min(max(near, 0), self.data.count - 1), want,
                                          SEARCH_PAGES)
            take = 0 if run is None else min(run[1], rest)
            if run is None or (take < rest and take < MIN_PIECE):
                plan.no_space += rest  # nothing better than what is there
                return
            self._claim(a + pos, run[0], pcs[pos:pos + take], plan)
            plan.tail = (run[0] + take, run[1] - take) if run[1] > take else None
            near = run[0] + take
            pos += take

    def _fits(self, base: int, pcs: list[int]) -> bool:
        """Whether chunk i of the segment can be at base + i for all i: each is there
        already or that chunk is free."""
        if base < 0 or base + len(pcs) > self.data.count:
            return False
        counts = self.data.get_run(base, len(pcs))
        claimed, quarantine = self.data.claimed, self.data.quarantine
        for i, pc in enumerate(pcs):
            unit = base + i
            if pc != unit and (counts[i] or unit in claimed or unit in quarantine):
                return False
        return True

    def _free(self, base: int, n: int) -> bool:
        """Whether chunks [base, base + n) are all free and usable."""
        if base < 0 or base + n > self.data.count or any(self.data.get_run(base, n)):
            return False
        claimed, quarantine = self.data.claimed, self.data.quarantine
        return not any(u in claimed or u in quarantine for u in range(base, base + n))

    def _claim(self, a: int, base: int, pcs: list[int], plan: _Plan) -> None:
        moves = [(a + i, pc, base + i) for i, pc in enumerate(pcs) if pc != base + i]
        if self.pool.available_chunks() < len(moves):
            plan.no_space += len(moves)
            return
        for lc, src, dst in moves:
            got = self.data.claim(dst)
            if got != dst:  # cannot happen: _fits and find_free_run saw it free
                raise NbdError(errno.EIO, f"defrag: chunk {dst} was not free ({got})")
            plan.moves.append((lc, src, dst))

    async def _copy(self, moves: list[tuple[int, int, int]]) -> None:
        """Copy each moved chunk, in batches of at most ``COPY_BYTES``: each batch is read
        into one buffer laid out in target order (one read per run contiguous at both
        ends, all in flight at once), then written with one write per target run."""
        order = sorted(moves, key=lambda m: m[2])
        per = max(1, COPY_BYTES // self.chunk)
        await asyncio.gather(*(self._copy_batch(order[i:i + per])
                               for i in range(0, len(order), per)))

    async def _copy_batch(self, batch: list[tuple[int, int, int]]) -> None:
        pool = self.pool
        reads = _runs([src for _, src, _ in batch])
        writes = _runs([dst for _, _, dst in batch])
        buf = pool.buffers.get(len(batch) * self.chunk)
        done = False
        try:
            for pieces, write in ((reads, False), (writes, True)):
                failed = await self._io(buf, pieces, write)
                if failed:
                    (unit, _, n), res = failed[0]
                    err = -res if res < 0 else errno.EIO  # (a short transfer: EIO)
                    raise NbdError(err, f"defrag: {'writing' if write else 'reading'} "
                                        f"chunks {unit}+{n} failed: {os.strerror(err)}")
            done = True
        finally:
            if done:
                pool.buffers.put(buf)
            # else: a transfer may still be in flight (cancelled); its completion holds buf

    def _io(self, buf: AlignedBuffer, pieces: list[tuple[int, int, int]],
            write: bool) -> asyncio.Future[list[tuple[tuple[int, int, int], int]]]:
        """Start a transfer of each (first chunk, first chunk of `buf`, chunks) between the
        device and `buf`; the future gets the pieces that failed, each with its result
        (bytes or -errno), once all have ended."""
        pool = self.pool
        engine = pool.engine
        fd = pool.device.fd
        chunk = self.chunk
        base = pool.layout.data_start
        fut: asyncio.Future[list[tuple[tuple[int, int, int], int]]] = \
            asyncio.get_running_loop().create_future()
        failed: list[tuple[tuple[int, int, int], int]] = []  # (piece, result)
        left = len(pieces)

        def ended(piece: tuple[int, int, int], res: int, buf: AlignedBuffer = buf) -> None:
            nonlocal left
            if res != piece[2] * chunk:
                failed.append((piece, res))
            left -= 1
            if not left and not fut.done():
                fut.set_result(failed)

        if not pieces:
            fut.set_result(failed)
        start = engine.write if write else engine.read
        for piece in pieces:
            unit, i, n = piece
            start(fd, buf, i * chunk, n * chunk, base + unit * chunk, partial(ended, piece))
        engine.kick()
        return fut

    def _install(self, moves: list[tuple[int, int, int]]) -> set[int]:
        """Point each logical chunk at its copy, if it still maps the chunk copied and is
        still the volume's own (a mini-transaction). Returns the chunks installed. One
        look-up of their range first: mapping one chunk changes no other's mapping.
        A window is installed a part at a time (``INSTALL_PAGES_PER_MOVE``): each move
        changes a map page (extent's may split one) and two refcount pages, and a
        window's moves, from chunks scattered over the pool, could otherwise dirty
        more pages than a journal record holds (the pool then fails)."""
        lo = min(m[0] for m in moves)
        hi = max(m[0] for m in moves) + 1
        now: dict[int, int] = {}
        for run in self.map.lookup(self.vol, lo, hi - lo):
            if run.pc != HOLE:
                for k in range(run.count):
                    now[run.lc + k] = run.pc + k
        installed: set[int] = set()
        for lc, src, dst in moves:
            if now.get(lc, HOLE) != src:
                continue
            if not isinstance(self.map.write_target(self.vol, lc), InPlace | Claim):
                continue
            self.map.map(self.vol, lc, dst)
            installed.add(dst)
        return installed
