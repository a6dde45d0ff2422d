"""Helpers for the pool and block-map tests: a pool on a real O_DIRECT file, and volumes.

:class:`PoolEnv` creates a pool of one design in a file (on the test's tmp_path,
ext4, never tmpfs), opens it with a real AIO engine, and reopens it on demand.
It opens the pool either ``offline`` (missing metadata pages are read
synchronously) or online with a tiny page cache (``TINY_CACHE``: 16 pages), so
that block-map code keeps hitting PageMiss, rolls back and retries, and clean
pages are evicted all the time.

:class:`Vol` drives a :class:`~nbdserver.volume.VolumeBackend` through its real
callback API (the NBD data path) and turns each ``done(result)`` into an
awaitable: ``await vol.write(off, data)``, ``await vol.read(off, n)`` (bytes,
holes filled with zeros), ``trim``, ``zero``, ``flush``, ``block_status``.
Errors come back as raised :class:`~nbdserver.errors.NbdError`.

Designs: every test that takes a design iterates over :func:`design_names`,
which asks the registry (:func:`nbdserver.blockmap.base.designs`), so a new
design is tested as soon as it registers itself. :func:`small_params` gives the
map parameters that force deep structures (radix fan-out 4, tiny extent
nodes); a design may offer its own by defining a ``small_params()``
classmethod (which wins), and otherwise runs with its defaults.

This module is loaded under the name ``poolkit`` by the conftest files of
``tests/pool`` and ``tests/blockmap`` (and by ``scripts/soak-model.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from nbdserver.backend.base import BASE_ALLOCATION, ReadResult, StatusExtent
from nbdserver.blockmap.base import designs
from nbdserver.errors import NbdError
from nbdserver.pool.pool import CheckReport, Pool
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.engine import IoEngine, make_engine
from nbdserver.volume import VolumeBackend

PoolFactory = Callable[..., Awaitable["PoolEnv"]]

KiB = 1024
MiB = 1024 * KiB
TINY_CACHE = 64 * KiB  # 16 pages: the smallest cache the pool allows
POOL_SIZE = 16 * MiB
JOURNAL_BYTES = 256 * KiB  # 64 pages: commits wrap the ring and checkpoint often
MAX_VOLUMES = 64

# Parameters that make each design build deep structures from few chunks, for designs
# that do not say themselves (with a ``small_params()`` classmethod).
_SMALL_PARAMS: dict[str, tuple[int, int, int, int]] = {
    "radix": (4, 0, 0, 0),  # fan-out 4
    "extent": (4, 4, 8, 0),  # 4 records per leaf, 4 children per node, extents of 8 chunks
}


def design_names() -> list[str]:
    """Every registered block-map design, sorted (what the parametrised tests run over)."""
    return sorted(designs())


def small_params(design: str) -> tuple[int, int, int, int] | None:
    """Map parameters forcing small nodes for `design`, or None for its defaults."""
    cls: Any = designs()[design]
    fn = getattr(cls, "small_params", None)
    if callable(fn):
        return tuple(fn())  # type: ignore[return-value]
    return _SMALL_PARAMS.get(design)


def pattern(seed: int, length: int, offset: int = 0) -> bytes:
    """Recognisable bytes, never all zero: bytes [offset, offset+length) of a stream of
    16-byte blocks ``<seed:6 hex>:<block number:8 hex>|`` (the block number counts from
    the stream's start). Every 16-byte block of every seed is different, so a chunk read
    from the wrong place or the wrong volume never passes for the right one."""
    seed &= 0xFFFFFF
    first, last = offset // 16, (offset + length + 15) // 16
    stream = b"".join(b"%06x:%08x|" % (seed, block & 0xFFFFFFFF)
                      for block in range(first, last))
    skip = offset - first * 16
    return stream[skip:skip + length]


class Vol:
    """One volume served by a VolumeBackend, with awaitable operations (see module note)."""

    def __init__(self, env: PoolEnv, name: str, backend: VolumeBackend) -> None:
        self.env = env
        self.name = name
        self.backend = backend

    @property
    def size(self) -> int:
        return self.backend.size

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()

    @staticmethod
    def _settle(fut: asyncio.Future[Any], result: object) -> None:
        if fut.done():
            raise AssertionError("a backend completed one request twice")
        fut.set_result(result)

    async def _done(self, start: Any, *args: Any, **kwargs: Any) -> None:
        fut = self._future()
        start(*args, done=lambda r: self._settle(fut, r), **kwargs)
        result = await fut
        if isinstance(result, NbdError):
            raise result
        assert result is None, result

    async def read(self, offset: int, length: int) -> bytes:
        fut = self._future()
        self.backend.read(offset, length, lambda r: self._settle(fut, r))
        result = await fut
        if isinstance(result, NbdError):
            raise result
        assert isinstance(result, ReadResult)
        out = bytearray(length)
        pos = offset
        try:
            for off, n, data in result.chunks:
                assert off == pos, f"read chunks out of order: {off} after {pos}"
                assert n > 0
                if data is not None:
                    assert len(data) == n
                    out[off - offset:off - offset + n] = data
                pos = off + n
        finally:
            result.release()
        assert pos == offset + length, f"read chunks cover {pos - offset} of {length} bytes"
        return bytes(out)

    async def read_all(self) -> bytes:
        """The whole volume, read as a client would: 32 MiB (NBD's largest) at a time."""
        step = 32 * MiB
        parts = [await self.read(pos, min(step, self.size - pos))
                 for pos in range(0, self.size, step)]
        return b"".join(parts)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        fut = self._future()
        self.backend.write(offset, memoryview(data), fua, lambda r: self._settle(fut, r))
        result = await fut
        if isinstance(result, NbdError):
            raise result

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._done(self.backend.trim, offset, length, fua)

    async def zero(self, offset: int, length: int, *, may_trim: bool = True,
                   fast_only: bool = False, fua: bool = False) -> None:
        await self._done(self.backend.zero, offset, length, may_trim=may_trim,
                         fast_only=fast_only, fua=fua)

    async def flush(self) -> None:
        await self._done(self.backend.flush)

    async def block_status(self, offset: int, length: int,
                           context: str = BASE_ALLOCATION) -> list[StatusExtent]:
        """Extents covering exactly [offset, offset+length) (asking again where a reply
        stops short)."""
        out: list[StatusExtent] = []
        pos, end = offset, offset + length
        while pos < end:
            fut = self._future()
            self.backend.block_status(pos, end - pos, context,
                                      lambda r, fut=fut: self._settle(fut, r))
            result = await fut
            if isinstance(result, NbdError):
                raise result
            assert result, "empty block-status reply"
            for n, flags in result:
                assert n > 0
                n = min(n, end - pos)
                if n <= 0:
                    break
                out.append((n, flags))
                pos += n
        return out


class PoolEnv:
    """A pool of one design in a file, opened and reopened by the test (see module note)."""

    def __init__(self, path: Path, design: str, *, chunk_size: int = 4096,
                 size: int = POOL_SIZE, offline: bool = True, cache_bytes: int = TINY_CACHE,
                 map_params: tuple[int, int, int, int] | None = None,
                 small: bool = True, journal_bytes: int | None = JOURNAL_BYTES,
                 max_volumes: int = MAX_VOLUMES) -> None:
        self.path = path
        self.design = design
        self.chunk_size = chunk_size
        self.offline = offline
        self.cache_bytes = cache_bytes
        if map_params is None and small:
            map_params = small_params(design)
        Pool.create(path, size, blockmap=design, chunk_size=chunk_size, map_params=map_params,
                    max_volumes=max_volumes, journal_bytes=journal_bytes)
        self._engine: IoEngine | None = None
        self._pool: Pool | None = None
        self.buffers = BufferPool()
        self.vols: dict[str, Vol] = {}

    @property
    def pool(self) -> Pool:
        assert self._pool is not None, "the pool is not open"
        return self._pool

    @property
    def engine(self) -> IoEngine:
        assert self._engine is not None, "the pool is not open"
        return self._engine

    async def open(self) -> PoolEnv:
        if self._engine is None:
            self._engine = make_engine(asyncio.get_running_loop())
        # (lock_wait: after crash(), the kernel may hold the old file a moment longer)
        self._pool = await Pool.open(self.path, self._engine, self.buffers, lock_wait=5.0,
                                     cache_bytes=self.cache_bytes, offline=self.offline)
        return self

    async def close(self) -> None:
        """Close every backend, then the pool (commit and checkpoint)."""
        for name in list(self.vols):
            await self.release(name)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def shutdown(self) -> None:
        """Close the pool and the engine (teardown)."""
        try:
            await self.close()
        finally:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            self.buffers.clear()

    async def reopen(self) -> None:
        await self.close()
        await self.open()

    async def crash(self, *, reopen: bool = True) -> None:
        """Drop the pool as kill -9 would, but in this process, at a quiet moment: the
        backends are released, the pool's background work (a commit it started on its
        own) finishes, and every transfer on its file completes; then the pool is
        abandoned (no commit, no checkpoint) and, with `reopen`, opened again,
        recovering from its journal. Waiting matters: a transfer still in flight holds
        the file, and with it the pool's lock, after its descriptor is closed, and the
        reopened pool would find itself locked out (a real crash drops both with the
        process). Even then the kernel can let go of the file a moment later (seen once
        in a few hundred crashes of the model test), so :meth:`open` waits for the lock
        as a server starting after a crash does."""
        pool = self.pool
        for name in list(self.vols):
            await self.release(name)
        while pool._background:
            await asyncio.gather(*list(pool._background), return_exceptions=True)
        await pool._home_done.wait()
        for _ in range(10_000):  # 10 s at most
            if not getattr(self.engine, "in_flight", 0):
                break
            await asyncio.sleep(0.001)
        pool.abandon()
        if reopen:
            await self.open()

    # -- volumes ------------------------------------------------------------------------

    def vol(self, name: str) -> Vol:
        """The volume `name`, with a backend (kept open until release/close/delete)."""
        vol = self.vols.get(name)
        if vol is None:
            record = self.pool.volume(name)
            vol = self.vols[name] = Vol(self, name, VolumeBackend(self.pool, record,
                                                                 user="test"))
        return vol

    async def release(self, name: str) -> None:
        vol = self.vols.pop(name, None)
        if vol is not None:
            await vol.backend.close()

    async def create(self, name: str, size: int, *, guarantee: bool = False) -> Vol:
        await self.pool.create_volume(name, size, guarantee=guarantee)
        return self.vol(name)

    async def snapshot(self, source: str, name: str) -> Vol:
        await self.pool.clone_volume(source, name, snapshot=True)
        return self.vol(name)

    async def fork(self, source: str, name: str, *, guarantee: bool = False) -> Vol:
        await self.pool.clone_volume(source, name, snapshot=False, guarantee=guarantee)
        return self.vol(name)

    async def delete(self, name: str) -> None:
        await self.release(name)
        await self.pool.delete_volume(name)

    def names(self) -> list[str]:
        return [v.name for v in self.pool.live_volumes()]

    # -- checking -----------------------------------------------------------------------

    async def check(self) -> CheckReport:
        return await self.pool.check()

    async def assert_clean(self) -> CheckReport:
        report = await self.pool.check()
        assert report.ok, "pool check found problems:\n" + "\n".join(report.problems)
        assert report.leaked_chunks == 0 and report.leaked_pages == 0
        return report


def describe_diff(want: bytes | bytearray, got: bytes | bytearray, chunk: int,
                  limit: int = 4) -> str:
    """Where two equal-length byte strings differ, by chunk (for assertion messages)."""
    assert len(want) == len(got)
    out: list[str] = []
    for start in range(0, len(want), chunk):
        a, b = want[start:start + chunk], got[start:start + chunk]
        if a != b:
            first = next(i for i in range(len(a)) if a[i] != b[i])
            out.append(f"chunk {start // chunk} (byte {start + first}): want "
                       f"{bytes(a[first:first + 8]).hex()} got {bytes(b[first:first + 8]).hex()}")
            if len(out) >= limit:
                out.append("...")
                break
    return "; ".join(out)


def zero_runs(flags_extents: Sequence[StatusExtent], mask: int) -> list[tuple[int, int]]:
    """(offset, length) of the extents whose flags have any bit of `mask`."""
    out: list[tuple[int, int]] = []
    pos = 0
    for n, flags in flags_extents:
        if flags & mask:
            out.append((pos, n))
        pos += n
    return out


# -- the pytest fixture (imported by the conftest files) ----------------------------------


@pytest.fixture
async def make_pool(tmp_path: Path) -> AsyncIterator[PoolFactory]:
    """``env = await make_pool("radix", chunk_size=16384, offline=False)``: a pool of that
    design in a new file under tmp_path, open; every one is shut down at teardown."""
    envs: list[PoolEnv] = []

    async def make(design: str, **kwargs: Any) -> PoolEnv:
        env = PoolEnv(tmp_path / f"pool{len(envs)}.img", design, **kwargs)
        envs.append(env)
        return await env.open()

    yield make
    for env in envs:
        await env.shutdown()


class HoldingEngine:
    """An I/O engine wrapper that can hold back reads of a device range (timing faults).

    ``hold(start, end)`` makes every later read overlapping [start, end) wait, not
    issued to the device, until ``release()``: the read then really happens, late,
    as a slow device (or the kernel's reordering) may do; ``hold_writes(start, end)``
    does the same for writes. Everything else goes straight to the real engine.
    Install with ``pool.engine = HoldingEngine(...)`` before making the backends
    (they keep the pool's engine).
    """

    def __init__(self, engine: IoEngine) -> None:
        self._engine = engine
        self._range: tuple[int, int] | None = None
        self._write_range: tuple[int, int] | None = None
        self.held: list[tuple[Any, ...]] = []
        self.held_writes: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def hold(self, start: int, end: int) -> None:
        self._range = (start, end)

    def hold_writes(self, start: int, end: int) -> None:
        self._write_range = (start, end)

    def write(self, fd: int, buf: Any, buf_offset: int, length: int, offset: int,
              callback: Callable[[int], None], dsync: bool = False) -> None:
        rng = self._write_range
        if rng is not None and offset < rng[1] and rng[0] < offset + length:
            self.held_writes.append((fd, buf, buf_offset, length, offset, callback, dsync))
            return
        self._engine.write(fd, buf, buf_offset, length, offset, callback, dsync)

    async def awrite(self, fd: int, buf: Any, buf_offset: int, length: int, offset: int,
                     dsync: bool = False) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.write(fd, buf, buf_offset, length, offset,
                   lambda res: fut.done() or fut.set_result(res),  # type: ignore[func-returns-value]
                   dsync)
        self._engine.kick()
        res = await fut
        if res < 0:
            raise OSError(-res, f"write at {offset}")
        return res

    def read(self, fd: int, buf: Any, buf_offset: int, length: int, offset: int,
             callback: Callable[[int], None]) -> None:
        rng = self._range
        if rng is not None and offset < rng[1] and rng[0] < offset + length:
            self.held.append((fd, buf, buf_offset, length, offset, callback))
            return
        self._engine.read(fd, buf, buf_offset, length, offset, callback)

    async def aread(self, fd: int, buf: Any, buf_offset: int, length: int, offset: int) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.read(fd, buf, buf_offset, length, offset,
                  lambda res: fut.done() or fut.set_result(res))  # type: ignore[func-returns-value]
        self._engine.kick()
        res = await fut
        if res < 0:
            raise OSError(-res, f"read at {offset}")
        return res

    def release(self) -> None:
        self._range = self._write_range = None
        held, self.held = self.held, []
        for args in held:
            self._engine.read(*args)
        writes, self.held_writes = self.held_writes, []
        for args in writes:
            self._engine.write(*args)
        self._engine.kick()


# -- living with `from conftest import ...` -------------------------------------------------
#
# Test directories have no __init__.py, so pytest imports every conftest.py as the module
# "conftest", and a test elsewhere that does `from conftest import X` (meaning
# tests/conftest.py) gets whichever conftest was imported last. The conftest files of
# tests/pool and tests/blockmap hand such lookups on to tests/conftest.py (PEP 562
# module __getattr__), so that they break no other directory's tests.

ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
_config: Any = None


def remember_config(config: Any) -> None:
    global _config
    _config = config


def root_conftest_attr(name: str) -> Any:
    """`name` from tests/conftest.py (the module pytest loaded), for a sub-conftest's
    module ``__getattr__``."""
    if name.startswith(("pytest_", "__")) or _config is None:
        raise AttributeError(name)
    for plugin in _config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if isinstance(path, str) and Path(path).resolve() == ROOT_CONFTEST:
            return getattr(plugin, name)
    raise AttributeError(name)
