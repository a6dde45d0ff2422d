"""The server: opens the exports, listens, and stops cleanly.

Listeners come from the configuration, or from systemd socket activation
(``LISTEN_PID``/``LISTEN_FDS``, as libnbd's ``nbdinfo -- CMD`` and systemd
provide): when sockets are passed in, only those are used, like nbdkit and
qemu-nbd do.

Stop (SIGTERM or SIGINT): close the listeners, let every connection finish the
requests it has in flight (reading no more), flush every export, wait for the
connections to deliver their last replies and close, exit 0 (1 if a pool had
failed: see :meth:`nbdserver.pool.pool.Pool.commit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NoReturn

from nbdserver.backend.base import Backend
from nbdserver.backend.file import FileBackend
from nbdserver.config import Config, ExportConfig, Listener, creation_order
from nbdserver.errors import StartCancelled, UserError
from nbdserver.exports import Export, ExportTable, export_info
from nbdserver.pool.pool import Pool
from nbdserver.pools import OpenPools, VolumeExports
from nbdserver.protocol import ConnectionLimits
from nbdserver.server.connection import LINGER_SECONDS, NbdConnection
from nbdserver.sizes import format_size
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.device import open_device
from nbdserver.storage.engine import make_engine

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
VOLUMES_SHOWN = 8  # volume names the start-up message lists per pattern


def activation_sockets() -> list[socket.socket]:
    """Sockets passed by systemd-style socket activation, or [] (and clears the variables)."""
    pid = os.environ.get("LISTEN_PID")
    fds = os.environ.get("LISTEN_FDS")
    if not fds or pid is None or pid != str(os.getpid()):
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(fds)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


class NbdServer:
    """A running server: exports, listeners and connections."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.engine = make_engine(self.loop, config.server.io)
        self.buffers = BufferPool()
        self.exports = ExportTable()
        self.catalog = self.exports
        self.limits = ConnectionLimits()
        self.handshake_timeout = float(config.server.handshake_timeout)
        self.max_connections = config.server.max_connections
        self.refused = 0  # connections refused at max-connections, not yet logged
        self.refused_logged_at = -1e9  # (monotonic): at most one such warning a minute
        self.no_space_logged_at = -1e9  # (monotonic): ENOSPC, said once a minute
        self.connections: set[NbdConnection] = set()
        self.stopping = False  # set by stop(): a connection accepted after that is aborted
        self._listeners: list[asyncio.AbstractServer] = []
        # Started by socket activation: stdout then belongs to the program that started
        # us (nbdcopy may be writing an image there), so nothing is printed on it.
        self.activated = False
        # Unix sockets made here, with their (device, inode): a server started on the same
        # path while this one stops replaces the file, and its socket is not ours to remove.
        self._unix_paths: list[tuple[Path, tuple[int, int]]] = []
        self.uris: list[tuple[str, str]] = []  # (export name, URI)
        self.volume_uris: list[str] = []  # the URIs of a volume served by pattern
        self.pools = OpenPools(config, self.engine, self.buffers, served_as=self.served_as)
        self.started = False  # set once the exports are open (served_as answers then)

    # -- exports ----------------------------------------------------------------------

    def backend_for(self, name: str) -> tuple[Backend, Callable[[], None] | None]:
        """The backend of export `name` (which the core just looked up), and what releases
        it once the connection has ended (None for a named export)."""
        return self.exports.open(name)

    def served_as(self, pool: Pool, name: str) -> tuple[str | None, bool, str]:
        """How a client reaches volume `name` of `pool` now: (its export name, whether
        read-only, "") or (None, False, why no export serves it)."""
        if not self.started:
            return None, False, ("the server is still starting (its exports are not open "
                                 "yet): ask it with nbdinfo --list once it serves")
        mine = [s for s in self.exports.sources
                if isinstance(s, VolumeExports) and s.pool is pool]
        if not mine:
            return None, False, ("no export of this pool serves volumes by pattern "
                                 "('volumes:' in the config, docs/operations.md); a named "
                                 "export needs a restart")
        if not any(fnmatchcase(name, s.pattern) for s in mine):
            return None, False, ("its name matches no 'volumes:' pattern of this pool ("
                                 + ", ".join(repr(s.pattern) for s in mine) + ")")
        if self.exports.get(name) is not None:
            ec = self.config.export_named(name)
            return None, False, (f"the export name {name!r} is taken by "
                                 f"{ec.key if ec else 'another export'}")
        for source in self.exports.sources:
            info = source.lookup(name)
            if info is not None:
                if source in mine:
                    return name, info.read_only, ""
                key = source.ec.key if isinstance(source, VolumeExports) else "another export"
                return None, False, f"the name {name!r} is served from another pool ({key})"
        return None, False, "no export serves it"

    async def _open_export(self, ec: ExportConfig) -> Backend:
        if ec.file is not None:
            try:
                device = open_device(ec.file, read_only=ec.read_only, create_size=ec.size)
            except UserError as e:
                raise UserError(f"{self.config.at(ec.key)}: {e}") from e
            try:  # shared with other raw exports; a pool's lock (exclusive) conflicts
                fcntl.flock(device.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                device.close()
                raise UserError(f"{self.config.at(ec.key + '.file')}: {ec.file} is in use "
                                "by another process "
                                "that locks it (a server that has it open as a pool?); "
                                "a pool's volumes are exported with pool: and "
                                "volume:") from None
            return FileBackend(device, self.engine, self.buffers, description=ec.description,
                               read_only=ec.read_only)
        return await self.pools.backend(ec)

    async def open_exports(self) -> None:
        await self.pools.open_all()
        backends: dict[str, Backend] = {}
        for ec in creation_order(self.config.exports):  # a copy after what it copies
            if ec.volumes is None:
                backends[ec.key] = await self._open_export(ec)
        for ec in self.config.exports:  # (listed in config order)
            if ec.volumes is not None:
                assert ec.pool is not None
                self.exports.add_source(VolumeExports(ec, self.pools.pools[ec.pool]))
                continue
            info = export_info(ec.name, backends[ec.key], min_block=ec.min_block_size)
            self.exports.add(Export(info, backends[ec.key]))

    # -- listeners ----------------------------------------------------------------------

    def _new_connection(self) -> asyncio.Protocol:
        return NbdConnection(self)

    async def _listen_unix(self, listener: Listener) -> None:
        assert listener.path is not None
        path = listener.path
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise UserError(f"{self.config.at(listener.key)}: {path} exists and is not "
                                "a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a stale socket left by a server that died
            else:
                raise UserError(f"{self.config.at(listener.key)}: {path} is in use by "
                                "another server")
            finally:
                probe.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            srv = await self.loop.create_unix_server(self._new_connection, str(path), backlog=128)
        except OSError as e:
            raise UserError(f"{self.config.at(listener.key)}: cannot listen on {path}: "
                            f"{e.strerror or e}") from e
        made = os.stat(path)
        self._unix_paths.append((path, (made.st_dev, made.st_ino)))
        self._listeners.append(srv)
        self._add_uris(f"nbd+unix:///{{}}?socket={path}")

    async def _listen_tcp(self, listener: Listener) -> None:
        host, port = listener.host, listener.port or 0
        try:
            srv = await self.loop.create_server(self._new_connection, host, port, backlog=128,
                                                reuse_address=True)
        except OSError as e:
            why = ("address already in use" if e.errno == errno.EADDRINUSE
                   else e.strerror or str(e))
            raise UserError(f"{self.config.at(listener.key)}: cannot listen on "
                            f"{host}:{port}: {why}") from e
        self._listeners.append(srv)
        for sock in srv.sockets:
            addr = sock.getsockname()
            shown = f"[{addr[0]}]" if sock.family == socket.AF_INET6 else addr[0]
            self._add_uris(f"nbd://{shown}:{addr[1]}/{{}}")

    def _add_uris(self, template: str) -> None:
        for export in self.exports:
            self.uris.append((export.info.name, template.format(export.info.name)))
        self.volume_uris.append(template.format("VOLUME"))

    async def _listen_activated(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            if sock.family == socket.AF_UNIX:
                srv = await self.loop.create_unix_server(self._new_connection, sock=sock)
                self._add_uris(f"nbd+unix:///{{}}?socket={sock.getsockname() or '(activated)'}")
            else:
                srv = await self.loop.create_server(self._new_connection, sock=sock)
                host, port = sock.getsockname()[:2]
                self._add_uris(f"nbd://{host}:{port}/{{}}")
            self._listeners.append(srv)

    async def start(self) -> None:
        """Open every export and start listening. Raises UserError naming the key at fault."""
        socks = activation_sockets()
        await self.open_exports()
        self.started = True
        if socks:
            self.activated = True
            log.info("socket activation: serving on %d passed socket(s)", len(socks))
            await self._listen_activated(socks)
            return
        if not self.config.listen:
            raise UserError("listen: no listener configured and no socket passed by activation")
        for listener in self.config.listen:
            if listener.kind == "unix":
                await self._listen_unix(listener)
            else:
                await self._listen_tcp(listener)

    def describe(self) -> str:
        sources = [s for s in self.exports.sources if isinstance(s, VolumeExports)]
        if not self.exports and not sources:
            return (f"nbdserver listening with the {self.engine.name} I/O engine, with no "
                    "exports configured (clients can connect but find nothing to open)")
        what = [f"{len(self.exports)} export(s)"] if self.exports else []
        if sources:
            what.append("the pool volumes that match "
                        + ("a pattern" if len(sources) == 1 else f"{len(sources)} patterns"))
        lines = [f"nbdserver serving {' and '.join(what)} with the {self.engine.name} "
                 "I/O engine; connect with:"]
        for export in self.exports:
            info = export.info
            ro = ", read-only" if info.read_only else ""
            lines.append(f"  {info.name} ({format_size(info.size)}{ro})")
            lines.extend(f"    {uri}" for name, uri in self.uris if name == info.name)
        for source in sources:
            names = [info.name for info in source.list_exports()]
            shown = ", ".join(names[:VOLUMES_SHOWN]) + (", ..." if len(names) > VOLUMES_SHOWN
                                                        else "")
            ro = ", read-only" if source.ec.read_only else ""
            lines.append(f"  any volume of pool {source.ec.pool!r} matching "
                         f"{source.pattern!r}{ro} ({len(names)} now{': ' if names else ''}"
                         f"{shown}), VOLUME standing for its name:")
            lines.extend(f"    {uri}" for uri in self.volume_uris)
        return "\n".join(lines)

    async def stop(self, grace: float | None = None) -> bool:
        """Stop accepting, finish in-flight requests (for `grace` seconds at most, the
        config's stop-timeout by default; then their connections are dropped, and the
        requests finish unanswered), flush and close every export; False if a pool could
        not be committed and closed (it had failed: see Pool.commit)."""
        if grace is None:
            grace = self.config.server.stop_timeout
        self.stopping = True
        for srv in self._listeners:
            srv.close()
        for conn in list(self.connections):
            conn.shutdown()
        waits = [conn.idle.wait() for conn in list(self.connections)]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), grace)
            except TimeoutError:
                busy = [conn for conn in self.connections if not conn.idle.is_set()]
                log.warning("stop: requests still in flight after %.0fs on %d connection(s); "
                            "dropping them (those requests finish unanswered before the "
                            "pools close)", grace, len(busy))
                for conn in busy:
                    conn.drop()
        await asyncio.sleep(0)  # let the last replies' close callbacks run
        for export in self.exports:
            try:
                await export.backend.close()
            except Exception as e:
                log.error("closing export %r: %s", export.info.name, e)
        for source in self.exports.sources:
            await source.close()
        closed = await self.pools.close_all()
        # Exiting with replies still queued in a transport would lose them.
        lost = [conn.lost.wait() for conn in list(self.connections)]
        if lost:
            try:
                await asyncio.wait_for(asyncio.gather(*lost), max(grace, LINGER_SECONDS + 1))
            except TimeoutError:
                log.warning("stop: %d connection(s) still open; exiting anyway",
                            len(self.connections))
        for path, identity in self._unix_paths:
            with contextlib.suppress(OSError):
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == identity:  # still ours, not a successor's
                    path.unlink()
        self.engine.close()
        self.buffers.clear()
        return closed


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> bool:
    """Run a server for `config` until SIGTERM, SIGINT or SIGHUP; False if a pool had failed (the
    exit status then says so, and a supervisor restarting on failure recovers it)."""
    import signal

    server = NbdServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP stops as SIGTERM does, unless it was ignored when the server started
    # (`nohup nbdserver serve &`: it is then meant to outlive the terminal).
    hup = signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
    signals = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if hup else ())
    started = False

    def requested(sig: int) -> None:
        # A second Ctrl-C means "now"; a repeated SIGTERM (a supervisor, a script) does not.
        if stop.is_set():
            if sig == signal.SIGINT:
                _exit_now()  # (does not return)
            log.info("already stopping (SIGINT exits at once)")
            return
        stop.set()
        if not started:  # (opening pools may take a while: a journal, a deletion to finish)
            server.pools.stopping.set()  # (a new pool's zero fill stops at once)
            log.info("stop requested while starting: stopping once the pools are open "
                     "(SIGINT again exits at once)")

    for sig in signals:
        loop.add_signal_handler(sig, requested, sig)
    try:
        await server.start()
    except StartCancelled as e:
        log.info("%s", e)
        await server.stop(grace=0)
        log.info("stopped")
        return True
    except BaseException:
        await server.stop(grace=0)
        raise
    started = True
    if not stop.is_set():  # (no URIs for a server already asked to stop)
        # The URIs go to stdout for a person or a script, unless stdout is not ours.
        print(server.describe(), file=sys.stderr if server.activated else sys.stdout,
              flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping: finishing in-flight requests (SIGINT again exits at once)")
    if not await server.stop():
        log.error("stopped; a pool had failed (see above): exiting with status 1")
        return False
    log.info("stopped")
    return True


def _exit_now() -> NoReturn:
    """SIGINT during a stop: exit with status 1 without waiting, as a crash would (the
    pools recover their last commit when next opened; nothing flushed is lost)."""
    log.warning("SIGINT while stopping: exiting at once, without finishing the requests in "
                "flight or committing; every pool recovers its last commit when next opened")
    logging.shutdown()
    os._exit(1)
