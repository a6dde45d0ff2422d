"""A trim gets its turn among a stream of writes to the chunks it covers.

A one-chunk write into a fresh chunk (a first write, or a copy-on-write after a
snapshot) holds that chunk's range lock while its data goes out. A trim over
many chunks used to wait until none of them was locked at the moment it looked,
which, with a client always keeping a few such writes in flight somewhere in its
range, could be never. The range locks are first come, first served now (see
nbdserver/backend/ranges.py): the trim runs after the writes sent before it, and
the writes sent after it wait for it.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from poolkit import PoolFactory, design_names

CHUNKS = 256
IN_FLIGHT = 16  # writes the "client" keeps going at once
STREAM = 1500  # writes in all


@pytest.mark.parametrize("design", design_names())
async def test_a_trim_is_not_starved_by_writes_to_its_chunks(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_pool(design)
    chunk = env.chunk_size
    vol = await env.create("v", CHUNKS * chunk)
    for at in range(0, CHUNKS * chunk, 16 * chunk):
        await vol.write(at, b"\x01" * 16 * chunk)
    await env.snapshot("v", "s")  # every write below is the first to its chunk since
    rng = random.Random(5)
    done = 0
    started_after: list[int] = []  # writes completed between the trim's send and its first step
    unmap = env.pool.unmap

    def first_step(*args: object) -> object:
        if len(started_after) == 1:
            started_after.append(done - started_after[0])
        return unmap(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(env.pool, "unmap", first_step)

    async def writer() -> None:
        nonlocal done
        for _ in range(STREAM // IN_FLIGHT):
            await vol.write(rng.randrange(CHUNKS) * chunk, b"w" * chunk)
            done += 1

    async def trimmer() -> None:
        while done < 50:
            await asyncio.sleep(0)
        started_after.append(done)
        await vol.trim(0, CHUNKS * chunk)

    await asyncio.gather(*(writer() for _ in range(IN_FLIGHT)), trimmer())
    assert len(started_after) == 2, "the trim never ran"
    # It waited for the writes in flight when it was sent (and the few sent while its
    # task started), not for later ones: before, it waited for hundreds.
    assert started_after[1] <= 2 * IN_FLIGHT, started_after
    data = await vol.read(0, CHUNKS * chunk)  # trimmed, or written after (or during) it
    assert {data[at:at + chunk] for at in range(0, len(data), chunk)} <= {
        bytes(chunk), b"w" * chunk}
    assert await env.vol("s").read(0, CHUNKS * chunk) == b"\x01" * CHUNKS * chunk
    await env.assert_clean()
