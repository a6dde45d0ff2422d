"""Long writes go through the run forms of the block-map interface.

A write of many chunks asks the map once for the whole range
(:meth:`BlockMap.write_runs`), claims fresh chunks a run at a time
(:meth:`Pool.claim_chunks`) and maps each run at once (:meth:`BlockMap.map_run`).
Here long writes land on holes, on chunks shared with a fork, on trimmed ranges
and on the volume's own chunks; every volume must read back what was written,
the pool must check clean, and the runs must really have been mapped as runs.
(The model test, ``blockmap_model.py``, checks ``write_runs`` against
``write_target`` chunk by chunk after every step.)
"""

from __future__ import annotations

from typing import Any

import pytest
from poolkit import PoolFactory, design_names, pattern


@pytest.mark.parametrize("design", design_names())
async def test_long_writes_map_runs_of_chunks(make_pool: PoolFactory, design: str) -> None:
    env = await make_pool(design)  # offline: every page at hand, the fast path applies
    chunk = env.chunk_size
    n = 96
    bmap = env.pool.map
    runs: list[int] = []
    plain = bmap.map_fresh  # (what map_run and the batches of fresh writes both use)

    def spy(vol: Any, lc: int, pc: int, count: int, born: Any) -> None:
        runs.append(count)
        plain(vol, lc, pc, count, born)

    bmap.map_fresh = spy  # type: ignore[method-assign]
    want: dict[str, bytearray] = {}

    async def write(name: str, first: int, count: int, seed: int) -> None:
        data = pattern(seed, count * chunk)
        await env.vol(name).write(first * chunk, data)
        want[name][first * chunk:(first + count) * chunk] = data

    await env.create("v", n * chunk)
    want["v"] = bytearray(n * chunk)
    await write("v", 3, 40, 1)  # holes: fresh chunks
    await env.fork("v", "f")
    want["f"] = bytearray(want["v"])
    await write("f", 10, 50, 2)  # shared chunks and holes: copy-on-write of whole chunks
    await env.vol("f").trim(20 * chunk, 8 * chunk)
    want["f"][20 * chunk:28 * chunk] = bytes(8 * chunk)
    await write("f", 16, 30, 3)  # its own chunks, a trimmed hole, then shared ones again
    await write("v", 0, n, 4)  # the parent rewrites everything
    await env.vol("f").flush()
    for name, data in want.items():
        assert await env.vol(name).read_all() == bytes(data), name
    assert max(runs) > 1, f"no run of chunks was mapped at once: {runs}"
    if design == "extent":  # a run is one record per max_extent chunks, not one per chunk
        stats = await env.pool.volume_stats(env.pool.volume("f"))
        assert stats.extents <= 16, stats
    await env.reopen()
    for name, data in want.items():
        assert await env.vol(name).read_all() == bytes(data), f"{name} after reopening"
    await env.assert_clean()
