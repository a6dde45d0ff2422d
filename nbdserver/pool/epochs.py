"""I/O epochs: a freed chunk is reused only after the data I/O that might touch it has ended.

A read looks a chunk up and then reads it; a write looks it up and then writes
it. If, in between, a trim or a copy-on-write frees that chunk and the commit
that frees it completes, the chunk could be handed to another volume while the
old I/O is still in flight: the reader would see, or the writer would clobber,
another volume's data. So every data transfer runs inside an epoch
(:meth:`begin`/:meth:`end`), and :meth:`defer` runs its callback only once every
transfer that began before it has ended. The cost on the hot path is two dict
updates per request.
"""

from __future__ import annotations

from collections.abc import Callable


class IoEpochs:
    """Counts transfers per epoch; see the module note."""

    def __init__(self) -> None:
        self.epoch = 0
        self._active: dict[int, int] = {0: 0}
        self._deferred: list[tuple[int, Callable[[], None]]] = []

    def begin(self) -> int:
        epoch = self.epoch
        self._active[epoch] += 1
        return epoch

    def end(self, epoch: int) -> None:
        left = self._active[epoch] - 1
        self._active[epoch] = left
        if left == 0 and epoch != self.epoch:
            del self._active[epoch]
            self._run()

    def defer(self, fn: Callable[[], None]) -> None:
        """Run `fn` once every transfer begun so far has ended (at once if none is active)."""
        epoch = self.epoch
        self.epoch += 1
        self._active[self.epoch] = 0
        if self._active.get(epoch) == 0:
            del self._active[epoch]
        self._deferred.append((epoch, fn))
        self._run()

    def _run(self) -> None:
        oldest = min((e for e, n in self._active.items() if n), default=self.epoch)
        ready = [fn for e, fn in self._deferred if e < oldest]
        if ready:
            self._deferred = [(e, fn) for e, fn in self._deferred if e >= oldest]
            for fn in ready:
                fn()

    @property
    def in_flight(self) -> int:
        return sum(self._active.values())
