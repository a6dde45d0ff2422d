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
"""

from __future__ import annotations

from collections.abc import Callable


class IoEpochs:
    """Counts reads and writes per epoch; see the module note."""

    def __init__(self) -> None:
        self.epoch = 0
        self._reads: dict[int, int] = {0: 0}  # epoch -> reads begun in it, still going
        self._writes: dict[int, int] = {0: 0}
        self._deferred: list[tuple[int, bool, Callable[[], None]]] = []  # (epoch, reads only, fn)

    def begin_read(self) -> int:
        epoch = self.epoch
        self._reads[epoch] += 1
        return epoch

    def end_read(self, epoch: int) -> None:
        left = self._reads[epoch] - 1
        self._reads[epoch] = left
        if left == 0 and epoch != self.epoch:
            del self._reads[epoch]
            self._run()

    def begin_write(self) -> int:
        epoch = self.epoch
        self._writes[epoch] += 1
        return epoch

    def end_write(self, epoch: int) -> None:
        left = self._writes[epoch] - 1
        self._writes[epoch] = left
        if left == 0 and epoch != self.epoch:
            del self._writes[epoch]
            self._run()

    def defer(self, fn: Callable[[], None]) -> None:
        """Run `fn` once every transfer begun so far has ended (at once if none is active)."""
        self._defer(fn, False)

    def defer_after_reads(self, fn: Callable[[], None]) -> None:
        """Run `fn` once every read begun so far has ended (writes are not waited for)."""
        self._defer(fn, True)

    def _defer(self, fn: Callable[[], None], reads_only: bool) -> None:
        epoch = self.epoch
        self.epoch += 1
        for counts in (self._reads, self._writes):
            counts[self.epoch] = 0
            if counts.get(epoch) == 0:
                del counts[epoch]
        self._deferred.append((epoch, reads_only, fn))
        self._run()

    def _run(self) -> None:
        reads = min((e for e, n in self._reads.items() if n), default=self.epoch)
        writes = min((e for e, n in self._writes.items() if n), default=self.epoch)
        every = min(reads, writes)
        ready = [fn for e, reads_only, fn in self._deferred if e < (reads if reads_only else every)]
        if ready:
            self._deferred = [(e, reads_only, fn) for e, reads_only, fn in self._deferred
                              if e >= (reads if reads_only else every)]
            for fn in ready:
                fn()

    @property
    def in_flight(self) -> int:
        return sum(self._reads.values()) + sum(self._writes.values())

    @property
    def reads_in_flight(self) -> int:
        return sum(self._reads.values())
