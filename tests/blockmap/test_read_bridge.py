"""Bridged reads: one device read across a short gap of chunks mapped elsewhere.

A fork's rewritten chunks sit inside its parent's extent; the volume reads the
parent's run in one piece, over the gap, and copies the fork's own chunks over
it (``nbdserver.volume._plan_reads``). The bytes read over the gap must never
reach the client: here the parent writes a secret into the very chunks the
fork's read bridges, and the fork must read its own data and zeros there.
"""

from __future__ import annotations

import pytest
from poolkit import PoolFactory, design_names, pattern

from nbdserver.blockmap.base import HOLE, Run
from nbdserver.volume import _plan_reads

C = 4096


def test_plan_bridges_a_gap_and_patches_it() -> None:
    # Chunks 0-1 and 3-7 continue one physical run (at 100); 2 lives elsewhere (at 9).
    runs = [Run(0, 2, 100), Run(2, 1, 9), Run(3, 5, 103)]
    reads, patches = _plan_reads(runs, C, 0, 8 * C, 64 << 10)
    assert reads == [(0, 8 * C, 100 * C)]
    assert patches == [(2 * C, C, 9 * C)]


def test_plan_bridges_a_hole_without_patching_it() -> None:
    runs = [Run(0, 2, 100), Run(2, 1, HOLE), Run(3, 1, 103)]
    reads, patches = _plan_reads(runs, C, 0, 4 * C, 64 << 10)
    assert reads == [(0, 4 * C, 100 * C)] and patches == []


def test_plan_keeps_runs_apart_beyond_the_bridge() -> None:
    runs = [Run(0, 1, 100), Run(1, 20, 500), Run(21, 1, 121)]
    reads, patches = _plan_reads(runs, C, 0, 22 * C, 16 * C)
    assert reads == [(0, C, 100 * C), (C, 20 * C, 500 * C), (21 * C, C, 121 * C)]
    assert patches == []


def test_plan_of_a_partial_range() -> None:
    runs = [Run(0, 2, 100), Run(2, 1, 50), Run(3, 2, 103)]
    reads, patches = _plan_reads(runs, C, C + 512, 4 * C, 64 << 10)
    assert reads == [(C + 512, 3 * C - 512, 101 * C + 512)]
    assert patches == [(2 * C, C, 50 * C)]


@pytest.mark.parametrize("design", design_names())
async def test_bridged_gap_never_shows_the_parent_secret(make_pool: PoolFactory,
                                                         design: str) -> None:
    env = await make_pool(design, offline=False)
    chunk = env.chunk_size
    n = 32
    parent = await env.create("parent", n * chunk)
    await parent.write(0, pattern(1, n * chunk))
    fork = await env.fork("parent", "fork")
    want = bytearray(pattern(1, n * chunk))
    for lc in (3, 4, 9, 17):  # the fork rewrites a few chunks: each leaves a gap
        data = pattern(100 + lc, chunk)
        await fork.write(lc * chunk, data)
        want[lc * chunk:(lc + 1) * chunk] = data
    for lc in (12, 20):  # and trims two: holes inside the parent's run
        await fork.trim(lc * chunk, chunk)
        want[lc * chunk:(lc + 1) * chunk] = bytes(chunk)
    secret = b"<<SECRET>>" * (chunk // 10) + b"!" * (chunk % 10)
    for lc in (3, 4, 9, 12, 17, 20):  # the parent now overwrites those chunks
        await parent.write(lc * chunk, secret)
    await parent.flush()
    for off, length in ((0, n * chunk), (2 * chunk, 20 * chunk), (3 * chunk, chunk),
                        (chunk, 16 * chunk)):
        for attempt in ("first", "again"):  # the first may load map pages (no bridging)
            got = await fork.read(off, length)
            assert b"<<SECRET>>" not in got, f"{attempt} read {off}+{length}"
            assert got == bytes(want[off:off + length]), f"{attempt} read {off}+{length}"
    await env.assert_clean()
