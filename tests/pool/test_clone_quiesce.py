"""A snapshot is a point in time even when the source gets its backend mid-clone.

A volume served by pattern (``volumes:`` exports) has no backend until a client
connects, and a client can connect while a snapshot of it waits on a page load.
That backend's writes in flight must be waited for too: a write in place that
lands after its chunk became shared would change the snapshot after it was
made, and the volume would lose the write at its next copy-on-write of that
chunk (seen: the volume read its old bytes where an answered write had been).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from poolkit import HoldingEngine, PoolFactory

from nbdserver.config import ExportConfig
from nbdserver.errors import UserError
from nbdserver.pool.pool import Pool
from nbdserver.pools import VolumeExports

KiB = 1024
CHUNK = 64 * KiB


def _write(backend: Any, offset: int, data: bytes) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    backend.write(offset, memoryview(data), False, fut.set_result)
    backend.engine.kick()
    return fut


async def test_a_backend_opened_during_a_snapshot_is_quiesced_too(
        make_pool: PoolFactory) -> None:
    env = await make_pool("radix", chunk_size=CHUNK, offline=False)
    pool: Pool = env.pool
    await env.create("vm1", 1 << 20)
    await env.vol("vm1").write(0, b"\xaa" * CHUNK)
    await pool.commit()
    await env.release("vm1")
    holding = HoldingEngine(pool.engine)
    pool.engine = holding  # type: ignore[assignment]
    source = VolumeExports(ExportConfig(
        name="", description="", read_only=False, min_block_size=512, file=None, size=None,
        pool="p", volume=None, create=None, key="exports[0]", volumes="vm*"), pool)

    first_write: list[asyncio.Future[Any]] = []
    backends: list[Any] = []
    real_run = pool.cache.run

    async def run(op: Any, gate: Any = None) -> Any:
        if not backends:  # the clone waits on a page load; a client connects and writes
            await asyncio.sleep(0)
            backend, _release = source.open("vm1")
            backends.append(backend)
            at = pool.layout.data_start + pool.map.chunk_at(pool.volume("vm1"), 0) * CHUNK
            holding.hold_writes(at, at + CHUNK)  # the device is slow with this write
            first_write.append(_write(backend, 0, b"\xbb" * (4 * KiB)))  # in place
            asyncio.get_running_loop().call_later(0.2, holding.release)
        return await real_run(op, gate)

    pool.cache.run = run  # type: ignore[method-assign]
    await pool.clone_volume("vm1", "snap", snapshot=True)
    pool.cache.run = real_run  # type: ignore[method-assign]
    done_first = first_write[0].done()
    backend = backends[0]
    assert await _write(backend, 8 * KiB, b"\xcc" * (4 * KiB)) is None  # copy-on-write
    assert await first_write[0] is None
    # The snapshot holds the first write (answered before the snapshot was made), not
    # the one after it.
    got = await env.vol("snap").read(0, 12 * KiB)
    assert got == b"\xbb" * (4 * KiB) + b"\xaa" * (8 * KiB)
    vm1 = bytearray(12 * KiB)
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    backend.read(0, 12 * KiB, fut.set_result)
    backend.engine.kick()
    result = await fut
    for offset, length, data in result.chunks:
        if data is not None:
            vm1[offset:offset + length] = data[:length]
    result.release()
    assert bytes(vm1) == b"\xbb" * (4 * KiB) + b"\xaa" * (4 * KiB) + b"\xcc" * (4 * KiB)
    assert done_first, "the snapshot did not wait for the new backend's write"
    await source.close()
    await env.assert_clean()


async def test_many_forks_are_of_one_point_in_time(make_pool: PoolFactory) -> None:
    """Forks of a volume being written, made in one batch: one quiesce of its backend, and
    a write sent while they are made lands after all of them (none of them holds it)."""
    env = await make_pool("radix", chunk_size=4 * KiB, offline=False)
    pool: Pool = env.pool
    vm1 = await env.create("vm1", 1 << 20)
    await vm1.write(0, b"\xaa" * (64 * KiB))
    vol = pool.volume("vm1")
    real_quiesce = pool.quiesce[vol.id]
    calls = []

    async def counting() -> Any:
        calls.append(1)
        return await real_quiesce()

    pool.quiesce[vol.id] = counting
    names = [f"f{i}" for i in range(8)]
    batch = asyncio.ensure_future(pool.clone_volumes("vm1", names, snapshot=False))
    await asyncio.sleep(0)  # the batch has quiesced vm1
    late = asyncio.ensure_future(vm1.write(0, b"\xbb" * (64 * KiB)))
    made = await batch
    await late
    assert [v.name for v in made] == names and len(calls) == 1
    for name in names:
        assert await env.vol(name).read(0, 64 * KiB) == b"\xaa" * (64 * KiB), name
    assert await vm1.read(0, 64 * KiB) == b"\xbb" * (64 * KiB)
    await env.assert_clean()


async def test_a_batch_of_forks_that_runs_out_of_room_keeps_and_names_what_it_made(
        make_pool: PoolFactory) -> None:
    env = await make_pool("radix", chunk_size=4 * KiB, offline=False, size=128 << 20,
                          small=False)
    pool: Pool = env.pool
    await env.create("vm1", 4 << 20)
    names = [f"g{i}" for i in range(1000)]  # guaranteed: each promises 4 MiB of chunks
    with pytest.raises(UserError) as err:
        await pool.clone_volumes("vm1", names, snapshot=False, guarantee=True)
    made = [v.name for v in pool.live_volumes() if v.name.startswith("g")]
    assert 0 < len(made) < len(names) and made == names[:len(made)]
    shown = ", ".join(repr(n) for n in made[:10]) + (
        f" and {len(made) - 10:,} more" if len(made) > 10 else "")  # (at most 10 named)
    assert f"(made before it: {shown})" in str(err.value), str(err.value)
    await env.reopen()  # committed: still there after a reopen
    assert [v.name for v in env.pool.live_volumes() if v.name.startswith("g")] == made
    await env.assert_clean()


async def test_a_cancelled_quiesce_lets_the_writes_it_held_go_on(
        make_pool: PoolFactory) -> None:
    env = await make_pool("radix", chunk_size=4 * KiB, offline=False)
    pool: Pool = env.pool
    vm1 = await env.create("vm1", 1 << 20)
    await vm1.write(0, b"\x01" * (64 * KiB))
    holding = HoldingEngine(pool.engine)
    pool.engine = holding  # type: ignore[assignment]
    await env.release("vm1")
    vm1 = env.vol("vm1")  # (a backend on the holding engine)
    holding.hold_writes(0, 1 << 62)
    first = asyncio.ensure_future(vm1.write(0, b"\x02" * (4 * KiB)))  # in flight, held
    await asyncio.sleep(0.05)
    quiesce = asyncio.ensure_future(pool.quiesce[pool.volume("vm1").id]())
    await asyncio.sleep(0.05)  # it now holds new writes and waits for the first
    quiesce.cancel()
    await asyncio.gather(quiesce, return_exceptions=True)
    holding.release()
    await asyncio.wait_for(first, 5)
    await asyncio.wait_for(vm1.write(8 * KiB, b"\x03" * (4 * KiB)), 5)  # not held forever
    assert await vm1.read(0, 12 * KiB) == b"\x02" * (4 * KiB) + b"\x01" * (4 * KiB) \
        + b"\x03" * (4 * KiB)
