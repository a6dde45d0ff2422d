"""What every volume may read back after a crash: the crash tests' model of the bytes.

Each volume has a *base* (its bytes when they were last read back and
checked, so certain) and the *events* sent to it since, in the order they
were sent: writes of seeded random bytes, and zeroing (TRIM, WRITE_ZEROES).
The workload never has two overlapping requests in flight on one volume, so
for overlapping events send order is completion order.

An event is *durable* once the server promised it: a FUA write when its reply
came, any other acknowledged event when a FLUSH sent after its reply had
arrived was answered. After a crash, each byte may hold the value of the last
durable event covering it (or the base if none), or of any later event
covering it, acknowledged or still in flight. Nothing else: not an older
value, not a third one, not another volume's bytes. That is checked per
*piece*: a range where the list of allowed events is the same, cut at 512-byte
sectors (the server writes whole device blocks, and a process crash does not
tear one), must equal one allowed value as a whole.

A snapshot or fork gets a model of its own when it is made: the source's
acknowledged content as its base (a volume operation quiesces and commits the
source, so all of it is in the copy), plus the source's requests in flight
meanwhile as "maybe" events.

After a successful check the bytes read back become the new base
(:meth:`VolumeModel.resolve`): from then on they must stay.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field, replace

SECTOR = 512
MAX_REPORTED = 4  # mismatching ranges reported per volume


@dataclass(eq=False)
class Event:
    """One request that changes a volume: `seed` None means it writes zeros."""

    eid: int
    volume: str
    kind: str  # "write", "trim" or "zero"
    offset: int
    length: int
    seed: int | None = None
    fua: bool = False
    acked: bool = False
    durable: bool = False
    data_cache: bytes | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.offset + self.length

    def data(self) -> bytes:
        if self.data_cache is None:
            self.data_cache = (bytes(self.length) if self.seed is None
                               else random.Random(self.seed).randbytes(self.length))
        return self.data_cache

    def bytes_at(self, start: int, end: int) -> bytes:
        if self.seed is None:
            return bytes(end - start)
        return self.data()[start - self.offset:end - self.offset]

    def describe(self) -> str:
        state = "durable" if self.durable else "acknowledged" if self.acked else "in flight"
        fua = " FUA" if self.fua else ""
        return (f"{self.kind}{fua} #{self.eid} to {self.volume!r} "
                f"[{self.offset}, {self.end}) ({state})")


#: An allowed value of a range: an event, or None for the volume's base.
Candidate = Event | None


@dataclass
class Mismatch:
    """Bytes [start, end) of a volume read back as none of the allowed values."""

    volume: str
    start: int
    end: int
    allowed: list[Candidate]
    actual: bytes
    expected: list[bytes]  # the allowed values of the range, oldest first

    history: list[Event] = field(default_factory=list)  # events over the range, in order

    def describe(self, origin: str = "") -> str:
        def show(b: bytes) -> str:
            if not any(b):
                return f"zeros ({len(b)} bytes)"
            return b[:16].hex() + ("..." if len(b) > 16 else "")

        lines = [f"volume {self.volume!r} bytes [{self.start}, {self.end}): "
                 f"read {show(self.actual)}{' = ' + origin if origin else ''}", "  allowed:"]
        for cand, exp in zip(self.allowed, self.expected, strict=True):
            what = "its content at the last check" if cand is None else cand.describe()
            lines.append(f"    {show(exp)}  {what}")
        for i, (a, b) in enumerate(zip(self.actual, self.expected[-1], strict=False)):
            if a != b:
                lines.append(f"  first byte differing from the newest value: offset "
                             f"{self.start + i}")
                break
        if self.history:
            lines.append("  every request over these bytes since the last check, oldest first:")
            lines.extend(f"    {ev.describe()}" for ev in self.history[-12:])
        return "\n".join(lines)


class VolumeModel:
    """The bytes of one volume: see the module note."""

    def __init__(self, name: str, size: int, base: bytearray | None = None, *,
                 snapshot: bool = False, parent: str | None = None) -> None:
        self.name = name
        self.size = size
        self.snapshot = snapshot
        self.parent = parent
        self.base = base if base is not None else bytearray(size)
        assert len(self.base) == size
        self.current = bytearray(self.base)  # every acknowledged event applied
        self.events: list[Event] = []
        self.unflushed: list[Event] = []  # acknowledged, not durable yet
        # A crash happened since the base was checked, or this is a copy made while its
        # source had requests in flight: events not durable may or may not be there.
        self.uncertain = False

    # -- the workload tells the model ------------------------------------------------------

    def sent(self, ev: Event) -> None:
        self.events.append(ev)

    def acked(self, ev: Event) -> None:
        ev.acked = True
        self.current[ev.offset:ev.end] = ev.bytes_at(ev.offset, ev.end)
        if ev.fua:
            ev.durable = True
        else:
            self.unflushed.append(ev)

    def flush_sent(self) -> list[Event]:
        """What a FLUSH sent now covers (returned to :meth:`flush_acked`)."""
        return list(self.unflushed)

    def flush_acked(self, covered: list[Event]) -> None:
        for ev in covered:
            ev.durable = True
        self.unflushed = [ev for ev in self.unflushed if not ev.durable]

    def all_durable(self) -> None:
        """A clean shutdown: every event acknowledged since the last crash is on disk."""
        self.flush_acked(self.unflushed)

    def crashed(self) -> None:
        """The server was killed: events not durable by now may or may not be there, and
        stay so (no later FLUSH or clean stop covers what a crash may have lost)."""
        self.uncertain = self.uncertain or bool(self.events)
        self.unflushed = []

    def clone(self, name: str, *, snapshot: bool, written: bool,
              maybe: list[Event]) -> VolumeModel:
        """The model of a snapshot or fork of this volume made now.

        `written`: this volume takes writes in this run, so its acknowledged
        content is the copy's base and `maybe` (its requests in flight during
        the operation) may or may not be in the copy. Otherwise the copy has
        exactly this volume's uncertainty.
        """
        if written:
            new = VolumeModel(name, self.size, bytearray(self.current), snapshot=snapshot,
                              parent=self.name)
            assert not self.uncertain, "a volume written in this run was checked first"
            new.events = [replace(ev, volume=name, durable=False) for ev in maybe]
            new.uncertain = bool(maybe)
        else:
            new = VolumeModel(name, self.size, bytearray(self.base), snapshot=snapshot,
                              parent=self.name)
            new.events = [replace(ev, volume=name) for ev in self.events]
            new.uncertain = self.uncertain
        return new

    # -- checking ------------------------------------------------------------------------

    def segments(self) -> list[tuple[int, int, list[Candidate]]]:
        """(start, end, allowed values oldest first) covering the volume."""
        starts = [0]
        allowed: list[list[Candidate]] = [[None]]

        def split(at: int) -> int:
            i = bisect.bisect_right(starts, at) - 1
            if starts[i] != at:
                starts.insert(i + 1, at)
                allowed.insert(i + 1, list(allowed[i]))
                i += 1
            return i

        for ev in self.events:
            if not self.uncertain and not ev.acked:
                continue
            first = split(ev.offset)
            last = split(ev.end) if ev.end < self.size else len(starts)
            for i in range(first, last):
                if ev.durable:
                    allowed[i] = [ev]
                elif self.uncertain:
                    allowed[i] = [*allowed[i], ev]
                else:
                    allowed[i] = [ev]  # no crash: exactly the newest acknowledged value
        ends = [*starts[1:], self.size]
        return [(s, e, a) for s, e, a in zip(starts, ends, allowed, strict=True)]

    def expected(self, cand: Candidate, start: int, end: int) -> bytes:
        return bytes(self.base[start:end]) if cand is None else cand.bytes_at(start, end)

    def check(self, actual: bytes) -> list[Mismatch]:
        """Mismatches of `actual` (the whole volume read back); [] when it is allowed."""
        if len(actual) != self.size:
            raise ValueError(f"{self.name}: read {len(actual)} bytes of {self.size}")
        view = memoryview(actual)
        out: list[Mismatch] = []
        for start, end, allowed in self.segments():
            got = view[start:end]
            if any(self.expected(c, start, end) == got for c in reversed(allowed)):
                continue
            bad_start = None
            pos = start
            while pos < end:
                stop = min(end, (pos // SECTOR + 1) * SECTOR)
                piece = view[pos:stop]
                ok = any(self.expected(c, pos, stop) == piece for c in allowed)
                if not ok and bad_start is None:
                    bad_start = pos
                if (ok or stop == end) and bad_start is not None:
                    bad_end = stop if not ok else pos
                    out.append(Mismatch(
                        self.name, bad_start, bad_end, list(allowed),
                        bytes(view[bad_start:bad_end]),
                        [self.expected(c, bad_start, bad_end) for c in allowed],
                        [ev for ev in self.events if ev.offset < bad_end and ev.end > bad_start]))
                    bad_start = None
                    if len(out) >= MAX_REPORTED:
                        return out
                pos = stop
        return out

    def resolve(self, actual: bytes) -> None:
        """`actual` passed :meth:`check`: it is the new, certain base."""
        self.base = bytearray(actual)
        self.current = bytearray(actual)
        self.events = []
        self.unflushed = []
        self.uncertain = False

    def drop_data(self) -> None:
        """Free the cached bytes of events (they can be regenerated from their seeds)."""
        for ev in self.events:
            ev.data_cache = None


def find_origin(actual: bytes, models: list[VolumeModel]) -> str:
    """Where bytes that matched no allowed value came from, if anywhere known."""
    if not any(actual):
        return "zeros"
    needle = actual[:64]
    for m in models:
        for ev in reversed(m.events):
            if ev.seed is None:
                continue
            at = ev.data().find(needle)
            if at >= 0:
                return f"bytes of {ev.describe()} at its offset {ev.offset + at}"
    for m in models:
        at = m.base.find(needle)
        if at >= 0:
            return f"bytes of volume {m.name!r} as last checked, offset {at}"
    return "bytes from nowhere the test wrote"
