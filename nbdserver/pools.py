"""The pools a server has open, and the volume exports made from them.

Pools named in the config are opened (created first when ``create`` says how
and the path does not exist) when the server starts, and closed (committed and
checkpointed) when it stops. An export of a pool volume may create its volume
on first start: empty, or as a fork or snapshot of another volume.

An export with ``volumes: PATTERN`` serves every volume of its pool whose
name matches, under that name, as the pool holds them when a client asks
(:class:`VolumeExports`): a volume created, forked or snapshotted through the
control socket can be connected to at once, with no restart. Its backend is
opened when the first connection to it starts transmission and closed once the
last has ended with nothing in flight; meanwhile it is in use (not deletable).

A pool is created in a worker thread: zero-filling a large file
(``preallocate: full``) takes minutes, and the event loop must meanwhile take
signals. A stop asked for then (:attr:`OpenPools.stopping`) ends the fill
between two writes; the half-made file is removed, and the start is cancelled
(:class:`StartCancelled`), not failed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import partial

from nbdserver.backend.base import Backend
from nbdserver.config import Config, ExportConfig, PoolConfig, made_by_serve
from nbdserver.control.socket import ControlServer
from nbdserver.errors import StartCancelled, UserError
from nbdserver.exports import export_info
from nbdserver.pool.format import VolumeRecord
from nbdserver.pool.pool import SERVER_LOCK_WAIT_SECONDS, Pool
from nbdserver.protocol import ExportInfo
from nbdserver.sizes import format_size, not_whole_blocks
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.engine import IoEngine
from nbdserver.volume import VOLUME_CONTEXTS, VolumeBackend, preferred_block

log = logging.getLogger(__name__)

ZERO_FILL_LOG_SECONDS = 10.0  # between log lines while a new pool file is zero-filled


class _FillStopped(Exception):
    """Raised into a pool's creation (between two writes of its zero fill) by a stop."""


class OpenPools:
    """Pools by config name."""

    def __init__(self, config: Config, engine: IoEngine, buffers: BufferPool,
                 served_as: Callable[[Pool, str], tuple[str | None, bool, str]] | None = None,
                 ) -> None:
        self.config = config
        self.served_as = served_as  # (see ControlServer.served_as)
        self.engine = engine
        self.buffers = buffers
        self.stopping = threading.Event()  # a stop asked for while starting (module note)
        self.pools: dict[str, Pool] = {}
        self.controls: list[ControlServer] = []

    async def open_all(self) -> None:
        for pc in self.config.pools:
            pool = await self._open(pc)
            self.pools[pc.name] = pool
            served_as = self.served_as
            control = ControlServer(pool, None if served_as is None
                                    else partial(served_as, pool))
            await control.start()
            self.controls.append(control)
            log.info("pool %s: control socket %s", pc.name, control.path)

    async def _open(self, pc: PoolConfig) -> Pool:
        if pc.create is not None and made_by_serve(pc.path):
            log.info("creating pool %s at %s (%s, %s%s)", pc.name, pc.path,
                     pc.create.blockmap, format_size(pc.create.size),
                     ", writing zeros over it" if pc.create.preallocate == "full" else "")
            shown = [time.monotonic()]
            stopping = self.stopping

            def progress(done: int, total: int) -> None:  # (in the worker thread)
                if stopping.is_set():
                    raise _FillStopped
                if time.monotonic() - shown[0] >= ZERO_FILL_LOG_SECONDS:
                    shown[0] = time.monotonic()
                    log.info("pool %s: %d%% zero-filled", pc.name, 100 * done // total)

            try:
                await asyncio.to_thread(partial(
                    Pool.create, pc.path, pc.create.size, blockmap=pc.create.blockmap,
                    chunk_size=pc.create.chunk_size, preallocate=pc.create.preallocate,
                    make_parents=True, progress=progress))
            except _FillStopped:
                raise StartCancelled(f"{self.config.at(pc.key + '.create')}: stopped while "
                                     f"zero-filling the new pool file {pc.path}, which is "
                                     "removed (the next start makes it again)") from None
            except UserError as e:
                raise UserError(f"{self.config.at(pc.key + '.create')}: {e}") from e
        try:
            return await Pool.open(pc.path, self.engine, self.buffers,
                                   cache_bytes=self.config.server.cache_size,
                                   lock_wait=SERVER_LOCK_WAIT_SECONDS)
        except UserError as e:
            raise UserError(f"{self.config.at(pc.key)}: {e}") from e

    async def backend(self, ec: ExportConfig) -> VolumeBackend:
        assert ec.pool is not None and ec.volume is not None
        pool = self.pools[ec.pool]
        name = ec.volume
        if not any(v.name == name for v in pool.live_volumes()):
            create = ec.create
            if create is None:
                raise UserError(f"{self.config.at(ec.key + '.volume')}: no volume {name!r} "
                                f"in pool {ec.pool!r} "
                                "(create it with 'nbdserver volume create', or give "
                                "'create: {size: ...}' in the export)")
            try:
                if create.size is not None:
                    await pool.create_volume(name, create.size)
                elif create.fork is not None:
                    await pool.clone_volume(create.fork, name, snapshot=False)
                elif create.snapshot is not None:
                    await pool.clone_volume(create.snapshot, name, snapshot=True)
            except UserError as e:
                raise UserError(f"{self.config.at(ec.key + '.create')}: {e}") from e
            log.info("created volume %r in pool %r for export %r", name, ec.pool, ec.name)
        vol = pool.volume(name)
        if vol.size % ec.min_block_size:  # (check-config does not read the catalog)
            log.warning("%s: volume %r: %s (qemu refuses to open such an export)",
                        self.config.at(ec.key + ".volume"), name,
                        not_whole_blocks(vol.size, ec.min_block_size))
        if vol.id in pool.in_use:
            raise UserError(f"{self.config.at(ec.key)}: volume {name!r} is already "
                            "exported "
                            f"({pool.in_use[vol.id]})")
        ro = " (read-only)" if ec.read_only and not vol.read_only else ""
        return VolumeBackend(pool, vol, read_only=ec.read_only, description=ec.description,
                             user=f"export {ec.name!r}{ro}")

    async def close_all(self) -> bool:
        """Stop the control sockets, commit and close every pool; False if one failed."""
        for control in self.controls:
            await control.stop()
        ok = True
        for name, pool in self.pools.items():
            try:
                await pool.close()
            except Exception as e:
                log.error("closing pool %s: %s", name, e)
                ok = False
        return ok


@dataclass
class _VolumeTraits:
    """What the handshake tells of a volume not opened yet (as its VolumeBackend would)."""

    size: int
    read_only: bool
    description: str
    preferred_block: int
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    rotational: bool = False
    meta_contexts: tuple[str, ...] = VOLUME_CONTEXTS


@dataclass
class _Served:
    """A volume a VolumeExports has open: its backend, and the connections using it."""

    backend: VolumeBackend
    info: ExportInfo
    users: int = 0


class VolumeExports:
    """The volumes of one pool whose names match a pattern, each served under its own name
    (an ExportSource; see the module note). A volume a named export serves is not one of
    them (the pool has it in use)."""

    def __init__(self, ec: ExportConfig, pool: Pool) -> None:
        assert ec.volumes is not None
        self.ec = ec
        self.pattern = ec.volumes
        self.pool = pool
        self._served: dict[str, _Served] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _find(self, name: str) -> VolumeRecord | None:
        if not fnmatchcase(name, self.pattern):
            return None
        vol = self.pool.find_volume(name)
        if vol is None or vol.id in self.pool.in_use:  # (served by a named export)
            return None
        return vol

    def _info(self, vol: VolumeRecord) -> ExportInfo:
        ec = self.ec
        traits = _VolumeTraits(size=vol.size, read_only=ec.read_only or vol.read_only,
                               description=ec.description,
                               preferred_block=preferred_block(self.pool.chunk_size))
        return export_info(vol.name, traits, min_block=ec.min_block_size)

    def lookup(self, name: str) -> ExportInfo | None:
        served = self._served.get(name)
        if served is not None:
            return served.info
        vol = self._find(name)
        return None if vol is None else self._info(vol)

    def list_exports(self) -> list[ExportInfo]:
        out = []
        pool = self.pool
        for vol in pool.live_volumes():  # (one pass: not a lookup by name per volume)
            served = self._served.get(vol.name)
            if served is not None:
                out.append(served.info)
            elif fnmatchcase(vol.name, self.pattern) and vol.id not in pool.in_use:
                out.append(self._info(vol))
        return out

    def open(self, name: str) -> tuple[Backend, Callable[[], None]]:
        served = self._served.get(name)
        if served is None:
            vol = self._find(name)
            if vol is None:  # (lookup() found it, and nothing awaited since)
                raise KeyError(name)
            ec = self.ec
            ro = ", read-only" if ec.read_only and not vol.read_only else ""
            backend = VolumeBackend(self.pool, vol, read_only=ec.read_only,
                                    description=ec.description,
                                    user=f"served to a client as export {name!r} "
                                         f"({ec.key}: volumes {self.pattern!r}{ro})")
            served = self._served[name] = _Served(backend, self._info(vol))
            log.debug("pool %s: serving volume %r (%s)", ec.pool, name, ec.key)
        served.users += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            served.users -= 1
            if served.users == 0:
                task = asyncio.ensure_future(self._close_unused(name, served))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

        return served.backend, release

    async def _close_unused(self, name: str, served: _Served) -> None:
        await served.backend.drain()
        if served.users == 0 and self._served.get(name) is served:  # (no one came back)
            served.backend.unregister()
            del self._served[name]
            log.debug("pool %s: volume %r no longer served (its last client left)",
                      self.ec.pool, name)

    async def close(self) -> None:
        while self._closing:
            await asyncio.wait(list(self._closing))
        served, self._served = self._served, {}
        for name, entry in served.items():
            try:
                await entry.backend.close()
            except Exception as e:
                log.error("closing volume %r of %s: %s", name, self.ec.key, e)
