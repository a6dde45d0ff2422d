"""I/O epochs: deferred work runs only after every transfer begun before it has ended."""

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
    a = ep.begin()
    b = ep.begin()
    ep.defer(lambda: ran.append("d1"))
    c = ep.begin()  # began after d1: d1 does not wait for it
    ep.defer(lambda: ran.append("d2"))
    assert ep.in_flight == 3
    ep.end(a)
    assert ran == []
    ep.end(b)
    assert ran == ["d1"], "d1 waited for a and b only"
    ep.end(c)
    assert ran == ["d1", "d2"]
    assert ep.in_flight == 0


def test_transfers_ending_out_of_order() -> None:
    ep = IoEpochs()
    ran: list[str] = []
    first = ep.begin()
    ep.defer(lambda: ran.append("x"))
    second = ep.begin()
    ep.defer(lambda: ran.append("y"))
    third = ep.begin()
    ep.end(third)
    ep.end(second)
    assert ran == [], "the oldest transfer is still going"
    ep.end(first)
    assert ran == ["x", "y"]


def test_many_defers_in_one_epoch_keep_order() -> None:
    ep = IoEpochs()
    ran: list[int] = []
    t = ep.begin()
    for i in range(5):
        ep.defer(lambda i=i: ran.append(i))
    assert ran == []
    ep.end(t)
    assert ran == [0, 1, 2, 3, 4]


def test_long_run_does_not_leak() -> None:
    ep = IoEpochs()
    ran = 0

    def bump() -> None:
        nonlocal ran
        ran += 1

    live: list[int] = []
    for i in range(1000):
        live.append(ep.begin())
        if i % 3 == 0:
            ep.defer(bump)
        if len(live) > 4:
            ep.end(live.pop(0))
    for t in live:
        ep.end(t)
    assert ran == 334
    assert ep.in_flight == 0
    assert len(ep._active) <= 2 and not ep._deferred
