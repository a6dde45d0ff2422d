"""The crash checker itself: it must reject every outcome a crash may not produce.

A checker that accepts everything would make the kill -9 campaign pass for
any server, so each rule of :mod:`crashmodel` is shown rejecting a read-back
that breaks it (and accepting the ones that keep it).
"""

from __future__ import annotations

import itertools

from crashmodel import SECTOR, Event, VolumeModel, find_origin

SIZE = 64 * 1024
ids = itertools.count(1)


def write(m: VolumeModel, offset: int, length: int, *, fua: bool = False,
          acked: bool = True) -> Event:
    ev = Event(next(ids), m.name, "write", offset, length, seed=next(ids), fua=fua)
    m.sent(ev)
    if acked:
        m.acked(ev)
    return ev


def image(m: VolumeModel, *events: Event) -> bytearray:
    """The base with `events` applied in order (one possible read-back)."""
    out = bytearray(m.base)
    for ev in events:
        out[ev.offset:ev.end] = ev.bytes_at(ev.offset, ev.end)
    return out


def crashed(m: VolumeModel) -> VolumeModel:
    m.crashed()
    m.uncertain = True  # also for a model with no events yet
    return m


def test_a_flushed_write_must_survive() -> None:
    m = VolumeModel("v", SIZE)
    a = write(m, 1000, 5000)
    m.flush_acked(m.flush_sent())
    crashed(m)
    assert m.check(bytes(image(m, a))) == []
    bad = m.check(bytes(SIZE))
    assert bad and bad[0].start == 1000 and bad[0].end == 6000
    assert "durable" in bad[0].describe()


def test_an_unflushed_write_may_be_old_or_new_but_nothing_else() -> None:
    m = VolumeModel("v", SIZE, bytearray(b"\x11" * SIZE))
    a = write(m, 4096, 8192)
    crashed(m)
    assert m.check(bytes(image(m, a))) == []
    assert m.check(bytes(m.base)) == []
    third = image(m, a)
    third[5000:5001] = b"\x99"
    bad = m.check(bytes(third))
    assert [(b.start, b.end) for b in bad] == [(4608, 5120)]  # the sector holding it


def test_a_write_in_flight_at_the_crash_may_be_either() -> None:
    m = VolumeModel("v", SIZE)
    a = write(m, 0, 4096, acked=False)
    crashed(m)
    assert m.check(bytes(image(m, a))) == []
    assert m.check(bytes(SIZE)) == []


def test_fua_makes_only_its_own_range_durable() -> None:
    m = VolumeModel("v", SIZE)
    other = write(m, 0, 4096)
    fua = write(m, 8192, 4096, fua=True)
    crashed(m)
    assert m.check(bytes(image(m, fua))) == []  # the other write may be lost
    assert m.check(bytes(image(m, other))) != []  # the FUA one may not
    assert fua.durable and not other.durable


def test_a_flush_covers_only_writes_answered_before_it_was_sent() -> None:
    m = VolumeModel("v", SIZE)
    early = write(m, 0, 4096)
    covered = m.flush_sent()
    late = write(m, 8192, 4096)  # answered while the flush was in flight
    m.flush_acked(covered)
    crashed(m)
    assert early.durable and not late.durable
    assert m.check(bytes(image(m, early))) == []
    assert m.check(bytes(image(m, late))) != []


def test_an_older_value_under_a_durable_one_is_not_allowed() -> None:
    m = VolumeModel("v", SIZE)
    first = write(m, 0, 8192)
    m.flush_acked(m.flush_sent())
    second = write(m, 0, 8192, fua=True)
    third = write(m, 0, 8192)
    crashed(m)
    assert m.check(bytes(image(m, first, second))) == []
    assert m.check(bytes(image(m, first, second, third))) == []
    assert m.check(bytes(image(m, first))) != []


def test_a_sector_torn_between_two_values_is_rejected() -> None:
    m = VolumeModel("v", SIZE)
    a = write(m, 0, 2 * SECTOR)
    crashed(m)
    mixed = image(m, a)
    mixed[SECTOR:2 * SECTOR] = bytes(SECTOR)  # whole sectors of old and new: allowed
    assert m.check(bytes(mixed)) == []
    mixed[SECTOR // 2:SECTOR] = bytes(SECTOR // 2)  # half a sector old: torn
    bad = m.check(bytes(mixed))
    assert [(b.start, b.end) for b in bad] == [(0, SECTOR)]


def test_trim_and_zero_mean_zeros() -> None:
    m = VolumeModel("v", SIZE, bytearray(b"\x22" * SIZE))
    z = Event(next(ids), "v", "trim", 1000, 9000)
    m.sent(z)
    m.acked(z)
    m.flush_acked(m.flush_sent())
    crashed(m)
    assert m.check(bytes(image(m, z))) == []
    assert m.check(bytes(m.base)) != []


def test_without_a_crash_exactly_the_newest_value_reads_back() -> None:
    m = VolumeModel("v", SIZE)
    a = write(m, 0, 4096)
    assert m.check(bytes(image(m, a))) == []
    assert m.check(bytes(SIZE)) != []  # after a clean stop an answered write is there
    m.all_durable()
    assert a.durable


def test_another_volumes_bytes_are_rejected_and_named() -> None:
    v = VolumeModel("v", SIZE)
    w = VolumeModel("w", SIZE)
    theirs = write(w, 0, 4096)
    crashed(v)
    leaked = bytearray(SIZE)
    leaked[0:4096] = theirs.data()
    write(v, 8192, 4096)
    bad = v.check(bytes(leaked))
    assert bad
    assert "'w'" in find_origin(bad[0].actual, [v, w])


def test_a_snapshot_holds_the_answered_content_and_maybe_what_was_in_flight() -> None:
    v = VolumeModel("v", SIZE)
    done = write(v, 0, 4096)
    flying = write(v, 8192, 4096, acked=False)
    s = v.clone("s", snapshot=True, written=True, maybe=[flying])
    assert s.uncertain
    assert s.check(bytes(image(v, done))) == []
    assert s.check(bytes(image(v, done, flying))) == []
    assert s.check(bytes(SIZE)) != []  # the answered write is in the snapshot
    later = write(v, 0, 4096)
    assert s.check(bytes(image(v, done, later))) != []  # a later write is not


def test_resolve_makes_the_read_back_certain() -> None:
    m = VolumeModel("v", SIZE)
    a = write(m, 0, 4096)
    crashed(m)
    m.resolve(bytes(SIZE))  # the write was lost in the crash, as it may be
    assert not m.uncertain and m.events == []
    assert m.check(bytes(image(m, a))) != []  # from now on it must stay lost


def test_a_clean_stop_does_not_promise_what_an_earlier_crash_may_have_lost() -> None:
    """A write acknowledged but not flushed before a kill may be lost; a clean stop in a
    later run (which never touched the volume) cannot make it durable after the fact."""
    m = VolumeModel("v", SIZE)
    lost = write(m, 0, 4096)
    m.crashed()
    m.all_durable()  # the final, clean stop
    assert m.check(bytes(SIZE)) == []  # lost in the crash: allowed
    assert m.check(bytes(image(m, lost))) == []  # or it made it: allowed too
    kept = write(m, 4096, 4096)  # acknowledged after the crash ...
    m.all_durable()  # ... and covered by the clean stop
    assert m.check(bytes(image(m, lost))) != []  # so it must be there
    assert m.check(bytes(image(m, lost, kept))) == []
