"""Cheap forks (invariant 6), measured in structure, not time.

For the designs that promise O(1) forks (radix, extent; ARCHITECTURE.md):

- a snapshot or fork of a 1 TiB thin volume reads, changes and allocates
  exactly as many metadata pages as one of a 1 GiB volume (a handful, and no
  new map page at all), answer included (as the CLI and the control socket
  run it: the answer must not walk the map);
- reading a chunk of a fork at depth 64 reads as many map pages as at depth 0,
  and 64 snapshots of a volume do not change what reading it costs;
- the first write to a chunk of a fork at depth 64 changes as many pages as at
  depth 1.

Counting is done by wrapping the pool's page cache (``get``, ``modify``,
``create``) and its commit (``take_dirty``) on an offline pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from poolkit import MiB, PoolEnv, PoolFactory, design_names, pattern

from nbdserver.control.ops import run_op
from nbdserver.pool.pool import Pool

GiB = 1 << 30
TiB = 1 << 40
CHEAP_FORKS = {"radix", "extent"}


@dataclass
class Cost:
    gets: int = 0
    modifies: int = 0
    creates: int = 0
    committed: int = 0  # pages in the commit records

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.gets, self.modifies, self.creates, self.committed)


@contextmanager
def counting(pool: Pool) -> Iterator[Cost]:
    cost = Cost()
    cache: Any = pool.cache
    originals = {n: getattr(cache, n) for n in ("get", "modify", "create", "take_dirty")}

    def wrap(name: str, field: str) -> Callable[..., Any]:
        fn = originals[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            setattr(cost, field, getattr(cost, field) + 1)
            return fn(*args, **kwargs)

        return counted

    def take_dirty(seq: int) -> Any:
        images = originals["take_dirty"](seq)
        cost.committed += len(images)
        return images

    cache.get = wrap("get", "gets")
    cache.modify = wrap("modify", "modifies")
    cache.create = wrap("create", "creates")
    cache.take_dirty = take_dirty
    try:
        yield cost
    finally:
        for name in originals:
            delattr(cache, name)


def cheap_designs() -> list[str]:
    return sorted(CHEAP_FORKS & set(design_names()))


def lookup_cost(env: PoolEnv, name: str, lc: int) -> tuple[int, int]:
    """Pages one lookup of chunk `lc` reads: the whole walk (radix remembers the leaves
    of writable paths, which would make the owner's lookups one page: forgotten here)."""
    pool = env.pool
    vol = pool.volume(name)
    pool.map.lookup(vol, lc, 1)  # load every page first (offline: synchronously)
    forget = getattr(pool.map, "_forget_leaves", None)
    if forget is not None:
        forget()
    with counting(pool) as cost:
        (run,) = pool.map.lookup(vol, lc, 1)
    return cost.gets, run.pc


@pytest.mark.parametrize("design", cheap_designs())
async def test_clone_cost_does_not_grow_with_volume_size(make_pool: PoolFactory,
                                                         design: str) -> None:
    env = await make_pool(design)  # tiny nodes: a 1 TiB map is a tall tree
    pool = env.pool
    chunk = env.chunk_size
    costs: dict[int, list[tuple[int, int, int, int]]] = {}
    meta_growth: dict[int, list[int]] = {}
    for size in (GiB, TiB):
        name = f"v{size >> 30}g"
        vol = await env.create(name, size)
        for i, off in enumerate((0, size // 3, size // 2 + 5 * chunk, size - chunk)):
            await vol.write(off, pattern(i, chunk))
        await pool.commit()
        costs[size] = []
        meta_growth[size] = []
        for kind in ("snapshot", "fork"):
            before = pool.meta.used
            with counting(pool) as cost:  # the operation as the CLI and socket run it
                answer = await run_op(pool, f"volume.{kind}",
                                      {"source": name, "name": f"{name}-{kind[0]}"})
            assert answer["name"] == f"{name}-{kind[0]}" and answer["parent"] == name
            assert answer["size"] == size and answer["snapshot"] == (kind == "snapshot")
            costs[size].append(cost.as_tuple())
            meta_growth[size].append(pool.meta.used - before)
    assert costs[GiB] == costs[TiB], f"clone costs (gets, modifies, creates, committed): {costs}"
    assert meta_growth[TiB] == [0, 0], "a clone allocates no map page"
    for gets, modifies, creates, committed in costs[TiB]:
        assert committed <= 6 and creates == 0 and gets <= 12 and modifies <= 8
    # The clones read what their source reads.
    big = env.vol("v1024g")
    for clone in ("v1024g-s", "v1024g-f"):
        assert await env.vol(clone).read(TiB // 3, chunk) == await big.read(TiB // 3, chunk)
    await env.assert_clean()


@pytest.mark.parametrize("design", cheap_designs())
async def test_depth_and_snapshot_count_do_not_slow_reads_or_writes(make_pool: PoolFactory,
                                                                    design: str) -> None:
    env = await make_pool(design, max_volumes=256, size=128 * MiB)  # room for 200 maps
    pool = env.pool
    chunk = env.chunk_size
    size = 64 * chunk
    # 1. Each generation forks the previous one, which then writes (its own copy): the
    #    deepest fork still has the original map, read at the original cost, and each
    #    generation's first write costs the same at any depth.
    e0 = await env.create("e0", size)
    await e0.write(0, pattern(0, size))
    costs0 = {lc: lookup_cost(env, "e0", lc) for lc in (0, 17, 40, 63)}
    src = "e0"
    writes: dict[int, tuple[int, int, int, int]] = {}
    for depth in range(1, 65):
        name = f"e{depth}"
        await env.fork(src, name)
        await pool.commit()
        with counting(pool) as cost:  # the parent (depth - 1) writes, copying its path
            await env.vol(src).write(9 * chunk + 100, pattern(depth, 200))
            await pool.commit()
        writes[depth - 1] = cost.as_tuple()
        src = name
    assert pool.depth(pool.volume("e64")) == 64
    for lc, (gets, pc) in costs0.items():
        assert lookup_cost(env, "e64", lc) == (gets, pc), (
            f"chunk {lc}: reading it at depth 64 costs more than at depth 0")
    assert writes[1] == writes[63], (
        f"first write at depth 1 vs 63 (gets, modifies, creates, committed): {writes}")
    # 2. Each generation forks the previous one and writes into the fork (so the deepest
    #    inherits every write: 64 extents of 64 owners). Radix: a fixed height, so the
    #    first write of a chunk costs the same at depth 64 as at depth 1.
    d0 = await env.create("d0", size)
    await d0.write(0, pattern(0, size))
    gets0, pc0 = lookup_cost(env, "d0", 17)
    first_write: dict[int, tuple[int, int, int, int]] = {}
    src = "d0"
    for depth in range(1, 65):
        name = f"d{depth}"
        await env.fork(src, name)
        await pool.commit()
        with counting(pool) as cost:
            await env.vol(name).write((20 + depth % 40) * chunk, pattern(depth, chunk))
            await pool.commit()
        if depth in (1, 64):
            first_write[depth] = cost.as_tuple()
        src = name
    if design == "radix":
        # The same pages are created and committed at any depth. A copied leaf gives its
        # children a reference one run of consecutive chunks at a time, so gets and
        # modifies differ by at most the fan-out (deep leaves hold chunks of many owners).
        fanout = pool.map.fanout  # type: ignore[attr-defined]
        shallow, deep = first_write[1], first_write[64]
        assert shallow[2:] == deep[2:] and all(
            abs(a - b) <= fanout for a, b in zip(shallow[:2], deep[:2], strict=True)), (
            f"first write at depth 1 vs 64 (gets, modifies, creates, committed): {first_write}")
    assert lookup_cost(env, "d64", 17)[1] == pc0, "chunk 17 is still shared by every generation"
    assert lookup_cost(env, "d0", 17)[0] == gets0, "64 generations of forks slowed d0's reads"
    if design == "radix":  # a fixed height: the same pages as any volume of that size
        assert lookup_cost(env, "d64", 17)[0] == gets0
    # 3. Many snapshots of a volume do not change what reading it costs.
    for i in range(64):
        await env.snapshot("d0", f"s{i}")
    assert lookup_cost(env, "d0", 17)[0] == gets0, "64 snapshots slowed reads of the origin"
    assert (await env.vol("d64").read(17 * chunk, chunk)) == pattern(0, size)[17 * chunk:
                                                                              18 * chunk]
    await env.assert_clean()
