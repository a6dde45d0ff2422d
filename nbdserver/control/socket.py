"""The control socket: JSON lines over a Unix socket, one per open pool.

Request: ``{"op": "volume.fork", "args": {"source": "golden", "name": "vm7"}}``
Reply:   ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "message"}``

The socket lives at ``$XDG_RUNTIME_DIR/nbdserver/pool-<id>.sock`` (or under
``/tmp/nbdserver-<uid>/`` without XDG_RUNTIME_DIR), so a CLI that only knows
the pool's path finds it by reading the pool's UUID and looking the file up:
``<id>`` is a digest of the UUID and of the file's device and inode numbers (a
block device's device number), so a copy of a pool file, which has the same
UUID, gets a socket of its own, and every path to one pool (symbolic links,
hard links) finds the same socket. (A digest: a socket's path must fit in 107
bytes.) Only the user who runs the server may connect: the directory must be
that user's, mode 0700. A server never takes over a socket another server
answers on, and removes only its own when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbdserver.control.ops import run_op
from nbdserver.errors import NbdError, PoolDamaged, UserError
from nbdserver.pool.pool import Pool
from nbdserver.storage.device import file_identity

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
CLIENT_TIMEOUT = 3600.0  # deleting a big volume can take a while
# Operations that only read (map walks that may take minutes): stopped when their client
# goes, checked every GONE_POLL seconds. The others, which change the pool, finish.
READ_ONLY_OPS = frozenset({"pool.info", "volume.list", "volume.info"})
GONE_POLL = 0.2
# Operations that make a volume: their answer says whether the server serves it.
MAKES_VOLUME = frozenset({"volume.create", "volume.snapshot", "volume.fork", "volume.forks"})


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "nbdserver" if base else Path(f"/tmp/nbdserver-{os.getuid()}")
    return path


def socket_path(pool_uuid: str, pool_path: Path | str) -> Path:
    """The control socket of the pool with this UUID in the file (or block device) at
    `pool_path` (see the module note)."""
    kind, a, b = file_identity(pool_path)
    digest = hashlib.sha256(f"{pool_uuid} {kind} {a}:{b}".encode()).hexdigest()[:20]
    return runtime_dir() / f"pool-{digest}.sock"


def _own_directory(path: Path) -> None:
    """Make the socket directory, or check one that exists: this user's, nobody else's
    to enter (mode 0700; a looser mode of our own directory is tightened)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise UserError(f"control socket directory {path} is not a directory of this user "
                        f"(uid {os.getuid()}); remove it, or set XDG_RUNTIME_DIR to a "
                        "directory of your own")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def _answers(path: Path) -> bool:
    """Whether a server listens on the Unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class ControlServer:
    """Serves the control socket of one open pool."""

    def __init__(self, pool: Pool,
                 served_as: Callable[[str], tuple[str | None, bool, str]] | None = None,
                 ) -> None:
        self.pool = pool
        # How clients of this server reach a volume by name: (export name, read-only, "")
        # or (None, False, why not); told with the answer of each operation that makes
        # a volume.
        self.served_as = served_as
        self.path = socket_path(pool.sb.uuid_str, pool.path)
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None  # of the socket file this server made
        self._lock = asyncio.Lock()  # one operation at a time per pool
        self._clients: set[asyncio.Task[None]] = set()
        self._running: asyncio.Task[Any] | None = None  # the client whose operation runs

    async def start(self) -> None:
        try:
            _own_directory(self.path.parent)
            if os.path.lexists(self.path):
                if _answers(self.path):
                    raise UserError(f"another server answers on the control socket "
                                    f"{self.path} of pool {self.pool.path}")
                self.path.unlink()  # a socket left by a server that was killed
            self._server = await asyncio.start_unix_server(self._client, str(self.path),
                                                           limit=MAX_REQUEST)
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
        except OSError as e:
            raise UserError(f"pool {self.pool.path}: cannot make its control socket "
                            f"{self.path}: {e.strerror or e}") from None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            while line := await reader.readline():
                reply = await self._handle(line, gone=reader.at_eof)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (asyncio.LimitOverrunError, ValueError) as e:  # a line over MAX_REQUEST
            log.warning("control socket: %s", e)
            with contextlib.suppress(ConnectionError):
                writer.write(json.dumps({"ok": False, "error": "bad request: longer than "
                                         f"{MAX_REQUEST} bytes"}).encode() + b"\n")
                await writer.drain()
        except ConnectionError as e:
            log.warning("control socket: %s", e)
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()

    async def _handle(self, line: bytes, gone: Callable[[], bool]) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or "op" not in request:
                raise ValueError("a JSON object with an \"op\" is expected")
            op = request["op"]
            args = request.get("args") or {}
            if not isinstance(op, str) or not isinstance(args, dict):
                raise ValueError("op must be a string and args an object")
        except (ValueError, TypeError) as e:
            return {"ok": False, "error": f"bad request: {e}"}
        log.info("control: %s %s", op, args)
        try:
            async with self._lock:
                if gone():  # (it waited its turn: a walk of a large map may take minutes)
                    log.info("control: %s not run: its client has gone", op)
                    return {"ok": False, "error": "the client has gone"}
                self._running = asyncio.current_task()
                try:
                    if op in READ_ONLY_OPS:
                        return await self._unless_gone(op, args, gone)
                    result = await run_op(self.pool, op, args)
                    if op in MAKES_VOLUME and self.served_as is not None:
                        result = ([self._with_served_as(r) for r in result]
                                  if isinstance(result, list) else self._with_served_as(result))
                    return {"ok": True, "result": result}
                finally:
                    self._running = None
        except PoolDamaged as e:
            log.error("control operation %s failed: %s", op, e)
            return {"ok": False, "error": str(e)}
        except UserError as e:
            return {"ok": False, "error": str(e)}
        except NbdError as e:  # an I/O error or a full pool: the message says which
            log.error("control operation %s failed: %s", op, e)
            return {"ok": False, "error": str(e)}
        except Exception as e:
            log.exception("control operation %s failed", op)
            return {"ok": False, "error": f"internal error: {e}"}

    def _with_served_as(self, made: dict[str, Any]) -> dict[str, Any]:
        """A new volume's answer, with how the server's clients reach it (served_as)."""
        assert self.served_as is not None
        export, read_only, why = self.served_as(made["name"])
        return {**made, "served_as": export, "served_read_only": read_only if export else None,
                "not_served": why or None}

    async def _unless_gone(self, op: str, args: dict[str, Any],
                           gone: Callable[[], bool]) -> dict[str, Any]:
        """Run an operation that only reads, stopping it if its client goes meanwhile (a
        Ctrl-C or a script's timeout on a walk that holds the pool's queue)."""
        task = asyncio.ensure_future(run_op(self.pool, op, args))
        try:
            while not (await asyncio.wait({task}, timeout=GONE_POLL))[0]:
                if gone():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    log.info("control: %s stopped: its client has gone", op)
                    return {"ok": False, "error": "the client has gone"}
        except asyncio.CancelledError:  # (the server is stopping)
            task.cancel()
            raise
        return {"ok": True, "result": task.result()}

    async def stop(self) -> None:
        """Stop listening and end the control connections: an operation under way
        finishes first (it holds the lock), those waiting for their turn do not run."""
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            if task is not self._running:
                task.cancel()
        async with self._lock:
            for task in list(self._clients):
                task.cancel()
            if self._clients:
                await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:  # still ours, not a successor's
                self.path.unlink()


class ServerUnreachable(UserError):
    """The pool is locked, and no server answers on its control socket."""


def call(path: Path, op: str, args: dict[str, Any], timeout: float = CLIENT_TIMEOUT) -> Any:
    """Send one operation to a running server's control socket (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as e:
            raise ServerUnreachable(
                f"the pool is in use by another process, and no server answers on its "
                f"control socket {path} ({e.strerror}): another nbdserver command (wait for "
                "it), a server exporting the file raw (a file: export), or a server that "
                "cannot be reached (one started with another XDG_RUNTIME_DIR or user, or "
                "one still starting or stopping: try again in a moment)") from e
        data = b""
        try:
            sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            while not data.endswith(b"\n"):
                part = sock.recv(1 << 16)
                if not part:
                    break
                data += part
        except OSError as e:
            raise UserError(f"lost the connection to the server during {op} ({e}); check "
                            "what was done with 'nbdserver volume list' and "
                            "'nbdserver pool check'") from None
        if not data.endswith(b"\n"):
            raise UserError(f"the server closed the control connection during {op} without "
                            "an answer; check what was done with 'nbdserver volume list' "
                            "and 'nbdserver pool check'")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise UserError(str(reply.get("error")))
    return reply.get("result")
