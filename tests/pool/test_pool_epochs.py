"""I/O epochs: deferred work runs only after every transfer (or, for a claim, every read)
begun before it has ended."""

from __future__ import annotations

from nbdserver.pool.epochs import IoEpochs


def test_defer_with_nothing_in_flight_runs_at_once() -> None:
    ep = IoEpochs()
    ran: list[int] = []
    ep.defer(lambda: ran.append(1))
    assert ran == [1]
    assert ep.in_flight == 0


def test_defer_waits_for_earlier_transfers_only() -> None:
    ep = IoEpochs()
    ran: list[str] = []
    a = ep.begin_write()
    b = ep.begin_write()
    ep.defer(lambda: ran.append("d1"))
    c = ep.begin_write()  # began after d1: d1 does not wait for it
    ep.defer(lambda: ran.append("d2"))
    assert ep.in_flight == 3
    ep.end_write(a)
    assert ran == []
    ep.end_write(b)
    assert ran == ["d1"], "d1 waited for a and b only"
    ep.end_write(c)
    assert ran == ["d1", "d2"]
    assert ep.in_flight == 0


def test_transfers_ending_out_of_order() -> None:
    ep = IoEpochs()
    ran: list[str] = []
    first = ep.begin_write()
    ep.defer(lambda: ran.append("x"))
    second = ep.begin_write()
    ep.defer(lambda: ran.append("y"))
    third = ep.begin_write()
    ep.end_write(third)
    ep.end_write(second)
    assert ran == [], "the oldest transfer is still going"
    ep.end_write(first)
    assert ran == ["x", "y"]


def test_many_defers_in_one_epoch_keep_order() -> None:
    ep = IoEpochs()
    ran: list[int] = []
    t = ep.begin_write()
    for i in range(5):
        ep.defer(lambda i=i: ran.append(i))
    assert ran == []
    ep.end_write(t)
    assert ran == [0, 1, 2, 3, 4]


def test_long_run_does_not_leak() -> None:
    ep = IoEpochs()
    ran = 0

    def bump() -> None:
        nonlocal ran
        ran += 1

    live: list[int] = []
    for i in range(1000):
        live.append(ep.begin_write())
        if i % 3 == 0:
            ep.defer(bump)
        if len(live) > 4:
            ep.end_write(live.pop(0))
    for t in live:
        ep.end_write(t)
    assert ran == 334
    assert ep.in_flight == 0
    assert not ep._closed and not ep._deferred


def test_defer_waits_for_reads_and_writes() -> None:
    ep = IoEpochs()
    ran: list[str] = []
    r = ep.begin_read()
    w = ep.begin_write()
    ep.defer(lambda: ran.append("all"))
    ep.end_write(w)
    assert ran == [], "a read begun before is still going"
    ep.end_read(r)
    assert ran == ["all"]
    w = ep.begin_write()
    r = ep.begin_read()
    ep.defer(lambda: ran.append("again"))
    ep.end_read(r)
    assert ran == ["all"], "a write begun before is still going"
    ep.end_write(w)
    assert ran == ["all", "again"]
    assert ep.in_flight == 0


def test_defer_after_reads_ignores_writes() -> None:
    ep = IoEpochs()
    ran: list[str] = []
    w = ep.begin_write()
    r1 = ep.begin_read()
    ep.defer_after_reads(lambda: ran.append("claim"))
    r2 = ep.begin_read()  # began after: not waited for
    ep.defer(lambda: ran.append("reuse"))
    assert ep.reads_in_flight == 2 and ep.in_flight == 3
    ep.end_read(r1)
    assert ran == ["claim"], "the write in flight does not hold a wait for reads"
    ep.end_read(r2)
    assert ran == ["claim"], "the write in flight holds a wait for every transfer"
    ep.end_write(w)
    assert ran == ["claim", "reuse"]
    assert ep.in_flight == 0


def test_reads_only_wait_with_nothing_in_flight_runs_at_once() -> None:
    ep = IoEpochs()
    ran: list[int] = []
    w = ep.begin_write()
    ep.defer_after_reads(lambda: ran.append(1))
    assert ran == [1]
    ep.end_write(w)
