"""The server process: limits, timeouts, signals, start-up errors, socket activation.

Every start-up failure must be one line naming the config key at fault and a
non-zero exit, never a traceback (``nbdserver.cli``: tracebacks are for bugs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import (
    SERVER_CMD,
    NbdServerProcess,
    ServerFactory,
    file_export,
    pattern,
    run,
    serve_once,
)
from nbdclient import (
    NbdClient,
    NbdReplyError,
    ServerClosed,
    client_flags,
    connect,
    option,
    raw_handshake,
    raw_socket,
    raw_structured_handshake,
    recv_exact,
    request,
    wait_closed,
)

from nbdserver.protocol import constants as c
from nbdserver.server.connection import LINGER_SECONDS, SEND_BUFFER, WRITE_HIGH_WATER

KiB = 1024
MiB = 1024 * KiB


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def assert_clean_error(proc: object, *needles: str, status: int | None = None) -> str:
    """A start-up failure: non-zero exit, the needles on stderr, no traceback."""
    import subprocess
    assert isinstance(proc, subprocess.CompletedProcess)
    err = proc.stderr
    assert proc.returncode != 0, f"expected failure, got exit 0\n{err}"
    if status is not None:
        assert proc.returncode == status, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in stderr:\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("nbdserver: error:")]
    assert len(errors) == 1, err
    return errors[0]


# -- limits and timeouts ----------------------------------------------------------------------


def test_handshake_timeout_closes_idle_client(nbd_server_factory: ServerFactory,
                                               tmp_path: Path) -> None:
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "1M")],
                             server={"handshake-timeout": "500ms"})
    idle = raw_socket(srv.socket_path)
    start = time.monotonic()
    recv_exact(idle, 18)
    wait_closed(idle, timeout=10)
    elapsed = time.monotonic() - start
    assert 0.4 < elapsed < 5, elapsed
    idle.close()
    # Stalled in the middle of an option: same.
    stalled = raw_socket(srv.socket_path)
    recv_exact(stalled, 18)
    stalled.sendall(struct.pack(">I", 3) + struct.pack(">Q", c.IHAVEOPT))  # half a header
    start = time.monotonic()
    wait_closed(stalled, timeout=10)
    assert time.monotonic() - start < 5
    stalled.close()
    # A client that finishes the handshake in time is not cut off later.
    ok = raw_socket(srv.socket_path)
    raw_handshake(ok, "disk")
    time.sleep(1.0)
    ok.sendall(request(c.CMD_READ, 1, 0, 512))
    assert struct.unpack(">IIQ", recv_exact(ok, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 1)
    recv_exact(ok, 512)
    ok.close()
    assert "handshake not finished" in srv.stderr


def _flood_options_without_reading(path: Path | None, count: int = 4000, *,
                                   then: bytes = b"") -> socket.socket:
    """A client that sends `count` options whose error replies (naming a long export
    name, about 4 KiB each) it never reads: they fill the socket and queue up in the
    server. With `then` (bytes sent after them), `count` must leave the server reading:
    every byte is sent, however long it takes; else sending stops after 1.5 s."""
    s = raw_socket(path)
    recv_exact(s, 18)
    name = b"x" * 4000
    go = option(c.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    blob = client_flags() + go * count + then
    s.setblocking(False)
    sent, deadline = 0, time.monotonic() + (30 if then else 1.5)
    while sent < len(blob) and time.monotonic() < deadline:
        try:
            sent += s.send(blob[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)  # the server's replies are stuck: it stopped reading
    if then:
        assert sent == len(blob), f"only {sent} of {len(blob)} bytes sent"
    assert sent > 1 * MiB, f"only {sent} bytes sent: the server stopped reading early"
    return s


def _options_that_overflow_the_socket_only() -> int:
    """How many flooding options make replies more than the server's socket holds but
    less than its write buffer takes before it stops reading (see connection.py)."""
    try:
        wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    except (OSError, ValueError):
        wmem_max = 212992
    socket_holds = 2 * min(SEND_BUFFER, wmem_max)  # (the kernel doubles what is asked)
    return (socket_holds + WRITE_HIGH_WATER // 2) // 4000 + 1


def test_handshake_timeout_frees_the_slot_of_a_client_that_never_reads(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """Closing gracefully would wait for the queued replies to be read, forever: the
    connection, and its max-connections slot, must go at the timeout."""
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "1M")],
                             server={"handshake-timeout": "2s", "max-connections": 1})
    start = time.monotonic()
    hog = _flood_options_without_reading(srv.socket_path)
    deadline = start + 30
    while "handshake not finished" not in srv.stderr:
        assert time.monotonic() < deadline, "the handshake timeout never fired"
        time.sleep(0.05)
    assert time.monotonic() - start > 1.5, "cut off before the 2 s handshake timeout"
    _handshake_once_the_slot_frees(srv.socket_path)
    hog.close()


def _handshake_once_the_slot_frees(socket_path: str | Path, wait: float = 30) -> None:
    """A greeting and the export on a new connection, tried until the server's only slot
    is free (it frees once the connection holding it is torn down)."""
    deadline = time.monotonic() + wait
    while True:
        late = raw_socket(socket_path)
        try:
            raw_handshake(late, "disk")
            return
        except (AssertionError, OSError, ServerClosed):
            assert time.monotonic() < deadline, "the slot was never freed"
            time.sleep(0.2)
        finally:
            late.close()


def test_protocol_violation_frees_the_slot_of_a_client_that_never_reads(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """The same after a protocol violation (a bad option magic): the error and the
    queued replies get LINGER_SECONDS to be taken, then the connection goes."""
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "1M")],
                             server={"max-connections": 1, "handshake-timeout": "120s"})
    hog = _flood_options_without_reading(srv.socket_path, _options_that_overflow_the_socket_only(),
                                         then=option(c.OPT_LIST, magic=0x1234))
    deadline = time.monotonic() + LINGER_SECONDS + 10
    while "closing connection" not in srv.stderr:
        assert time.monotonic() < deadline, "the server never saw the violation"
        time.sleep(0.1)
    time.sleep(LINGER_SECONDS)
    _handshake_once_the_slot_frees(srv.socket_path)  # once the linger time is over
    hog.close()


def test_write_headers_without_payloads_cost_no_memory(nbd_server_factory: ServerFactory,
                                                       tmp_path: Path) -> None:
    """Eight clients each announce a 32 MiB WRITE and send one byte of it: the server
    holds what arrived, not 256 MiB of payload buffers."""
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "64M")])
    before = srv.rss_bytes()
    clients = []
    for i in range(8):
        s = raw_socket(srv.socket_path)
        raw_handshake(s, "disk")
        s.sendall(request(c.CMD_WRITE, i, 0, 32 * MiB) + b"x")
        clients.append(s)
    time.sleep(1.0)
    grown = srv.rss_bytes() - before
    assert grown < 32 * MiB, f"the server grew by {grown >> 20} MiB"
    for s in clients:
        s.close()
    srv.assert_alive()


def _send_without_reading(s: socket.socket, blob: bytes, seconds: float) -> int:
    """Send as much of `blob` as the server takes in `seconds`, reading nothing."""
    s.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < len(blob) and time.monotonic() < deadline:
        try:
            sent += s.send(blob[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    return sent


@pytest.mark.parametrize("command", ["read", "block-status"])
def test_replies_that_complete_at_once_obey_flow_control(
        nbd_server_factory: ServerFactory, tmp_path: Path, command: str) -> None:
    """READs over a thin volume's holes and BLOCK_STATUS over its map complete at once,
    without I/O. A client that sends thousands in one go and reads none of the replies
    must find the server stops taking requests once a bounded amount of replies is
    queued, not hold all of them (8,000 60 KiB hole READs were 470 MiB). Once the
    client closes, the server drops what it had not taken: it used to go on answering
    them into the closed socket, for half a minute of CPU with BLOCK_STATUS."""
    srv = nbd_server_factory(
        [{"name": "vol", "pool": "main", "volume": "v", "create": {"size": "1G"}}],
        pools=[{"name": "main", "path": tmp_path / "pool.img", "create": {"size": "256M"}}])
    listening = _open_sockets(srv)
    s = raw_socket(srv.socket_path)
    if command == "read":
        raw_handshake(s, "vol")
        blob = b"".join(request(c.CMD_READ, i, (i % 1000) * MiB, 60 * KiB)
                        for i in range(8000))
    else:
        raw_structured_handshake(s, "vol")
        # a fragmented map, so that each reply is long: every other 4 KiB written
        writer = raw_socket(srv.socket_path)
        raw_handshake(writer, "vol")
        for i in range(2048):
            writer.sendall(request(c.CMD_WRITE, i, i * 8 * KiB, 4 * KiB) + b"x" * 4 * KiB)
            struct.unpack(">IIQ", recv_exact(writer, 16))
        writer.close()
        blob = b"".join(request(c.CMD_BLOCK_STATUS, i, 0, 16 * MiB) for i in range(8000))
    before = srv.rss_bytes()
    sent = _send_without_reading(s, blob, 5.0)
    time.sleep(0.5)
    grown = srv.rss_bytes() - before
    assert sent == len(blob), f"only {sent} bytes sent: the server stopped reading early"
    assert grown < 48 * MiB, f"the server grew by {grown >> 20} MiB holding replies"
    s.close()
    srv.assert_alive()
    deadline = time.monotonic() + 10
    while _open_sockets(srv) > listening:
        assert time.monotonic() < deadline, "the closed client's connection lives on"
        time.sleep(0.1)


def _open_sockets(srv: NbdServerProcess) -> int:
    """How many sockets the server process has open (listeners and connections)."""
    count = 0
    for fd in Path(f"/proc/{srv.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # (closed meanwhile)
            count += os.readlink(fd).startswith("socket:")
    return count


def test_max_connections(nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "1M")],
                             server={"max-connections": 2})
    first = raw_socket(srv.socket_path)
    raw_handshake(first, "disk")
    second = raw_socket(srv.socket_path)
    recv_exact(second, 18)  # still in the handshake: counts too
    third = raw_socket(srv.socket_path)
    assert wait_closed(third, timeout=10) == b"", "the third connection got a greeting"
    third.close()
    assert "max-connections" in srv.stderr
    for _ in range(20):  # a client hammering a full server does not flood the log
        extra = raw_socket(srv.socket_path)
        assert wait_closed(extra, timeout=10) == b""
        extra.close()
    assert srv.stderr.count("refusing connection") == 1, srv.stderr
    first.close()
    # Once one is gone, a new one is served (the server notices the close soon).
    deadline = time.monotonic() + 10
    while True:
        s = raw_socket(srv.socket_path)
        try:
            raw_handshake(s, "disk")
            break
        except (ServerClosed, ConnectionResetError):
            s.close()
            assert time.monotonic() < deadline, "no connection accepted after one closed"
            time.sleep(0.05)
    s.sendall(request(c.CMD_READ, 1, 0, 512))
    assert struct.unpack(">IIQ", recv_exact(s, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 1)
    s.close()
    second.close()


# -- stopping ---------------------------------------------------------------------------------


async def test_sigterm_finishes_requests_in_flight(nbd_server_factory: ServerFactory,
                                                   tmp_path: Path) -> None:
    """SIGTERM with writes in flight: every request the server took is answered with
    success; those it had received but not taken (flow control) get ESHUTDOWN, as the
    protocol asks; the rest (still in the socket) get EOF; acknowledged data is in the
    file, exit status 0."""
    image = tmp_path / "d.img"
    srv = nbd_server_factory([file_export("disk", image, "128M")])
    client = await connect(srv.socket_path, "disk")
    n, size = 400, 256 * KiB
    futs = [client.submit(c.CMD_WRITE, i * size, data=pattern(size, seed=i),
                          flags=c.CMD_FLAG_FUA if i % 2 else 0) for i in range(n)]
    # Not drained: the transport sends in the background while we wait for a reply.
    deadline = time.monotonic() + 20
    while not client.completion_order:
        assert time.monotonic() < deadline, "no reply at all"
        await asyncio.sleep(0.001)
    answered_before = len(client.completion_order)
    srv.signal(signal.SIGTERM)
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 60)
    await asyncio.wait_for(client.eof.wait(), 30)
    await client.close()
    assert client.reader_error is None, client.reader_error  # no torn reply
    acked = [i for i, r in enumerate(results) if r is None]
    refused = [r for r in results if isinstance(r, NbdReplyError)]
    others = [r for r in results if r is not None and r not in refused]
    assert all(r.code == c.ESHUTDOWN for r in refused), refused[:3]
    assert all(isinstance(r, ServerClosed) for r in others), others[:3]
    assert len(acked) > answered_before, \
        "no request was answered after SIGTERM (were any in flight?)"
    err = srv.stop()
    assert "stopped" in err
    with open(image, "rb") as f:
        for i in acked:
            f.seek(i * size)
            assert f.read(size) == pattern(size, seed=i), f"acknowledged write {i} lost"
    assert not srv.socket_path.exists(), "the Unix socket was not removed"


async def _read_replies_to_the_end(client: NbdClient,
                                   futs: list[asyncio.Future[object]]) -> list[object]:
    """Start reading replies, wait for every request's fate and the server's EOF; each
    result is the reply's data, None, an NbdReplyError, or ServerClosed (no reply)."""
    client.start_reader()
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 60)
    await asyncio.wait_for(client.eof.wait(), 30)
    await client.close()
    assert client.reader_error is None, f"torn reply: {client.reader_error!r}"
    return list(results)


def _replies_until_eof(s: socket.socket) -> Iterator[tuple[int, int]]:
    """(error, cookie) of each simple reply, until the server's clean EOF (between two
    replies); the caller reads a successful READ's data before taking the next."""
    while True:
        try:
            head = recv_exact(s, 16)
        except ServerClosed as e:
            assert "EOF after 0 of" in str(e), e
            return
        magic, error, cookie = struct.unpack(">IIQ", head)
        assert magic == c.SIMPLE_REPLY_MAGIC
        yield error, cookie


def _raw_client_of_a_written_file(factory: ServerFactory, tmp_path: Path, size: int,
                                  seed: int) -> tuple[NbdServerProcess, socket.socket, bytes]:
    """A server exporting a file of `size` bytes of pattern(seed), and a raw client in
    transmission on it (timeout 30 s); (server, socket, the file's bytes)."""
    image = tmp_path / "d.img"
    data = pattern(size, seed=seed)
    image.write_bytes(data)
    srv = factory([file_export("disk", image, None)])
    s = raw_socket(srv.socket_path, timeout=30)
    raw_handshake(s, "disk")
    return srv, s, data


def test_sigterm_refuses_requests_received_but_not_taken(nbd_server_factory: ServerFactory,
                                                        tmp_path: Path) -> None:
    """1000 READs arrive in one piece; flow control takes a few dozen and leaves the rest
    in the protocol core (their 1 MiB replies fill the socket: we do not read yet). On
    SIGTERM those are answered with ESHUTDOWN, not dropped: every request received gets
    exactly one reply."""
    srv, s, data = _raw_client_of_a_written_file(nbd_server_factory, tmp_path, 1 * MiB, 8)
    n = 1000
    s.sendall(b"".join(request(c.CMD_READ, i, 0, 1 * MiB) for i in range(n)))  # one send
    time.sleep(0.5)
    srv.signal(signal.SIGTERM)
    answered: set[int] = set()
    refused: set[int] = set()
    for error, cookie in _replies_until_eof(s):
        if error:
            assert error == c.ESHUTDOWN, error
            refused.add(cookie)
        else:
            assert recv_exact(s, 1 * MiB) == data
            answered.add(cookie)
    s.close()
    assert answered and refused and not answered & refused, (len(answered), len(refused))
    replied = answered | refused
    assert replied == set(range(len(replied))), "a request received was not answered"
    assert srv.wait(30) == 0


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_sigterm_delivers_replies_to_a_slow_reader(nbd_server_factory: ServerFactory,
                                                         tmp_path: Path, transport: str) -> None:
    """Large READ replies still queued in the server when SIGTERM arrives (the client
    is not reading yet) are delivered whole before the server exits, not cut off."""
    image = tmp_path / "d.img"
    data = pattern(32 * MiB, seed=4)
    image.write_bytes(data)
    srv = nbd_server_factory([file_export("disk", image, None)])
    if transport == "tcp":
        client = await NbdClient.connect_tcp("127.0.0.1", srv.tcp_port)
    else:
        client = await NbdClient.connect(srv.socket_path)
    await client.handshake("disk", start_reader=False)
    futs = [client.submit(c.CMD_READ, 0, 32 * MiB) for _ in range(4)]
    await client.drain()
    await asyncio.sleep(0.5)  # the server reads the disk; its replies wait for us
    srv.signal(signal.SIGTERM)
    await asyncio.sleep(1.0)
    # Tens of MiB of replies cannot fit in the socket buffers: they are still queued
    # in the server, which must wait for us rather than exit and lose them.
    assert srv.alive(), "the server exited with replies still queued"
    results = await _read_replies_to_the_end(client, futs)
    answered = [r for r in results if isinstance(r, bytes)]
    assert answered, results
    assert all(r == data for r in answered)
    # A request the server had received but not yet taken (flow control holds back
    # new work while replies wait for us) is refused with ESHUTDOWN; how many were
    # taken in the half second depends on the machine's speed.
    assert all(isinstance(r, (bytes, ServerClosed))
               or (isinstance(r, NbdReplyError) and r.code == c.ESHUTDOWN)
               for r in results), results
    srv.stop()


@pytest.mark.slow
def test_sigterm_waits_for_a_client_still_reading(nbd_server_factory: ServerFactory,
                                                  tmp_path: Path) -> None:
    """After SIGTERM, a client taking its queued replies slowly -- for longer than the
    server's linger time -- gets all of them: the server only gives up on a client
    that stops reading."""
    srv, s, data = _raw_client_of_a_written_file(nbd_server_factory, tmp_path, 32 * MiB, 6)
    s.sendall(b"".join(request(c.CMD_READ, i, 0, 32 * MiB) for i in range(4)))
    time.sleep(0.5)
    srv.signal(signal.SIGTERM)
    start = time.monotonic()
    replies = 0
    for error, _cookie in _replies_until_eof(s):
        if error:  # a request received but not yet taken when SIGTERM came
            assert error == c.ESHUTDOWN
            continue
        got = bytearray()
        while len(got) < 32 * MiB:  # about 8 MiB/s
            got += recv_exact(s, min(1 * MiB, 32 * MiB - len(got)))
            time.sleep(0.12)
        assert got == data
        replies += 1
    s.close()
    assert time.monotonic() - start > LINGER_SECONDS + 1  # it did take that long
    assert replies >= 2
    assert srv.wait(30) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_idle_server_cleanly(nbd_server_factory: ServerFactory, tmp_path: Path,
                                          sig: int) -> None:
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "1M")])
    s = raw_socket(srv.socket_path)
    raw_handshake(s, "disk")  # an idle client, in transmission
    srv.signal(sig)
    assert wait_closed(s, 5) == b""  # the server closes its side...
    s.close()  # ...and once the client closes too, it exits at once
    start = time.monotonic()
    assert srv.wait(15) == 0, srv.stderr
    assert time.monotonic() - start < LINGER_SECONDS  # it did not wait the client out
    assert "Traceback" not in srv.stderr
    assert not srv.socket_path.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_repeated_until_the_server_exits_changes_nothing(
        nbd_server_factory: ServerFactory, tmp_path: Path, sig: int) -> None:
    """A supervisor that repeats its SIGTERM (or SIGHUP) every millisecond until the
    server is gone: the server still stops cleanly with status 0. It used to die of
    one that came after the event loop closed (its handlers gone), status -15."""
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "1M")])
    deadline = time.monotonic() + 30
    sent = 0
    while srv.alive():
        assert time.monotonic() < deadline, "the server did not stop"
        with contextlib.suppress(ProcessLookupError):
            srv.signal(sig)
            sent += 1
        time.sleep(0.001)
    assert sent > 1
    assert srv.wait(5) == 0, srv.stderr
    assert "Traceback" not in srv.stderr


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_a_signal_while_starting(tmp_path: Path, twice: bool) -> None:
    """A stop asked for while the server is still opening its pools (here: waiting for
    a pool another process holds) is said at once; the server then stops without
    advertising URIs, and a second SIGINT exits at once (status 1, as a crash would)."""
    import fcntl

    from nbdserver.pool.pool import Pool

    pool = tmp_path / "p.img"
    Pool.create(pool, 64 << 20)
    config = write_config(tmp_path / "c.yaml", {
        "listen": [{"unix": str(tmp_path / "s.sock")}],
        "pools": [{"name": "main", "path": str(pool)}],
        "exports": [{"name": "v", "pool": "main", "volume": "v", "create": {"size": "1M"}}]})
    with open(pool, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the server waits for it (up to 3 s)
        proc = subprocess.Popen([sys.executable, "-m", "nbdserver", "serve", "-c", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            if twice:
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)
                assert proc.wait(5) == 1  # at once, while the pool is still held
            else:
                time.sleep(0.3)
                fcntl.flock(held, fcntl.LOCK_UN)
                assert proc.wait(15) == 0
            out, err = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "stop requested while starting" in err, err
    assert "connect with" not in out and "nbd+unix" not in out, out
    assert "Traceback" not in err, err


def test_sighup_ignored_at_start_is_left_ignored(tmp_path: Path) -> None:
    """Under `nohup` (SIGHUP ignored when the server starts) a hangup does not stop it;
    SIGTERM still does."""
    sock = tmp_path / "s.sock"
    config = write_config(tmp_path / "c.yaml", {
        "listen": [{"unix": str(sock)}],
        "exports": [{"name": "disk", "file": str(tmp_path / "d.img"), "size": "1M"}]})
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdserver", "serve", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        assert proc.stdout is not None
        assert "connect with" in proc.stdout.readline().decode()  # listening
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None, "SIGHUP stopped a server started under nohup"
        s = raw_socket(sock)
        raw_handshake(s, "disk")
        s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_client_that_ignores_shutdown_does_not_hold_the_server(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """A client that never reads nor closes: the server waits a bounded time for it."""
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "1M")])
    s = raw_socket(srv.socket_path)
    raw_handshake(s, "disk")
    half = raw_socket(srv.socket_path)  # and one stuck in the handshake
    recv_exact(half, 18)
    start = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(30) == 0, srv.stderr
    assert time.monotonic() - start < 15
    assert wait_closed(s, 5) == b""
    s.close()
    half.close()


def test_restart_after_sigkill_reuses_stale_socket(nbd_server_factory: ServerFactory,
                                                   tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    srv = nbd_server_factory([file_export("disk", image, "1M")])
    s = raw_socket(srv.socket_path)
    raw_handshake(s, "disk")
    s.sendall(request(c.CMD_WRITE, 1, 0, 4096, flags=c.CMD_FLAG_FUA, data=b"\xee" * 4096))
    assert struct.unpack(">IIQ", recv_exact(s, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 1)
    s.close()
    srv.kill()
    assert srv.socket_path.exists()  # left behind
    again = nbd_server_factory([file_export("disk", image, "1M")], name=srv.name)
    s = raw_socket(again.socket_path)
    raw_handshake(s, "disk")
    s.sendall(request(c.CMD_READ, 2, 0, 4096))
    assert struct.unpack(">IIQ", recv_exact(s, 16)) == (c.SIMPLE_REPLY_MAGIC, 0, 2)
    assert recv_exact(s, 4096) == b"\xee" * 4096
    s.close()
    again.stop()


def test_a_stopping_server_leaves_a_successor_s_socket_alone(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """A server stopping slowly (an idle client keeps it up to 5 s) has closed its
    listener, so a new server on the same path replaces the socket file and serves;
    when the old one exits it removes its own socket only, not the successor's."""
    first = nbd_server_factory([file_export("disk", tmp_path / "a.img", "1M")], tcp=False)
    s = raw_socket(first.socket_path)
    raw_handshake(s, "disk")  # idle, in transmission: the stop waits for it to close
    first.signal(signal.SIGTERM)
    assert wait_closed(s, 5) == b""  # stopping, its listener closed
    second = nbd_server_factory([file_export("disk", tmp_path / "b.img", "1M")],
                                workdir=tmp_path / "second",
                                listen=[{"unix": first.socket_path}])
    s.close()
    assert first.wait(15) == 0, first.stderr
    assert first.socket_path.exists(), "the stopping server removed its successor's socket"
    again = raw_socket(first.socket_path)
    raw_handshake(again, "disk")
    again.close()
    second.assert_alive()


def test_socket_in_use_by_another_server(nbd_server_factory: ServerFactory,
                                         tmp_path: Path) -> None:
    first = nbd_server_factory([file_export("disk", tmp_path / "a.img", "1M")], tcp=False)
    second = NbdServerProcess(tmp_path / "second",
                              [file_export("disk", tmp_path / "b.img", "1M")],
                              listen=[{"unix": first.socket_path}])
    proc = serve_once(second.config_path)
    assert_clean_error(proc, "listen[0].unix", "in use")
    first.assert_alive()
    s = raw_socket(first.socket_path)  # the first server's socket was left alone
    raw_handshake(s, "disk")
    s.close()


# -- start-up errors ------------------------------------------------------------------------


def test_tcp_port_in_use_names_the_listener(tmp_path: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        sock = tmp_path / "s.sock"
        cfg = write_config(tmp_path / "c.yaml", {
            "listen": [{"unix": str(sock)}, {"tcp": f"127.0.0.1:{port}"}],
            "exports": [{"name": "disk", "file": str(tmp_path / "d.img"), "size": "1M"}],
        })
        proc = serve_once(cfg)
        line = assert_clean_error(proc, "listen[1].tcp", "address already in use",
                                  f"127.0.0.1:{port}")
        assert line.startswith(f"nbdserver: error: {cfg}:3: listen[1].tcp")
        assert not sock.exists(), "the Unix socket opened first was left behind"
    finally:
        holder.close()


def test_missing_file_without_size_names_the_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {
        "listen": [{"unix": str(tmp_path / "s.sock")}],
        "exports": [{"name": "a", "file": str(tmp_path / "a.img"), "size": "1M"},
                    {"name": "b", "file": str(tmp_path / "missing.img")}],
    })
    proc = serve_once(cfg)
    assert_clean_error(proc, "exports[1].file", "missing.img", "does not exist", "size",
                       status=2)
    assert not (tmp_path / "missing.img").exists()


def test_unknown_key_names_it(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""\
listen:
  - unix: {tmp_path}/s.sock
server:
  max-conections: 3
exports:
  - name: disk
    file: {tmp_path}/d.img
    size: 1M
""")
    proc = serve_once(cfg)
    line = assert_clean_error(proc, "server.max-conections", "unknown key",
                              "max-connections", status=2)
    assert f"{cfg}:4:" in line  # file and line


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty.img").touch()
    cfg = write_config(tmp_path / "c.yaml", {
        "listen": [{"unix": str(tmp_path / "s.sock")}],
        "exports": [{"name": "e", "file": str(tmp_path / "empty.img")}],
    })
    assert_clean_error(serve_once(cfg), "exports[0]", "empty")


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    """A path that is not a regular file or block device (a FIFO)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cfg = write_config(tmp_path / "c.yaml", {
        "listen": [{"unix": str(tmp_path / "s.sock")}],
        "exports": [{"name": "f", "file": str(fifo), "read-only": True}],
    })
    assert_clean_error(serve_once(cfg), "exports[0]", str(fifo))


def test_o_direct_refused_is_a_clear_error(tmp_path: Path) -> None:
    """ramfs refuses O_DIRECT at open (tmpfs accepts it on current kernels): the server
    must say so, naming the export and file, and exit non-zero without a traceback."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a ramfs in a private mount namespace: run it as root "
                    "(or in a container with CAP_SYS_ADMIN)")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    image = mnt / "disk.img"
    cfg = write_config(tmp_path / "c.yaml", {
        "listen": [{"unix": str(tmp_path / "s.sock")}],
        "exports": [{"name": "disk", "file": str(image), "size": "1M"}],
    })
    server = " ".join(f"'{a}'" for a in (*SERVER_CMD, "serve", "-c", str(cfg)))
    probe = run(["unshare", "-m", "sh", "-c", f"mount -t ramfs ramfs '{mnt}' && "
                 f"stat -f -c %T '{mnt}'"], check=False)
    if probe.returncode != 0:
        pytest.fail(f"cannot mount a ramfs with unshare -m (needed for this test):\n"
                    f"{probe.stderr}")
    assert probe.stdout.strip() == "ramfs", probe.stdout
    proc = run(["unshare", "-m", "sh", "-c",
                f"mount -t ramfs ramfs '{mnt}' && exec {server}"], check=False, timeout=30)
    line = assert_clean_error(proc, "exports[0]", str(image), "O_DIRECT", status=1)
    assert "Traceback" not in proc.stdout
    assert line.startswith(f"nbdserver: error: {cfg}:4: exports[0]: "), line
    assert not image.exists()  # it was on the ramfs, gone with the namespace


# -- socket activation ------------------------------------------------------------------------


def test_socket_activation_with_nbdinfo(tmp_path: Path) -> None:
    """``nbdinfo -- [ nbdserver serve ]`` passes a listening socket with LISTEN_FDS; the
    config's own listeners are then not opened."""
    configured = tmp_path / "configured.sock"
    image = tmp_path / "d.img"
    image.write_bytes(pattern(2 * MiB, seed=3))
    cfg = write_config(tmp_path / "c.yaml", {
        "listen": [{"unix": str(configured)}],
        "exports": [{"name": "disk", "file": str(image), "description": "activated"}],
    })
    proc = run(["nbdinfo", "--json", "--", "[", *SERVER_CMD, "serve", "-c", cfg, "]"],
               timeout=60)
    info = json.loads(proc.stdout)  # the server shares nbdinfo's stdout and prints nothing
    exports = info["exports"]
    assert isinstance(exports, list) and len(exports) == 1
    assert exports[0]["export-size"] == 2 * MiB
    assert exports[0]["description"] == "activated"
    assert not configured.exists(), "a configured listener was opened under activation"
    assert "socket activation" in proc.stderr
    assert "nbdserver serving 1 export(s)" in proc.stderr  # its banner goes to stderr
    assert "Traceback" not in proc.stderr
    assert "stopped" in proc.stderr  # libnbd stopped it with a signal: clean exit


def test_socket_activation_without_listen_and_data_round_trip(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    cfg = write_config(tmp_path / "c.yaml", {
        "exports": [{"name": "disk", "file": str(image), "size": "4M"}],
    })
    src = tmp_path / "src.bin"
    src.write_bytes(pattern(4 * MiB, seed=11))
    run(["nbdcopy", "--", src, "[", *SERVER_CMD, "serve", "-c", cfg, "]"], timeout=60)
    assert image.read_bytes() == src.read_bytes()
    # and back out to nbdcopy's stdout, which the server it started shares: not a byte
    # of the server's own output may land in the copy
    out = subprocess.run(["nbdcopy", "--", "[", *SERVER_CMD, "serve", "-c", cfg, "]", "-"],
                         capture_output=True, timeout=60, check=True)
    assert out.stdout == src.read_bytes()


@pytest.mark.parametrize("listen", [None, []], ids=["missing", "empty"])
def test_check_config_warns_about_no_listen_and_serve_refuses_it_without_activation(
        tmp_path: Path, listen: list[object] | None) -> None:
    """A config without listeners is one for systemd socket activation: check-config
    accepts it with a warning; serve without activation refuses it, naming the key,
    before it creates anything."""
    config: dict[str, object] = {} if listen is None else {"listen": listen}
    config["exports"] = [{"name": "disk", "file": str(tmp_path / "d.img"), "size": "4M"}]
    cfg = write_config(tmp_path / "c.yaml", config)
    warning = "warning: listen: no listeners are configured; this config can only be " \
              "served through systemd socket activation"
    checked = run([*SERVER_CMD, "check-config", cfg], check=False)
    assert checked.returncode == 0, checked.stderr
    assert warning in checked.stdout
    assert checked.stdout.rstrip().endswith("configuration is valid")
    checked = run([*SERVER_CMD, "check-config", "--json", cfg], check=False)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["listen"] == []
    assert f"nbdserver: {warning}" in checked.stderr
    assert_clean_error(serve_once(cfg), "listen", "socket activation", status=2)
    assert not (tmp_path / "d.img").exists()


def test_unix_socket_path_too_long(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    cfg = write_config(tmp_path / "c.yaml", {
        "listen": [{"unix": str(deep / "s.sock")}],
        "exports": [{"name": "disk", "file": str(tmp_path / "d.img"), "size": "1M"}],
    })
    assert_clean_error(serve_once(cfg), "listen[0].unix")


async def test_export_name_with_spaces_and_unicode(nbd_server_factory: ServerFactory,
                                                  tmp_path: Path) -> None:
    name = "my disk é"
    srv = nbd_server_factory([file_export(name, tmp_path / "d.img", "1M")])
    client = await NbdClient.connect(srv.socket_path)
    try:
        details = await client.handshake(name)
        assert details.size == 1 * MiB
        await client.write(0, b"\x01" * 512)
        assert await client.read(0, 512) == b"\x01" * 512
    finally:
        await client.close()
    # The empty name means the first export, as with qemu-nbd and nbdkit.
    s = raw_socket(srv.socket_path)
    assert raw_handshake(s, "").size == 1 * MiB
    s.close()


def test_ipv6_tcp_listener(nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv = nbd_server_factory([file_export("disk", tmp_path / "d.img", "8M")],
                             listen=[{"tcp": "[::1]:0"}])
    uris = [line.strip() for line in srv.stdout.splitlines() if "nbd://" in line]
    assert len(uris) == 1 and uris[0].startswith("nbd://[::1]:"), srv.stdout
    assert run(["nbdinfo", "--size", uris[0]]).stdout.strip() == str(8 * MiB)
    srv.stop()


def test_an_export_may_copy_a_volume_a_later_export_creates(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """vm1 is a fork of golden, listed first: serve creates golden first, lists the exports
    in config order, and vm1 is a fork of golden."""
    pool = tmp_path / "pool.img"
    srv = nbd_server_factory(
        [{"name": "vm1", "pool": "p", "volume": "vm1", "create": {"fork": "golden"}},
         {"name": "golden", "pool": "p", "volume": "golden", "create": {"size": "1M"}}],
        pools=[{"name": "p", "path": pool, "create": {"size": "128M"}}])
    listed = json.loads(run(["nbdinfo", "--list", "--json", srv.unix_uri()]).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["vm1", "golden"]
    vols = {v["name"]: v for v in json.loads(
        run([*SERVER_CMD, "volume", "list", str(pool), "--json"]).stdout)}
    assert vols["vm1"]["parent"] == "golden" and vols["golden"]["parent"] is None
    srv.stop()


def test_a_pool_another_server_has_open_cannot_be_exported_raw(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """Served raw by a second server, a pool's file could be overwritten under the server
    that has it open (the config check only sees pools of its own config). Raw exports
    take a shared lock, which the pool's exclusive one refuses, and the other way round."""
    pool = tmp_path / "pool.img"
    owner = nbd_server_factory(
        [{"name": "v", "pool": "p", "volume": "v", "create": {"size": "1M"}}],
        pools=[{"name": "p", "path": pool, "create": {"size": "128M"}}])
    head = pool.read_bytes()[:4096]
    raw = nbd_server_factory([file_export("raw", pool, None)], name="raw", start=False)
    proc = run([*SERVER_CMD, "serve", "-c", raw.config_path], check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"exports[0].file: {pool} is in use by another process" in proc.stderr
    assert "Traceback" not in proc.stderr
    owner.stop()
    assert pool.read_bytes()[:4096] == head
    raw = nbd_server_factory([file_export("raw", pool, None, read_only=True)], name="raw2")
    busy = run([*SERVER_CMD, "volume", "create", pool, "w", "--size", "1M"], check=False)
    assert busy.returncode == 1, busy.stderr
    assert "in use by another process" in busy.stderr and "Traceback" not in busy.stderr
    assert f"error: {pool}: " in busy.stderr and "exporting the file raw" in busy.stderr
    raw.stop()
    run([*SERVER_CMD, "volume", "create", pool, "w", "--size", "1M"])  # free again


def test_serve_time_errors_name_the_config_file_and_line(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """What only serve can find (a volume gone from its pool since the config was checked,
    a socket another server listens on) is named as check-config names its errors:
    FILE:LINE: key."""
    pool = tmp_path / "pool.img"
    run([*SERVER_CMD, "pool", "create", pool, "--size", "64M"])
    owner = nbd_server_factory([file_export("f", tmp_path / "f.img", "1M")])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"listen:\n  - unix: {tmp_path / 'own.sock'}\n"
                   f"pools:\n  - name: p\n    path: {pool}\n"
                   "exports:\n  - name: vm\n    pool: p\n    volume: nosuch\n")
    proc = run([*SERVER_CMD, "serve", "-c", cfg], check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"{cfg}:9: exports[0].volume: no volume 'nosuch' in pool 'p'" in proc.stderr, \
        proc.stderr
    cfg.write_text(f"listen:\n  - unix: {owner.socket_path}\n"
                   f"exports:\n  - name: f\n    file: {tmp_path / 'g.img'}\n    size: 1M\n")
    proc = run([*SERVER_CMD, "serve", "-c", cfg], check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"{cfg}:2: listen[0].unix: {owner.socket_path} is in use by another server" \
        in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    owner.stop()


def test_a_volume_not_whole_blocks_of_its_export_is_warned_about(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """An existing volume whose size is not a multiple of its export's min-block-size
    (check-config does not read the catalog): serve says so, naming the key, and serves
    it (a client that keeps to the block size cannot reach its tail; qemu refuses it)."""
    pool = tmp_path / "pool.img"
    run([*SERVER_CMD, "pool", "create", pool, "--size", "64M"])
    run([*SERVER_CMD, "volume", "create", pool, "odd", "--size", str(8 * 1024 * 1024 + 512)])
    srv = nbd_server_factory(
        [{"name": "odd", "pool": "p", "volume": "odd", "min-block-size": 4096}],
        pools=[{"name": "p", "path": pool}])
    srv.stop()
    assert "exports[0].volume: volume 'odd': 8.00 MiB (8389120 bytes) is not a multiple of " \
        "min-block-size 4096" in srv.stderr, srv.stderr
    assert "qemu refuses to open such an export" in srv.stderr
