"""The control socket of a running server: the CLI's way into a pool a server has open."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import pytest
from conftest import SERVER_CMD, ServerFactory, run

from nbdserver.control.socket import call, socket_path
from nbdserver.errors import UserError
from nbdserver.pool.pool import read_superblock


def _pool_server(factory: ServerFactory, tmp_path: Path):  # type: ignore[no-untyped-def]
    pool = tmp_path / "pool.img"
    return factory([{"name": "v", "pool": "p", "volume": "v", "create": {"size": "8M"}}],
                   pools=[{"name": "p", "path": pool,
                           "create": {"size": "128M", "blockmap": "radix"}}]), pool


def test_cli_goes_through_the_running_server(nbd_server_factory: ServerFactory,
                                             tmp_path: Path) -> None:
    srv, pool = _pool_server(nbd_server_factory, tmp_path)
    out = run([*SERVER_CMD, "volume", "list", str(pool), "--json"]).stdout
    (vol,) = json.loads(out)
    assert vol["name"] == "v" and vol["in_use"] == "export 'v'"  # only the server knows that
    run([*SERVER_CMD, "volume", "fork", str(pool), "v", "child"])
    names = {v["name"] for v in json.loads(
        run([*SERVER_CMD, "volume", "list", str(pool), "--json"]).stdout)}
    assert names == {"v", "child"}
    refused = run([*SERVER_CMD, "volume", "delete", str(pool), "v"], check=False)
    assert refused.returncode == 1
    assert "in use" in refused.stderr and "Traceback" not in refused.stderr
    srv.stop()


def test_an_idle_control_connection_does_not_hold_up_or_break_a_stop(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool = _pool_server(nbd_server_factory, tmp_path)
    path = socket_path(read_superblock(pool).uuid_str)
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(str(path))
    try:
        srv.signal(signal.SIGTERM)
        assert srv.wait(timeout=30) == 0
        assert "Traceback" not in srv.stderr, srv.stderr
        assert idle.recv(10) == b""  # the server closed it
    finally:
        idle.close()
    assert not path.exists()


def test_a_server_that_dies_mid_call_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def die() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()  # no answer

    thread = threading.Thread(target=die)
    thread.start()
    try:
        with pytest.raises(UserError, match="without an answer"):
            call(path, "volume.fork", {"source": "a", "name": "b"}, timeout=10)
    finally:
        thread.join()
        listener.close()


def test_bad_requests_get_an_error_not_a_hang(nbd_server_factory: ServerFactory,
                                              tmp_path: Path) -> None:
    srv, pool = _pool_server(nbd_server_factory, tmp_path)
    path = socket_path(read_superblock(pool).uuid_str)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        replies = []
        for line in (b"not json\n", b'{"op": 7}\n', b'{"op": "volume.explode"}\n',
                     b'{"op": "volume.info", "args": {}}\n'):
            s.sendall(line)
            replies.append(json.loads(s.makefile().readline()))
    assert [r["ok"] for r in replies] == [False] * 4
    assert "bad request" in replies[0]["error"]
    assert "unknown operation" in replies[2]["error"]
    assert "missing the argument 'name'" in replies[3]["error"]
    srv.assert_alive()
    srv.stop()
