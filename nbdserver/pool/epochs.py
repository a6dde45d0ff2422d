"""I/O epochs: work that must wait for the data I/O begun before it runs only once that ends.

A read looks a chunk up and then reads it; a write looks it up and then writes
it. If, in between, a trim or a copy-on-write frees that chunk and the commit
that frees it completes, the chunk could be handed to another volume while the
old I/O is still in flight: the reader would see, or the writer would clobber,
another volume's data. So every data transfer runs inside an epoch, and
:meth:`IoEpochs.defer` runs its callback only once every transfer that began
before it has ended.

A second kind of wait concerns reads only: a volume that takes sole ownership
of a chunk another volume shared (a claim) writes it in place, so it first waits
for the reads begun before (:meth:`IoEpochs.defer_after_reads`), not for every
write in flight. Reads and writes are therefore counted apart, in one tracker:
a transfer costs one counter update when it begins and one when it ends
(``begin_read``/``end_read``, ``begin_write``/``end_write``), whichever waits
may follow. Writes here mean every transfer that is not a client read (copies
made by defrag, zeroing).

An epoch is an object holding its two counts, handed to the transfer when it
begins and back when it ends: beginning or ending is one attribute update, and
only an epoch that has been closed (by a wait) and whose last transfer just
ended looks at the waits. Closed epochs with transfers still going are kept,
oldest first, until they have none.

The volume's one-chunk read and in-place write paths (most 4 KiB requests)
count inline, saving two calls per request: ``epoch = epochs.current; epoch.writes
+= 1`` to begin, and to end ``epoch.writes -= 1`` then, if that was its last
transfer and a wait has closed it (``epoch.closed_by`` is then the tracker),
``epoch.closed_by.retire()``, exactly what ``begin_write``/``end_write`` do.
"""

from __future__ import annotations

from collections.abc import Callable


class Epoch:
    """The transfers begun in one epoch and not yet ended."""

    __slots__ = ("closed_by", "number", "reads", "writes")

    def __init__(self, number: int) -> None:
        self.number = number
        self.reads = 0
        self.writes = 0
        # The tracker, once a wait has closed this epoch: the transfer that ends its last
        # transfer then tells it (IoEpochs.retire). None while the epoch is current.
        self.closed_by: IoEpochs | None = None


class IoEpochs:
    """Counts reads and writes per epoch; see the module note."""

    def __init__(self) -> None:
        self.current = Epoch(0)
        self._closed: list[Epoch] = []  # closed, with transfers still going; oldest first
        self._deferred: list[tuple[int, bool, Callable[[], None]]] = []  # (epoch, reads only, fn)

    def begin_read(self) -> Epoch:
        epoch = self.current
        epoch.reads += 1
        return epoch

    def end_read(self, epoch: Epoch) -> None:
        epoch.reads -= 1
        if not epoch.reads and epoch.closed_by is not None:
            self.retire()

    def begin_write(self) -> Epoch:
        epoch = self.current
        epoch.writes += 1
        return epoch

    def end_write(self, epoch: Epoch) -> None:
        epoch.writes -= 1
        if not epoch.writes and epoch.closed_by is not None:
            self.retire()

    def defer(self, fn: Callable[[], None]) -> None:
        """Run `fn` once every transfer begun so far has ended (at once if none is active)."""
        self._defer(fn, False)

    def defer_after_reads(self, fn: Callable[[], None]) -> None:
        """Run `fn` once every read begun so far has ended (writes are not waited for)."""
        self._defer(fn, True)

    def _defer(self, fn: Callable[[], None], reads_only: bool) -> None:
        closed = self.current
        closed.closed_by = self
        self.current = Epoch(closed.number + 1)
        if closed.reads or closed.writes:
            self._closed.append(closed)
        self._deferred.append((closed.number, reads_only, fn))
        self.retire()

    def retire(self) -> None:
        """Forget closed epochs with no transfer left and run the waits they held up
        (called when a closed epoch's last transfer ends)."""
        closed = self._closed = [e for e in self._closed if e.reads or e.writes]
        now = self.current.number
        reads = next((e.number for e in closed if e.reads), now)  # the oldest still reading
        every = closed[0].number if closed else now
        ready = [fn for e, reads_only, fn in self._deferred if e < (reads if reads_only else every)]
        if ready:
            self._deferred = [(e, reads_only, fn) for e, reads_only, fn in self._deferred
                              if e >= (reads if reads_only else every)]
            for fn in ready:
                fn()

    @property
    def in_flight(self) -> int:
        return sum(e.reads + e.writes for e in (*self._closed, self.current))

    @property
    def reads_in_flight(self) -> int:
        return sum(e.reads for e in (*self._closed, self.current))
