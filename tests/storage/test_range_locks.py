"""RangeLocks: exclusive ranges, one-unit ranges indexed by unit (the hot path)."""

from __future__ import annotations

import asyncio
import random

from nbdserver.backend.ranges import RangeLocks


def test_overlap_between_unit_and_wide_ranges() -> None:
    locks = RangeLocks()
    a = locks.try_hold(5, 6)
    assert a is not None and locks
    assert locks.try_hold(5, 6) is None
    assert locks.try_hold(0, 10) is None  # a wide range over a held unit
    b = locks.try_hold(6, 9)
    assert b is not None
    assert locks.try_hold(8, 9) is None  # a unit inside a held wide range
    assert locks.try_hold(4, 5) is not None and locks.try_hold(9, 10) is not None
    locks.release(a)
    assert locks.try_hold(5, 6) is not None
    locks.release(b)
    assert [(h.start, h.end) for h in locks.overlapping(0, 100)] == [(4, 5), (9, 10), (5, 6)]


def test_overlapping_matches_a_plain_scan() -> None:
    rng = random.Random(7)
    locks = RangeLocks()
    held: dict[int, tuple[int, int]] = {}
    for _ in range(3000):
        start = rng.randrange(200)
        end = start + rng.choice((1, 1, 1, 2, 5, 40, 300))
        want = sorted((s, e) for s, e in held.values() if s < end and start < e)
        assert sorted((h.start, h.end) for h in locks.overlapping(start, end)) == want
        assert locks.unit_held(start) == any(s <= start < e for s, e in held.values())
        key = locks.try_hold(start, end)
        assert (key is None) == bool(want)
        if key is not None:
            held[key] = (start, end)
        if held and rng.random() < 0.45:
            gone = rng.choice(list(held))
            locks.release(gone)
            del held[gone]


def test_hold_unit_locks_what_try_hold_would() -> None:
    locks = RangeLocks()
    key = locks.hold_unit(7)
    assert locks.unit_held(7) and not locks.unit_held(6)
    assert locks.try_hold(7, 8) is None and locks.try_hold(0, 100) is None
    other = locks.hold_unit(8)
    assert other != key
    locks.release(key)
    assert not locks.unit_held(7) and locks.unit_held(8)
    locks.release(other)
    assert not locks


async def test_hold_waits_for_an_overlapping_unit() -> None:
    locks = RangeLocks()
    key = locks.try_hold(3, 4)
    assert key is not None
    order: list[str] = []

    async def wide() -> None:
        async with locks.hold(0, 8):
            order.append("wide")

    task = asyncio.ensure_future(wide())
    await asyncio.sleep(0.01)
    assert order == []
    order.append("released")
    locks.release(key)
    await task
    assert order == ["released", "wide"] and not locks


async def test_waiters_are_served_in_order_and_block_later_requests() -> None:
    """First come, first served: a queued range is seen by later requests, which queue
    behind it (a wide trim is not starved by a stream of one-unit writes)."""
    locks = RangeLocks()
    first = locks.try_hold(3, 4)
    assert first is not None
    order: list[str] = []

    async def take(name: str, start: int, end: int) -> None:
        async with locks.hold(start, end):
            order.append(name)
            await asyncio.sleep(0)

    wide = asyncio.ensure_future(take("wide", 0, 8))
    await asyncio.sleep(0)
    # The unit 5 is free, but the queued wide range covers it: no slipping in.
    assert locks.unit_held(5) and locks.try_hold(5, 6) is None
    assert locks.try_hold(8, 9) is not None  # outside every entry: at once
    later = asyncio.ensure_future(take("later", 5, 6))
    await asyncio.sleep(0.01)
    assert order == []
    locks.release(first)
    await asyncio.gather(wide, later)
    assert order == ["wide", "later"]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    locks = RangeLocks()
    first = locks.try_hold(0, 1)
    assert first is not None
    got: list[str] = []

    async def take(name: str, start: int, end: int) -> None:
        async with locks.hold(start, end):
            got.append(name)

    gone = asyncio.ensure_future(take("gone", 0, 4))
    await asyncio.sleep(0)
    behind = asyncio.ensure_future(take("behind", 2, 3))  # waits for "gone" only
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    await asyncio.wait_for(behind, 1.0)  # not stuck behind the withdrawn entry
    assert got == ["behind"] and locks.try_hold(2, 3) is not None
    locks.release(first)
