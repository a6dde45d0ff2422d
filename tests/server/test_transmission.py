"""The server's transport over a real Unix socket: pipelining, DISC, EOF, bad clients.

Driven by the asyncio client in ``tests/nbdclient.py`` (written from the spec,
not from the server) against a real ``nbdserver serve`` process and a real
O_DIRECT file. The protocol core's own rules are unit-tested in tests/protocol;
these tests check what only the running server does: dispatching in parallel,
answering in completion order, closing only the offending connection, and
keeping memory bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path
from typing import cast

import pytest
import yaml
from conftest import NbdServerProcess, ServerFactory, file_export, pattern
from nbdclient import (
    NbdClient,
    NbdReplyError,
    client_flags,
    connect,
    info_payload,
    option,
    raw_handshake,
    raw_socket,
    recv_exact,
    request,
    wait_closed,
)

from nbdserver.backend.base import Backend, Done, ReadDone
from nbdserver.config import parse_config
from nbdserver.protocol import constants as c
from nbdserver.server.app import NbdServer

KiB = 1024
MiB = 1024 * KiB


def read_file(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


async def test_handshake_reports_the_export(nbd_server: NbdServerProcess) -> None:
    client = await NbdClient.connect(nbd_server.socket_path)
    try:
        assert await client.greeting() & c.FLAG_FIXED_NEWSTYLE
        await client.send(client_flags())
        assert sorted(await client.list_exports()) == ["disk", "ro"]
        await client.option(c.OPT_STRUCTURED_REPLY)
        replies = await client.option(c.OPT_GO, info_payload("disk", (c.INFO_BLOCK_SIZE,)))
        infos = {struct.unpack_from(">H", r.data)[0]: r.data for r in replies
                 if r.type == c.REP_INFO}
        size, flags = struct.unpack_from(">QH", infos[c.INFO_EXPORT], 2)
        assert size == 64 * MiB
        assert flags & c.FLAG_SEND_FLUSH and flags & c.FLAG_SEND_TRIM
        assert flags & c.FLAG_CAN_MULTI_CONN and not flags & c.FLAG_READ_ONLY
        assert struct.unpack_from(">III", infos[c.INFO_BLOCK_SIZE], 2) == (512, 4096, 32 * MiB)
    finally:
        await client.close()


async def test_pipelined_requests_are_all_answered(nbd_server: NbdServerProcess,
                                                   disk_image: Path) -> None:
    """Hundreds of requests sent at once (a 32 MiB read, 4 KiB reads, 8 KiB writes) are
    all answered once, matched by cookie, with the right data. Whether the big read is
    overtaken here depends on the device's speed; the in-process test below pins the
    ordering down."""
    client = await connect(nbd_server.socket_path, "disk")
    try:
        base = pattern(32 * MiB, seed=1)
        await client.write(0, base)
        for attempt in range(3):
            client.completion_order.clear()
            big = client.submit(c.CMD_READ, 0, 32 * MiB)
            small = [client.submit(c.CMD_READ, (i * 37 % 8000) * 4 * KiB, 4 * KiB)
                     for i in range(300)]
            writes = [client.submit(c.CMD_WRITE, 40 * MiB + i * 8 * KiB,
                                    data=pattern(8 * KiB, seed=100 * attempt + i))
                      for i in range(100)]
            await client.drain()
            results = await asyncio.wait_for(asyncio.gather(big, *small, *writes), 60)
            assert results[0] == base
            for i, data in enumerate(results[1:301]):
                off = (i * 37 % 8000) * 4 * KiB
                assert data == base[off:off + 4 * KiB], f"small read {i}"
            assert all(r is None for r in results[301:])
            assert len(client.completion_order) == 401
            assert len(set(client.completion_order)) == 401
        for i in range(100):
            off = 40 * MiB + i * 8 * KiB
            assert await client.read(off, 8 * KiB) == pattern(8 * KiB, seed=100 * attempt + i)
    finally:
        await client.close()


class HeldReads:
    """A backend that passes everything to `inner`, but holds reads of `length` bytes
    until `release` is set: a request the device is slow to finish, on demand."""

    def __init__(self, inner: Backend, length: int, release: asyncio.Event) -> None:
        self._inner = inner
        self._length = length
        self._release = release
        self._waiting: set[asyncio.Task[None]] = set()
        self.held = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def read(self, offset: int, length: int, done: ReadDone) -> None:
        if length != self._length:
            self._inner.read(offset, length, done)
            return
        self.held += 1

        async def later() -> None:
            await self._release.wait()
            self._inner.read(offset, length, done)

        task = asyncio.get_running_loop().create_task(later())
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)


async def _in_process_server(sock: Path, image: Path, size: str) -> NbdServer:
    """The server's own code in this process, started: one file export "disk" of
    `size` at `image`, on the Unix socket `sock`."""
    config = parse_config(yaml.safe_dump({
        "listen": [{"unix": str(sock)}],
        "exports": [{"name": "disk", "file": str(image), "size": size}],
    }))
    server = NbdServer(config)
    await server.start()
    return server


async def test_replies_leave_in_completion_order(tmp_path: Path) -> None:
    """The server's own code in this process, over a real socket and O_DIRECT file: a
    32 MiB read that the backend holds back does not hold back the 400 requests sent
    after it. Their replies all arrive while it is held (a server that answered in
    request order would time out here); the big read is answered last, once released."""
    sock = tmp_path / "s.sock"
    server = await _in_process_server(sock, tmp_path / "disk.img", "64M")
    release = asyncio.Event()
    try:
        export = server.exports.get("disk")
        assert export is not None
        held = HeldReads(export.backend, 32 * MiB, release)
        export.backend = cast(Backend, held)
        client = await connect(sock, "disk")
        try:
            base = pattern(32 * MiB, seed=3)
            await client.write(0, base)
            big = client.submit(c.CMD_READ, 0, 32 * MiB)
            small = [client.submit(c.CMD_READ, (i * 37 % 8000) * 4 * KiB, 4 * KiB)
                     for i in range(300)]
            writes = [client.submit(c.CMD_WRITE, 40 * MiB + i * 8 * KiB,
                                    data=pattern(8 * KiB, seed=i)) for i in range(100)]
            await client.drain()
            later = await asyncio.wait_for(asyncio.gather(*small, *writes), 30)
            assert held.held == 1 and not big.done()
            for i, data in enumerate(later[:300]):
                off = (i * 37 % 8000) * 4 * KiB
                assert data == base[off:off + 4 * KiB], f"small read {i}"
            assert all(r is None for r in later[300:])
            release.set()
            assert await asyncio.wait_for(big, 30) == base
            assert len(client.completion_order) == 401 + 1  # and the first write
            assert client.completion_order[-1] == min(client.completion_order[1:])
            for i in range(100):
                off = 40 * MiB + i * 8 * KiB
                assert await client.read(off, 8 * KiB) == pattern(8 * KiB, seed=i)
        finally:
            await client.close()
    finally:
        release.set()
        await server.stop(grace=5)


class RaisingBackend:
    """A backend that passes everything to `inner`, but raises (a bug) on a read or a
    write at `offset`, before answering."""

    def __init__(self, inner: Backend, offset: int) -> None:
        self._inner = inner
        self._offset = offset

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def read(self, offset: int, length: int, done: ReadDone) -> None:
        if offset == self._offset:
            raise RuntimeError("a bug in the backend's read")
        self._inner.read(offset, length, done)

    def write(self, offset: int, data: memoryview, fua: bool, done: Done) -> None:
        if offset == self._offset:
            raise RuntimeError("a bug in the backend's write")
        self._inner.write(offset, data, fua, done)

    def flush(self, done: Done) -> None:
        done(None)  # answered, and then a bug
        raise RuntimeError("a bug after the backend's flush answered")


async def test_a_backend_that_raises_fails_that_request_only(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """A backend raising instead of answering (a bug) gets that request EIO and a logged
    traceback; the requests around it on the same connection are answered, and the
    connection stays up."""
    sock = tmp_path / "s.sock"
    server = await _in_process_server(sock, tmp_path / "disk.img", "64M")
    try:
        export = server.exports.get("disk")
        assert export is not None
        export.backend = cast(Backend, RaisingBackend(export.backend, 1 * MiB))
        client = await connect(sock, "disk")
        try:
            data = pattern(64 * KiB, seed=9)
            await client.write(0, data)
            write = client.submit(c.CMD_WRITE, 64 * KiB, data=data)
            bad_write = client.submit(c.CMD_WRITE, 1 * MiB, data=data)
            bad_read = client.submit(c.CMD_READ, 1 * MiB, 4 * KiB)
            read = client.submit(c.CMD_READ, 0, 64 * KiB)
            await client.drain()
            results = await asyncio.wait_for(
                asyncio.gather(write, bad_write, bad_read, read, return_exceptions=True), 30)
            assert results[0] is None and results[3] == data, results
            for failed in results[1:3]:
                assert isinstance(failed, NbdReplyError) and failed.code == c.EIO, failed
            assert await client.read(0, 4 * KiB) == data[:4 * KiB]  # still connected
            await client.flush()  # answered once (a second reply would break the client)
            assert await client.read(0, 4 * KiB) == data[:4 * KiB]
            conn = next(iter(server.connections))
            assert conn.in_flight == 0, conn.in_flight
        finally:
            await client.close()
    finally:
        await server.stop(grace=5)
    assert "a bug in the backend's write" in caplog.text
    assert "a bug in the backend's read" in caplog.text


async def test_disc_with_requests_in_flight(nbd_server: NbdServerProcess,
                                            disk_image: Path) -> None:
    """Requests sent before DISC (in the same packet) are all answered, then EOF."""
    client = await connect(nbd_server.socket_path, "disk")
    writes = [client.submit(c.CMD_WRITE, i * 64 * KiB, data=pattern(64 * KiB, seed=i),
                            flags=c.CMD_FLAG_FUA if i % 7 == 0 else 0) for i in range(64)]
    reads = [client.submit(c.CMD_READ, 8 * MiB + i * 4 * KiB, 4 * KiB) for i in range(32)]
    flush = client.submit(c.CMD_FLUSH)
    client.submit(c.CMD_DISC)
    await client.drain()
    results = await asyncio.wait_for(asyncio.gather(*writes, *reads, flush), 30)
    assert results[:64] == [None] * 64
    assert results[64:96] == [bytes(4 * KiB)] * 32
    await asyncio.wait_for(client.eof.wait(), 10)
    assert client.reader_error is None
    await client.close()
    nbd_server.assert_alive()
    again = await connect(nbd_server.socket_path, "disk")
    try:
        for i in range(0, 64, 9):
            assert await again.read(i * 64 * KiB, 64 * KiB) == pattern(64 * KiB, seed=i)
    finally:
        await again.close()
    assert read_file(disk_image, 63 * 64 * KiB, 64 * KiB) == pattern(64 * KiB, seed=63)


async def test_eof_without_disc_answers_what_was_sent(nbd_server: NbdServerProcess) -> None:
    """A client that half-closes without DISC still gets every reply, then EOF."""
    client = await connect(nbd_server.socket_path, "disk")
    futs = [client.submit(c.CMD_WRITE, 1 * MiB + i * 4 * KiB, data=pattern(4 * KiB, seed=i))
            for i in range(50)]
    futs += [client.submit(c.CMD_READ, 1 * MiB, 4 * KiB)]
    await client.drain()
    client.writer.write_eof()
    results = await asyncio.wait_for(asyncio.gather(*futs), 30)
    assert results[:50] == [None] * 50
    assert len(results[50]) == 4 * KiB  # raced with write 0: either version is valid
    await asyncio.wait_for(client.eof.wait(), 10)
    assert client.reader_error is None
    await client.close()
    again = await connect(nbd_server.socket_path, "disk")
    try:
        assert await again.read(1 * MiB + 49 * 4 * KiB, 4 * KiB) == pattern(4 * KiB, seed=49)
    finally:
        await again.close()


async def test_abrupt_close_with_requests_in_flight(nbd_server: NbdServerProcess) -> None:
    """A client that vanishes with reads in flight does not upset the server."""
    for _ in range(5):
        client = await connect(nbd_server.socket_path, "disk")
        for i in range(200):
            client.submit(c.CMD_READ, (i % 64) * MiB, 256 * KiB)
        await client.drain()
        client.writer.transport.abort()
        await client.close()
    nbd_server.assert_alive()
    client = await connect(nbd_server.socket_path, "disk")
    try:
        await client.write(0, b"\x5a" * 4096)
        assert await client.read(0, 4096) == b"\x5a" * 4096
    finally:
        await client.close()


async def test_bad_request_magic_drops_only_that_connection(
        nbd_server: NbdServerProcess) -> None:
    good = await connect(nbd_server.socket_path, "disk")
    bad = await connect(nbd_server.socket_path, "disk")
    try:
        await good.write(0, b"\x11" * 4096)
        await bad.write(4096, b"\x22" * 4096)
        bad.writer.write(request(c.CMD_READ, 99, 0, 4096, magic=0x12345678))
        await bad.drain()
        await asyncio.wait_for(bad.eof.wait(), 10)  # the server closed it
        # The other connection carries on, with requests pipelined across the event.
        futs = [good.submit(c.CMD_READ, 0, 8192) for _ in range(20)]
        await good.drain()
        for data in await asyncio.wait_for(asyncio.gather(*futs), 10):
            assert data == b"\x11" * 4096 + b"\x22" * 4096
    finally:
        await good.close()
        await bad.close()
    assert "bad request magic" in nbd_server.stderr


@pytest.mark.parametrize("garbage", [
    pytest.param(b"\xff" * 64, id="flags-and-junk"),
    pytest.param(client_flags() + b"NOTMAGIC" + b"\0" * 8, id="bad-option-magic"),
    pytest.param(client_flags() + option(c.OPT_GO, b"", magic=0x1) + b"x" * 100,
                 id="bad-option-magic-2"),
])
def test_garbage_in_handshake_closes_only_that_connection(
        nbd_server: NbdServerProcess, garbage: bytes) -> None:
    keeper = raw_socket(nbd_server.socket_path)
    raw_handshake(keeper, "disk")
    s = raw_socket(nbd_server.socket_path)
    recv_exact(s, 18)
    s.sendall(garbage)
    wait_closed(s, timeout=10)  # raises on timeout: the server must close it
    s.close()
    keeper.sendall(request(c.CMD_READ, 7, 0, 512))
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(keeper, 16))
    assert (magic, error, cookie) == (c.SIMPLE_REPLY_MAGIC, 0, 7)
    assert len(recv_exact(keeper, 512)) == 512
    keeper.close()
    nbd_server.assert_alive()


@pytest.mark.parametrize("what", ["option-length", "export-name", "go-name", "info-name",
                                  "meta-name"])
def test_overlong_option_or_name_closes_only_that_connection(
        nbd_server: NbdServerProcess, what: str) -> None:
    """Over-long options and names over 4096 bytes end the connection at once (the
    server does not wait for the payload) and nothing else."""
    keeper = raw_socket(nbd_server.socket_path)
    raw_handshake(keeper, "disk")
    s = raw_socket(nbd_server.socket_path)
    recv_exact(s, 18)
    long_name = b"n" * 4097
    if what == "option-length":  # header only: the 1 GiB payload never comes
        msg = option(c.OPT_GO, length=1 << 30)
    elif what == "export-name":
        msg = option(c.OPT_EXPORT_NAME, length=len(long_name))  # header only, too
    elif what == "go-name":
        msg = option(c.OPT_GO, info_payload(long_name))
    elif what == "info-name":
        msg = option(c.OPT_INFO, info_payload(long_name))
    else:
        msg = option(c.OPT_LIST_META_CONTEXT, struct.pack(">I", len(long_name)) + long_name
                     + struct.pack(">I", 0))
    s.sendall(client_flags() + msg)
    start = time.monotonic()
    wait_closed(s, timeout=10)
    assert time.monotonic() - start < 5
    s.close()
    keeper.sendall(request(c.CMD_READ, 8, 0, 512))
    assert struct.unpack(">IIQ", recv_exact(keeper, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 8)
    recv_exact(keeper, 512)
    keeper.close()
    nbd_server.assert_alive()


def test_client_that_never_reads_replies_keeps_memory_bounded(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """A client pipelining 32 MiB READs and never reading the replies: the server must
    stop taking requests (so the client's sends block) and its RSS must stay bounded,
    instead of allocating a 32 MiB buffer for every request it received."""
    srv = nbd_server_factory([file_export("disk", tmp_path / "big.img", "256M")])
    baseline = srv.rss_bytes()
    bound = 400 * MiB

    def check_rss() -> None:
        grown = srv.rss_bytes() - baseline
        if grown > bound:  # fail at once: an unbounded server would eat the machine
            srv.kill()
            pytest.fail(f"server RSS grew by {grown >> 20} MiB (bound {bound >> 20} MiB)")

    s = raw_socket(srv.socket_path)
    raw_handshake(s, "disk")
    reqs = b"".join(request(c.CMD_READ, i, (i % 8) * 32 * MiB, 32 * MiB) for i in range(60000))
    s.settimeout(0.2)
    sent = 0
    deadline = time.monotonic() + 3
    while sent < len(reqs) and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            sent += s.send(reqs[sent:sent + 65536])
        check_rss()
    for _ in range(10):
        time.sleep(0.1)
        check_rss()
    assert sent < len(reqs), "the server kept reading requests it could not answer"
    assert sent // 28 > 100  # the server did take a good number of requests first
    s.close()
    # The server lets go of that connection and serves others.
    other = raw_socket(srv.socket_path)
    raw_handshake(other, "disk")
    other.sendall(request(c.CMD_READ, 1, 0, 4096))
    assert struct.unpack(">IIQ", recv_exact(other, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 1)
    recv_exact(other, 4096)
    other.close()
    srv.assert_alive()


async def test_pipeline_larger_than_the_in_flight_limits(nbd_server: NbdServerProcess) -> None:
    """Flow control pauses and resumes: 80 pipelined reads of 4 MiB (320 MiB of replies,
    five times what the server takes in flight at once) are all answered, correctly."""
    client = await connect(nbd_server.socket_path, "disk")
    try:
        data = pattern(4 * MiB, seed=5)
        await client.write(0, data)
        futs = [client.submit(c.CMD_READ, 0, 4 * MiB) for _ in range(80)]
        await client.drain()
        for fut in asyncio.as_completed(futs, timeout=120):
            assert await fut == data
    finally:
        await client.close()


async def test_many_connections_at_once(nbd_server: NbdServerProcess) -> None:
    async def worker(i: int) -> None:
        client = await connect(nbd_server.socket_path, "disk")
        try:
            data = pattern(64 * KiB, seed=1000 + i)
            futs = [client.submit(c.CMD_WRITE, (i * 16 + j) * 64 * KiB, data=data)
                    for j in range(16)]
            await client.drain()
            await asyncio.gather(*futs)
            await client.flush()
            for j in range(16):
                assert await client.read((i * 16 + j) * 64 * KiB, 64 * KiB) == data
            await client.disconnect()
        finally:
            await client.close()

    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(32))), 60)
    nbd_server.assert_alive()


def test_write_payload_split_into_tiny_pieces(nbd_server: NbdServerProcess) -> None:
    """A request and its payload dribbled a few bytes at a time are still understood."""
    s = raw_socket(nbd_server.socket_path)
    raw_handshake(s, "disk")
    data = pattern(8192, seed=9)
    msg = request(c.CMD_WRITE, 5, 4096, 8192, flags=c.CMD_FLAG_FUA) + data
    for i in range(0, len(msg), 7):
        s.sendall(msg[i:i + 7])
        if i < 100:
            time.sleep(0.001)  # separate segments for the header
    assert struct.unpack(">IIQ", recv_exact(s, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 5)
    s.sendall(request(c.CMD_READ, 6, 4096, 8192))
    assert struct.unpack(">IIQ", recv_exact(s, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 6)
    assert recv_exact(s, 8192) == data
    s.close()


def test_request_errors_keep_the_connection(nbd_server: NbdServerProcess) -> None:
    """Requests the server rejects get an error reply and the connection goes on."""
    s = raw_socket(nbd_server.socket_path)
    raw_handshake(s, "ro")
    s.sendall(request(c.CMD_WRITE, 1, 0, 512, data=b"x" * 512)       # read-only
              + request(c.CMD_READ, 2, 1 * MiB - 512, 1024)          # past the end
              + request(c.CMD_READ, 3, 0, 512))
    replies = {}
    for _ in range(3):
        magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
        assert magic == c.SIMPLE_REPLY_MAGIC
        replies[cookie] = error
        if cookie == 3 and error == 0:
            assert recv_exact(s, 512) == bytes(range(256)) * 2
    assert replies == {1: c.EPERM, 2: c.EINVAL, 3: 0}
    s.close()


async def test_unreachable_export_name_is_refused(nbd_server: NbdServerProcess) -> None:
    client = await NbdClient.connect(nbd_server.socket_path)
    try:
        with pytest.raises(Exception, match="0x80000006"):  # NBD_REP_ERR_UNKNOWN
            await client.handshake("no-such-export")
        # Still haggling: a good GO works on the same connection.
        replies = await client.option(c.OPT_GO, info_payload("disk"))
        assert replies[-1].type == c.REP_ACK
    finally:
        await client.close()


async def test_a_connection_accepted_as_the_server_stops_is_refused(tmp_path: Path) -> None:
    """A client accepted in the moment between the stop's start and the listeners'
    closing (its connection set up after the stop looked at the connections) is
    aborted, not served by a server whose pools are about to close."""
    sock = tmp_path / "s.sock"
    server = await _in_process_server(sock, tmp_path / "disk.img", "1M")
    try:
        before = await connect(sock, "disk")  # one already in transmission is unaffected
        server.stopping = True  # (what stop() sets first)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # no greeting: closed
        writer.close()
        assert len(server.connections) == 1  # only `before`
        assert await before.read(0, 4096) == bytes(4096)
        await before.close()
    finally:
        await server.stop(grace=5)
