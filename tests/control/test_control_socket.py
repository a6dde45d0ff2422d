"""The control socket of a running server: the CLI's way into a pool a server has open."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
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
    table = run([*SERVER_CMD, "volume", "list", str(pool)]).stdout.splitlines()
    assert table[0].split()[-2:] == ["IN", "USE"], table
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows["v"].endswith("export 'v'") and rows["child"].endswith(" -"), table
    refused = run([*SERVER_CMD, "volume", "delete", str(pool), "v"], check=False)
    assert refused.returncode == 1
    assert "in use" in refused.stderr and "Traceback" not in refused.stderr
    # The server's own errors read as offline: one line, not prefixed again with the pool.
    missing = run([*SERVER_CMD, "volume", "info", str(pool), "nosuch"], check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("nbdserver: error: no volume 'nosuch'"), missing.stderr
    srv.stop()


def test_an_idle_control_connection_does_not_hold_up_or_break_a_stop(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool = _pool_server(nbd_server_factory, tmp_path)
    path = socket_path(read_superblock(pool).uuid_str, pool)
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
    path = socket_path(read_superblock(pool).uuid_str, pool)
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
    path = socket_path(read_superblock(pool).uuid_str, pool)
    with pytest.raises(UserError) as err:
        call(path, op, args)
    assert needle in str(err.value), str(err.value)
    assert [v["name"] for v in call(path, "volume.list", {})] == ["v"]
    srv.assert_alive()
    assert "Traceback" not in srv.stderr
    srv.stop()


def test_a_copy_of_a_pool_file_gets_a_control_socket_of_its_own(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """A copied pool file has the original's UUID. Served side by side, each server must
    answer for its own file: a command given one path must change that pool and no other,
    and the copy's server stopping must not take the original's socket with it."""
    a = tmp_path / "a.img"
    b = tmp_path / "b.img"
    run([*SERVER_CMD, "pool", "create", str(a), "--size", "128M"])
    run([*SERVER_CMD, "volume", "create", str(a), "g", "--size", "1M"])
    b.write_bytes(a.read_bytes())
    assert read_superblock(a).uuid_str == read_superblock(b).uuid_str
    link = tmp_path / "a-link.img"
    link.symlink_to(a)
    exports = [{"name": "g", "pool": "p", "volume": "g"}]
    srv_a = nbd_server_factory(exports, pools=[{"name": "p", "path": a}])
    srv_b = nbd_server_factory(exports, pools=[{"name": "p", "path": b}], name="other")
    uuid = read_superblock(a).uuid_str
    assert socket_path(uuid, a) != socket_path(uuid, b)
    assert socket_path(uuid, link) == socket_path(uuid, a)  # any path to the same file
    run([*SERVER_CMD, "volume", "create", str(a), "made-for-a", "--size", "1M"])
    run([*SERVER_CMD, "volume", "create", str(link), "also-a", "--size", "1M"])
    run([*SERVER_CMD, "volume", "create", str(b), "made-for-b", "--size", "1M"])
    srv_b.stop()
    assert socket_path(uuid, a).exists(), "stopping the copy's server removed a's socket"
    names_a = {v["name"] for v in json.loads(
        run([*SERVER_CMD, "volume", "list", str(a), "--json"]).stdout)}
    assert names_a == {"g", "made-for-a", "also-a"}
    srv_a.stop()
    names_b = {v["name"] for v in json.loads(
        run([*SERVER_CMD, "volume", "list", str(b), "--json"]).stdout)}
    assert names_b == {"g", "made-for-b"}


def test_the_control_socket_directory_is_kept_private_and_bad_ones_are_named(
        nbd_server_factory: ServerFactory, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """The socket directory is tightened to 0700 if it is ours and looser; a runtime
    directory the socket cannot be made in is a one-line error naming the socket."""
    runtime = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # (short: a socket path)
    request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
    (runtime / "nbdserver").mkdir(parents=True, mode=0o777)
    (runtime / "nbdserver").chmod(0o777)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    srv, pool = _pool_server(lambda *a, **k: nbd_server_factory(*a, env=env, **k), tmp_path)
    assert (runtime / "nbdserver").stat().st_mode & 0o777 == 0o700
    out = run([*SERVER_CMD, "volume", "list", str(pool), "--json"], env=env).stdout
    assert [v["name"] for v in json.loads(out)] == ["v"]
    srv.stop()
    deep = tmp_path / ("d" * 120)  # longer than a Unix socket address can be
    deep.mkdir()
    srv = nbd_server_factory([{"name": "v", "pool": "p", "volume": "v"}],
                             pools=[{"name": "p", "path": pool}], name="deep", start=False,
                             env={**os.environ, "XDG_RUNTIME_DIR": str(deep)})
    proc = run([*SERVER_CMD, "serve", "-c", str(srv.config_path)], check=False,
               env={**os.environ, "XDG_RUNTIME_DIR": str(deep)})
    assert proc.returncode != 0
    assert "control socket" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
