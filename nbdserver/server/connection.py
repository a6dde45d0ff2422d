"""One client connection: moves bytes between the socket and the sans-IO core.

All protocol decisions are in :mod:`nbdserver.protocol`; this class feeds it the
bytes it receives, hands the validated requests to the export's backend, and
writes the replies the core encodes. Requests are pipelined: each is dispatched
as soon as it is parsed, and its reply goes out when its backend completes, so
replies leave in completion order, not request order.

Flow control, so that a client cannot make the server hold unbounded memory:
no new request is taken while ``MAX_IN_FLIGHT`` requests or
``MAX_BYTES_IN_FLIGHT`` bytes of READ/WRITE payload are outstanding, or while
the transport's write buffer is over its high-water mark (the client is not
reading its replies). Then the requests already received stay unparsed in the
core's input buffer (one received chunk at most: pausing the transport alone
would not stop a chunk holding thousands of 28-byte READ headers from being
dispatched), reading from the socket pauses, and both resume as requests
complete and the write buffer drains.

Replies smaller than ``BATCH_LIMIT`` are queued and sent together once the
I/O engine has delivered the batch of completions that produced them: one
``writev`` for a dozen 4 KiB read replies instead of a dozen (measured: +10%
4 KiB random-read IOPS on a disk, +34% on a fast device, 10-28% less CPU per
I/O). Larger read replies are written at once, straight from the backend's
aligned buffers. uvloop keeps a reference to what it could not send at once
(it does not copy), so such a buffer is recycled only once the transport has
sent every byte up to the end of its reply (counted in bytes written minus
bytes still queued). That is what allows a deep write buffer
(``WRITE_HIGH_WATER``) and socket send buffer (``SEND_BUFFER``), which keep
the device busy with 1 MiB reads while earlier replies drain.

DISC (or EOF, or server stop) stops taking requests; the connection closes once
every request taken has been answered. Closing is graceful: the write side is
shut (the client reads its last replies, then EOF), and whatever the client
still sends is read and dropped until it closes its side, or until
``LINGER_SECONDS`` pass without it taking any of the replies still queued.
Closing a socket with unread input would make the kernel reset the connection,
and a reset throws away replies still in the socket's send buffer. ``lost`` is
set once the socket is closed; the server waits for it before exiting, so that
queued replies are not lost with the process. A protocol violation or
handshake timeout closes at once (a violation's error reply is sent first,
for as long as the client takes it). On server stop, requests received but
not yet taken get ESHUTDOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

from nbdserver.backend.base import Backend, ReadResult
from nbdserver.errors import NbdError
from nbdserver.protocol import (
    NEED_DATA,
    Command,
    Disconnect,
    ExportCatalog,
    ExportInfo,
    ProtocolViolation,
    Request,
    ServerConnection,
    TransmissionStarted,
)

if TYPE_CHECKING:
    from nbdserver.server.app import NbdServer

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256
MAX_BYTES_IN_FLIGHT = 64 << 20  # READ/WRITE payload bytes; one request may go over
REFUSAL_LOG_SECONDS = 60.0  # at most one "refusing connection" warning per this long
NO_SPACE_LOG_SECONDS = 60.0  # ... and one "no space" warning (a full pool fails many writes)
LINGER_SECONDS = 5.0  # how long a closing connection waits for a client making no progress
BATCH_LIMIT = 64 * 1024  # replies below this wait for the end of their completion batch
BATCH_BYTES = 256 * 1024  # a batch of small replies is sent early once it holds this much
WRITE_HIGH_WATER = 8 << 20  # queued reply bytes above which no new request is taken
SEND_BUFFER = 4 << 20  # SO_SNDBUF asked for each connection


class _CatalogSeenFrom:
    """The server's catalog as one connection's core sees it: a name no export serves is
    logged (once per connection), so that an operator can tell why a client, a VM that
    cannot find its disk, say, was refused."""

    def __init__(self, catalog: ExportCatalog, conn: NbdConnection) -> None:
        self._catalog = catalog
        self._conn = conn
        self._missed: set[str] = set()

    def lookup(self, name: str) -> ExportInfo | None:
        info = self._catalog.lookup(name)
        if info is None and name not in self._missed and len(self._missed) < 8:
            self._missed.add(name)
            log.info("%s: asked for export %r, which no export serves", self._conn.peer, name)
        return info

    def list_exports(self) -> Iterable[ExportInfo]:
        return self._catalog.list_exports()


class NbdConnection(asyncio.Protocol):
    """asyncio protocol for one client; see the module note."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.engine = server.engine
        self.core = ServerConnection(_CatalogSeenFrom(server.catalog, self), server.limits)
        self.backend: Backend | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.closing = False  # DISC or EOF seen: finish in-flight requests, then close
        self.closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._backlog = False  # requests may be waiting, unparsed, in the core
        self._processing = False
        self._peer_eof = False
        self._lingering = False  # write side shut, waiting for the client to close
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_queued = 0  # bytes of replies still queued at the last linger check
        self.lost = asyncio.Event()  # set once the socket is closed
        self._held: deque[tuple[int, ReadResult]] = deque()  # (end offset, result)
        self._out: list[bytes] = []  # small replies waiting for the end of the batch
        self._out_scheduled = False
        self._out_bytes = 0
        self._written = 0  # bytes handed to the transport so far
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.idle = asyncio.Event()  # set while no request is in flight
        self.idle.set()
        # Lets go of a backend opened for this connection (a volume served by pattern),
        # once it is closed with nothing in flight.
        self._release: Callable[[], None] | None = None
        self._contexts: tuple[tuple[int, str], ...] = ()

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"
        server = self.server
        if server.stopping:  # accepted just before the listeners closed: too late
            self.closed = True
            self.transport.abort()
            return
        if len(server.connections) >= server.max_connections:
            server.refused += 1
            now = time.monotonic()
            if now - server.refused_logged_at >= REFUSAL_LOG_SECONDS:  # no log flood
                log.warning("%s: refusing connection: %d connections already open "
                            "(max-connections)%s", self.peer, len(server.connections),
                            f"; {server.refused} refused since the last warning"
                            if server.refused > 1 else "")
                server.refused = 0
                server.refused_logged_at = now
            self.closed = True
            self.transport.abort()
            return
        self.server.connections.add(self)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        timeout = self.server.handshake_timeout
        if timeout > 0:
            self._handshake_timer = asyncio.get_running_loop().call_later(
                timeout, self._handshake_timed_out)
        self._send_core_output()
        log.debug("%s: connected", self.peer)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.closed:
            return
        core = self.core
        core.receive_data(data)
        try:
            self._process()
        finally:
            self.engine.kick()

    def eof_received(self) -> bool | None:
        self._peer_eof = True
        if self._lingering:
            assert self.transport is not None
            self.transport.close()
            return True
        if not self.closing and not self.closed:
            self.core.receive_data(b"")  # the core ends with Disconnect once drained
            self._process()
            self.engine.kick()
        if not self._backlog:
            self._begin_close()
        return True  # keep the transport open until in-flight replies are sent

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closing = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self.lost.set()
        self._held.clear()  # uvloop may still reference them: let them be garbage collected
        self.server.connections.discard(self)
        if self.in_flight == 0:
            self._let_go()
        if exc is not None:
            log.debug("%s: connection lost: %s", self.peer, exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._release_held()
        self._resume()

    # -- protocol events ------------------------------------------------------------------

    def _can_take_request(self) -> bool:
        return (self.in_flight < MAX_IN_FLIGHT and self.bytes_in_flight < MAX_BYTES_IN_FLIGHT
                and not self._writing_paused)

    def _process(self) -> None:
        core = self.core
        transport = self.transport
        assert transport is not None
        self._processing = True
        try:
            self._process_events(core, transport)
        finally:
            self._processing = False
        self._send_core_output()
        self._update_reading()

    def _process_events(self, core: ServerConnection, transport: asyncio.Transport) -> None:
        while True:
            if self.backend is not None and not self._can_take_request():
                self._backlog = True  # leave the rest in the core; see _resume
                break
            event = core.next_event()
            if event is NEED_DATA:
                self._backlog = False
                break
            out = core.data_to_send()
            if out:
                self._write(out)
            if type(event) is Request:
                self._dispatch(event)
            elif isinstance(event, TransmissionStarted):
                self._start_transmission(event)
            elif isinstance(event, Disconnect):
                self._begin_close()
                break
            elif isinstance(event, ProtocolViolation):
                log.warning("%s: closing connection: %s", self.peer, event.reason)
                self._send_core_output()
                self.closing = True
                self._close_or_abort()
                break

    def _send_core_output(self) -> None:
        out = self.core.data_to_send()
        if out and self.transport is not None and not self.closed:
            self._write(out)

    # -- output -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self._written += len(data)
        transport.write(data)
        if transport.is_closing():
            self._peer_gone()

    def _peer_gone(self) -> None:
        """A write failed (the client closed or reset the connection): the transport is
        closing and connection_lost follows. Take no more requests meanwhile: those that
        complete at once (BLOCK_STATUS, READs of holes) would otherwise go on being taken
        and answered into the void for as long as the received ones last, since no
        reply ever fills the write buffer to stop them."""
        self._writing_paused = True

    def _queue_reply(self, data: bytes) -> None:
        """Send a small reply with the others of this completion batch.

        A batch is sent early once it holds ``BATCH_BYTES``: replies that complete at once
        (READs over holes) would otherwise pile up here, out of the transport's sight
        and so of flow control, while one received chunk's requests are all taken."""
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= BATCH_BYTES:
            self._send_out()  # (the batch's own flush stays scheduled, for the rest)
        elif not self._out_scheduled:
            self._out_scheduled = True
            self.engine.after_completions(self._flush_out)

    def _flush_out(self) -> None:
        """The end of a completion batch: send its small replies."""
        self._out_scheduled = False
        self._send_out()

    def _send_out(self) -> None:
        out, self._out = self._out, []
        self._out_bytes = 0
        if out and not self.closed and self.transport is not None:
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _start_transmission(self, event: TransmissionStarted) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.backend, self._release = self.server.backend_for(event.export.name)
        self._contexts = tuple((c.id, c.name) for c in event.meta_contexts)
        log.info("%s: export %r (structured replies: %s)", self.peer, event.export.name,
                 event.structured_replies)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.backend is None and self.transport is not None:
            log.warning("%s: handshake not finished in %ss; closing", self.peer,
                        self.server.handshake_timeout)
            # abort, not close: a client that sent options and never read the replies
            # would hold its connection slot for as long as the replies stay queued
            self.closing = True
            self.transport.abort()

    # -- requests -------------------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        backend = self.backend
        assert backend is not None
        self.in_flight += 1
        if self.in_flight == 1:
            self.idle.clear()
        cmd = req.command
        if cmd == Command.READ or cmd == Command.WRITE:
            self.bytes_in_flight += req.length
        pending = self.in_flight  # (one less once this request is answered)
        try:  # (free when nothing raises: no call added to every request)
            if cmd == Command.READ:
                backend.read(req.offset, req.length, lambda r: self._read_done(req, r))
            elif cmd == Command.WRITE:
                assert req.data is not None
                backend.write(req.offset, req.data, req.fua, lambda e: self._done(req, e))
            elif cmd == Command.FLUSH:
                backend.flush(lambda e: self._done(req, e))
            elif cmd == Command.TRIM:
                backend.trim(req.offset, req.length, req.fua, lambda e: self._done(req, e))
            elif cmd == Command.WRITE_ZEROES:
                backend.zero(req.offset, req.length, may_trim=not req.no_hole,
                             fast_only=req.fast_zero, fua=req.fua,
                             done=lambda e: self._done(req, e))
            elif cmd == Command.CACHE:
                backend.cache(req.offset, req.length, lambda e: self._done(req, e))
            elif cmd == Command.BLOCK_STATUS:
                self._block_status(backend, req)
            else:  # the core only emits the commands above
                self._done(req, NbdError(22, f"unexpected command {cmd}"))
        except Exception as e:  # a bug in a backend: this request fails, not the connection
            log.error("%s: %s failed: internal error", self.peer, cmd.name, exc_info=e)
            if self.in_flight != pending:
                return  # it raised after answering: once is enough
            error = NbdError(errno.EIO, f"internal error: {e}")
            if cmd == Command.READ:
                self._read_done(req, error)
            else:
                self._done(req, error)

    def _read_done(self, req: Request, result: ReadResult | NbdError) -> None:
        if self.closed:
            if isinstance(result, ReadResult):
                result.release()
            self._finished(req)
            return
        transport = self.transport
        assert transport is not None
        if isinstance(result, NbdError):
            self._queue_reply(self.core.reply_error(req, result.errno, result.message))
        else:
            parts = self.core.reply_read(req, result.chunks)
            if req.length < BATCH_LIMIT:
                self._queue_reply(b"".join(parts))  # a copy: the buffer is free at once
                result.release()
            else:
                self._send_out()  # (the smaller replies before it go first)
                self._written += sum(len(p) for p in parts)
                transport.writelines(parts)
                self._held.append((self._written, result))
                self._release_held()
                if transport.is_closing():
                    self._peer_gone()
        self._finished(req)

    def _done(self, req: Request, error: NbdError | None) -> None:
        if not self.closed:
            assert self.transport is not None
            if error is None:
                self._queue_reply(self.core.reply_ok(req))
            else:
                if error.errno not in (errno.ENOSPC, errno.EPERM, errno.ENOTSUP):  # expected
                    log.warning("%s: %s failed: %s", self.peer, req.command.name, error)
                elif error.errno == errno.ENOSPC:  # said, but not for every write
                    now = time.monotonic()
                    server = self.server
                    if now - server.no_space_logged_at >= NO_SPACE_LOG_SECONDS:
                        server.no_space_logged_at = now
                        log.warning("%s: %s failed: %s (the first in %.0f s; others are "
                                    "not logged)", self.peer, req.command.name, error,
                                    NO_SPACE_LOG_SECONDS)
                self._queue_reply(self.core.reply_error(req, error.errno, error.message))
        self._finished(req)

    def _block_status(self, backend: Backend, req: Request) -> None:
        contexts = self._contexts
        answers: dict[int, list[tuple[int, int]]] = {}
        remaining = [len(contexts)]
        failed: list[NbdError] = []

        def one(ctx_id: int) -> object:
            def got(result: object) -> None:
                if isinstance(result, NbdError):
                    failed.append(result)
                else:
                    answers[ctx_id] = list(cast(list[tuple[int, int]], result))
                remaining[0] -= 1
                if remaining[0] == 0:
                    self._status_done(req, answers, failed)
            return got

        for ctx_id, name in contexts:
            backend.block_status(req.offset, req.length, name, one(ctx_id))  # type: ignore[arg-type]

    def _status_done(self, req: Request, answers: dict[int, list[tuple[int, int]]],
                     failed: list[NbdError]) -> None:
        if not self.closed:
            assert self.transport is not None
            if failed:
                err = failed[0]
                self._queue_reply(self.core.reply_error(req, err.errno, err.message))
            else:
                self._queue_reply(self.core.reply_block_status(req, answers))
        self._finished(req)

    def _finished(self, req: Request) -> None:
        self.in_flight -= 1
        if req.command == Command.READ or req.command == Command.WRITE:
            self.bytes_in_flight -= req.length
        if self.in_flight == 0:
            self.idle.set()
            if self.closed:
                self._let_go()
            if self.closing:
                self._close()
                return
        self._resume()

    def _let_go(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def _resume(self) -> None:
        """Take the requests left in the core (if now allowed), then resume reading."""
        if self.closing or self.closed or self._processing:
            return  # a running _process loop checks the limits itself
        if self._backlog and self._can_take_request():
            self._process()
            self.engine.kick()
        elif self._reading_paused:
            self._update_reading()

    # -- flow control and shutdown ------------------------------------------------------

    def _release_held(self) -> None:
        """Recycle the buffers of read replies the transport has sent in full."""
        held = self._held
        if not held or self.transport is None:
            return
        sent = self._written - self.transport.get_write_buffer_size()
        while held and held[0][0] <= sent:
            held.popleft()[1].release()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if self._lingering:
            want_pause = False  # read and drop until the client closes; see _close
        else:
            want_pause = self.closing or self._backlog or not self._can_take_request()
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    def _begin_close(self) -> None:
        self.closing = True
        self._backlog = False  # requests not yet taken are dropped unanswered
        if self.transport is None or self.closed:
            return
        if self.in_flight == 0:
            self._close()
        else:
            self._update_reading()

    def _close(self) -> None:
        """Close gracefully once every reply is queued; see the module note."""
        transport = self.transport
        if transport is None or self.closed or self._lingering:
            return
        self._flush_out()
        if self._peer_eof or not transport.can_write_eof():
            self._close_or_abort()
            return
        self._lingering = True
        transport.write_eof()  # after the queued replies
        self._update_reading()
        self._linger_queued = transport.get_write_buffer_size()
        self._linger_timer = asyncio.get_running_loop().call_later(
            LINGER_SECONDS, self._linger_expired)

    def _close_or_abort(self) -> None:
        """Close the transport (it sends what is queued, then closes), and abort it if the
        client makes no progress taking that for ``LINGER_SECONDS``: one that never reads
        must not keep its connection (and its max-connections slot) for good."""
        transport = self.transport
        assert transport is not None
        transport.close()
        self._linger_queued = transport.get_write_buffer_size()
        if self._linger_queued and self._linger_timer is None:
            self._linger_timer = asyncio.get_running_loop().call_later(
                LINGER_SECONDS, self._linger_expired)

    def _linger_expired(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        queued = transport.get_write_buffer_size()
        if queued and queued < self._linger_queued:  # slow, but reading: wait on
            self._linger_queued = queued
            self._linger_timer = asyncio.get_running_loop().call_later(
                LINGER_SECONDS, self._linger_expired)
            return
        transport.abort()

    def drop(self) -> None:
        """Server stop, once its grace period is over: abort the connection. Nothing more
        is sent; the requests in flight finish unanswered (a client sees no reply for
        them, never a reply for work done after the pools closed)."""
        if self.closed:
            return
        self.closed = True
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self) -> None:
        """Server stop: read no more requests; answer those already received but not yet
        taken (left in the core by flow control) with ESHUTDOWN, as the protocol asks;
        close once the ones in flight are answered."""
        if not (self.closing or self.closed) and self.backend is not None:
            self._refuse_received()
        self._begin_close()

    def _refuse_received(self) -> None:
        core = self.core
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                break
            out = core.data_to_send()
            if out:
                self._write(out)
            if type(event) is Request:
                self._queue_reply(core.reply_error(event, errno.ESHUTDOWN,
                                                   "the server is shutting down"))
            elif isinstance(event, (Disconnect, ProtocolViolation)):
                break
