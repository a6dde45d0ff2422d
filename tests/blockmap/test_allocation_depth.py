"""``qemu:allocation-depth`` after a claim: a volume's own writes are at its own layer.

A fork's write to a chunk that only it still references (its parent has since
rewritten its own copy) takes the chunk over in place (a *claim*) rather than
copying it. From then on the data is the fork's: depth 1 (this layer), not the
parent's layer it was first written in; a tool that copies a volume's own
layer (``qemu-img map``, depth 1) would otherwise miss the fork's write.
"""

from __future__ import annotations

import pytest
from poolkit import KiB, PoolFactory, design_names, pattern

from nbdserver.backend.base import ALLOCATION_DEPTH


@pytest.mark.parametrize("design", design_names())
async def test_a_claimed_chunk_is_at_the_claiming_volumes_layer(make_pool: PoolFactory,
                                                                design: str) -> None:
    env = await make_pool(design)
    chunk = env.pool.chunk_size
    a = await env.create("a", 64 * KiB)
    await a.write(0, pattern(1, 2 * chunk))
    b = await env.fork("a", "b")
    await a.write(0, pattern(2, chunk))  # a's chunk 0 moves: b alone keeps the old one
    await b.write(100, pattern(3, 100))  # b: a claim, then in place
    await b.write(300, pattern(4, 100))  # in place
    want = bytearray(pattern(1, chunk))
    want[100:200] = pattern(3, 100)
    want[300:400] = pattern(4, 100)
    assert await b.read(0, chunk) == want
    depths = await b.block_status(0, 2 * chunk, ALLOCATION_DEPTH)
    assert depths[0] == (chunk, 1), depths  # b's own
    assert depths[1] == (chunk, 2), depths  # chunk 1: still a's, shared, never rewritten
    await env.reopen()
    assert (await env.vol("b").block_status(0, chunk, ALLOCATION_DEPTH))[0] == (chunk, 1)
    await env.assert_clean()
