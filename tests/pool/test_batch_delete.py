"""Deleting many volumes in one operation (Pool.delete_volumes): checked first, committed
together."""

from __future__ import annotations

import pytest
from poolkit import PoolFactory

from nbdserver.errors import UserError
from nbdserver.pool.pool import Pool

KiB = 1024


async def test_a_batch_of_deletes_costs_two_commits_and_frees_each_volume(
        make_pool: PoolFactory) -> None:
    env = await make_pool("radix", chunk_size=4 * KiB, offline=False, size=64 << 20,
                          small=False)
    pool: Pool = env.pool
    await env.create("golden", 1 << 20)
    names = [f"c{i}" for i in range(30)]
    await pool.clone_volumes("golden", names, snapshot=False)
    for i, name in enumerate(names[:3]):  # three of them write chunks of their own
        await env.vol(name).write(0, bytes([i + 1]) * ((i + 1) * 4 * KiB))
        await env.release(name)
    before = pool.commits
    seen: list[int] = []
    freed = await pool.delete_volumes(names, seen.append)
    assert pool.commits - before == 2
    assert freed[:3] == [1, 2, 3] and not any(freed[3:])
    assert seen == sorted(seen) and all(n <= 6 for n in seen)  # (cumulative, if called)
    assert [v.name for v in pool.live_volumes()] == ["golden"]
    await env.assert_clean()


@pytest.mark.parametrize("bad", ["missing", "twice", "in use"])
async def test_a_bad_name_in_a_batch_deletes_nothing(make_pool: PoolFactory,
                                                     bad: str) -> None:
    env = await make_pool("radix", chunk_size=4 * KiB, offline=False)
    pool: Pool = env.pool
    await env.create("golden", 256 * KiB)
    await pool.clone_volumes("golden", ["a", "b", "c"], snapshot=False)
    names = {"missing": ["a", "b", "nosuch"], "twice": ["a", "b", "a"],
             "in use": ["a", "b", "c"]}[bad]
    if bad == "in use":
        env.vol("c")  # a backend on it: served
    with pytest.raises(UserError) as err:
        await pool.delete_volumes(names)
    assert {"missing": "no volume 'nosuch'", "twice": "given twice",
            "in use": "'c' is in use"}[bad] in str(err.value)
    assert [v.name for v in pool.live_volumes()] == ["golden", "a", "b", "c"]
    assert not any(v.deleted for v in pool.volumes.values())
    await env.reopen()  # nothing marked on disk either
    assert [v.name for v in env.pool.live_volumes()] == ["golden", "a", "b", "c"]
    await env.assert_clean()


async def test_linear_refuses_an_origin_in_a_batch_with_its_snapshots(
        make_pool: PoolFactory) -> None:
    """Its snapshots are released only after the batch is marked: the origin is refused,
    and with it the batch (delete the snapshots first)."""
    env = await make_pool("linear", chunk_size=4 * KiB, offline=False)
    pool: Pool = env.pool
    await env.create("origin", 256 * KiB)
    await env.snapshot("origin", "s1")
    await env.release("s1")
    await env.release("origin")
    with pytest.raises(UserError) as err:
        await pool.delete_volumes(["s1", "origin"])
    assert "origin of 1 snapshot" in str(err.value), str(err.value)
    assert [v.name for v in pool.live_volumes()] == ["origin", "s1"]
    await pool.delete_volumes(["s1"])
    await pool.delete_volumes(["origin"])
    assert not pool.live_volumes()


async def test_batches_larger_than_one_commit_holds(make_pool: PoolFactory) -> None:
    """A small journal (64 pages: at most 32 dirty): 1,200 forks in one batch commit as
    they go (they did not: one commit grew past the ring, and the pool stopped), and a
    delete of them all, which must mark them in one commit, is refused before anything
    changes; 400 at a time go."""
    env = await make_pool("radix", chunk_size=4 * KiB, offline=False, max_volumes=1300)
    pool: Pool = env.pool
    await env.create("golden", 64 * KiB)
    names = [f"c{i:04}" for i in range(1200)]
    made = await pool.clone_volumes("golden", names, snapshot=False)
    assert len(made) == 1200 and pool.failed is None
    with pytest.raises(UserError) as err:
        await pool.delete_volumes(names)
    assert "delete at most about" in str(err.value), str(err.value)
    assert len(pool.live_volumes()) == 1201 and pool.failed is None
    for i in range(0, 1200, 400):
        await pool.delete_volumes(names[i:i + 400])
    assert [v.name for v in pool.live_volumes()] == ["golden"] and pool.failed is None
    await env.reopen()
    assert [v.name for v in env.pool.live_volumes()] == ["golden"]
    await env.assert_clean()
