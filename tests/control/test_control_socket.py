"""The control socket of a running server: the CLI's way into a pool a server has open."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import pytest
from conftest import SERVER_CMD, ServerFactory, run

from nbdserver.control.socket import MAX_REQUEST, call, socket_path
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
                     b'{"op": "volume.info", "args": {}}\n', b'{"args": {}}\n', b"[1]\n",
                     b'{"op": "pool.info", "args": "x"}\n'):
            s.sendall(line)
            replies.append(json.loads(s.makefile().readline()))
        # A line longer than the limit: an error, then the connection closes.
        s.sendall(b'{"op": "' + b"x" * (MAX_REQUEST + 10) + b'"}\n')
        replies.append(json.loads(s.makefile().readline()))
    assert [r["ok"] for r in replies] == [False] * 8
    assert "bad request" in replies[0]["error"]
    assert "unknown operation" in replies[2]["error"]
    assert "missing the argument 'name'" in replies[3]["error"]
    assert '"op"' in replies[4]["error"] and '"op"' in replies[5]["error"]
    assert "args an object" in replies[6]["error"]
    assert f"longer than {MAX_REQUEST} bytes" in replies[7]["error"]
    srv.assert_alive()
    srv.stop()


@pytest.mark.parametrize(("op", "args", "needle"), [
    ("volume.create", {"name": "x", "size": "1G"}, "'size' of 'volume.create' must be an integer"),
    ("volume.create", {"name": "x", "size": None}, "missing the argument 'size'"),
    ("volume.create", {"name": "x", "size": 4096.9}, "must be an integer, not 4096.9"),
    ("volume.create", {"name": "x", "size": 2 ** 64}, "'size' of 'volume.create' is too large"),
    ("volume.create", {"name": "x", "size": -1}, "'size' of 'volume.create' must be at least 1"),
    ("volume.create", {"name": "x", "size": 0}, "'size' of 'volume.create' must be at least 1"),
    ("volume.create", {"name": "x", "size": True}, "must be an integer, not True"),
    ("volume.create", {"name": 123, "size": 4096}, "'name' of 'volume.create' must be a string"),
    ("volume.create", {"name": "x", "size": 4096, "guarantee": "false"},
     "'guarantee' of 'volume.create' must be true or false, not 'false'"),
    ("volume.create", {"name": "x", "size": 4096, "extra": 1},
     "'volume.create' has no argument 'extra' (valid: name, size, guarantee)"),
    ("volume.fork", {"source": "v", "name": "f", "guarantee": 1}, "must be true or false"),
    ("volume.defrag", {"name": "v", "start": "abc"}, "'start' of 'volume.defrag' must be an"),
    ("volume.defrag", {"name": "v", "limit": -1}, "'limit' of 'volume.defrag' must be at least 1"),
    ("volume.defrag", {"name": "v", "progress": "x"}, "'progress' of 'volume.defrag' cannot be"),
])
def test_bad_arguments_are_named_and_change_nothing(nbd_server_factory: ServerFactory,
                                                    tmp_path: Path, op: str,
                                                    args: dict[str, object], needle: str) -> None:
    srv, pool = _pool_server(nbd_server_factory, tmp_path)
    path = socket_path(read_superblock(pool).uuid_str)
    with pytest.raises(UserError) as err:
        call(path, op, args)
    assert needle in str(err.value), str(err.value)
    assert [v["name"] for v in call(path, "volume.list", {})] == ["v"]
    srv.assert_alive()
    assert "Traceback" not in srv.stderr
    srv.stop()
