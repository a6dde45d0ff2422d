"""Exports of a pool's volumes by pattern (``volumes:``): what a fork made live through the
control socket gives a client at once, with no restart, and what it keeps from others."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SERVER_CMD, NbdServerProcess, ServerFactory, nbd_python, run
from nbdclient import raw_handshake, raw_socket, request

from nbdserver.control.socket import call, socket_path
from nbdserver.pool.pool import read_superblock

MiB = 1 << 20
CMD_WRITE = 1


def _served(factory: ServerFactory, tmp_path: Path, pattern: str = "vm*",
            **extra: Any) -> tuple[NbdServerProcess, Path]:
    pool = tmp_path / "pool.img"
    srv = factory([{"name": "golden", "pool": "p", "volume": "golden",
                    "create": {"size": "16M"}},
                   {"pool": "p", "volumes": pattern, **extra}],
                  pools=[{"name": "p", "path": pool,
                          "create": {"size": "256M", "blockmap": "radix"}}])
    return srv, pool


def _cli(*args: str | Path, check: bool = True) -> Any:
    return run([*SERVER_CMD, *map(str, args)], check=check)


def _names(srv: NbdServerProcess) -> list[str]:
    data = json.loads(run(["nbdinfo", "--json", "--list", srv.unix_uri()]).stdout)
    return [e["export-name"] for e in data["exports"]]


def _qemu_io(uri: str, command: str, check: bool = True, read_only: bool = False) -> Any:
    return run(["qemu-io", "-f", "raw", *(["-r"] if read_only else []), "-c", command, uri],
               check=check)


def test_a_fork_made_live_is_served_at_once_and_only_matching_volumes_are(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool = _served(nbd_server_factory, tmp_path)
    assert "any volume of pool 'p' matching 'vm*'" in srv.stdout, srv.stdout
    assert "nbd+unix:///VOLUME?socket=" in srv.stdout, srv.stdout
    _qemu_io(srv.unix_uri("golden"), "write -P 0x11 0 1M")
    assert _names(srv) == ["golden"]  # (the named export: listed once, served as before)
    made = _cli("volume", "fork", pool, "golden", "vm1")
    assert "served as export 'vm1'" in made.stdout and made.stderr == "", made
    _cli("volume", "fork", pool, "golden", "vm2")
    snap = json.loads(_cli("volume", "snapshot", pool, "golden", "vm-snap", "--json").stdout)
    assert (snap["served_as"], snap["served_read_only"], snap["not_served"]) == (
        "vm-snap", True, None), snap  # (a snapshot)
    other = _cli("volume", "fork", pool, "golden", "other")  # does not match vm*
    assert "note: the running server does not serve 'other' to NBD clients: its name " \
        "matches no 'volumes:' pattern of this pool ('vm*')" in other.stderr, other.stderr
    taken = json.loads(_cli("volume", "fork", pool, "golden", "golden-2", "--json").stdout)
    assert taken["served_as"] is None and "matches no 'volumes:' pattern" in \
        taken["not_served"]
    _cli("volume", "delete", pool, "golden-2")
    assert _names(srv) == ["golden", "vm1", "vm2", "vm-snap"]

    # Each fork sees golden's bytes, then only its own writes.
    _qemu_io(srv.unix_uri("vm1"), "write -P 0x22 0 64k")
    _qemu_io(srv.unix_uri("vm2"), "write -P 0x33 64k 64k")
    _qemu_io(srv.unix_uri("vm1"), "read -P 0x22 0 64k")
    _qemu_io(srv.unix_uri("vm1"), "read -P 0x11 64k 960k")
    _qemu_io(srv.unix_uri("vm2"), "read -P 0x11 0 64k")
    _qemu_io(srv.unix_uri("vm2"), "read -P 0x33 64k 64k")
    _qemu_io(srv.unix_uri("golden"), "read -P 0x11 0 1M")

    snap = json.loads(run(["nbdinfo", "--json", srv.unix_uri("vm-snap")]).stdout)
    assert snap["exports"][0]["is_read_only"] is True  # a snapshot is read-only
    refused = _qemu_io(srv.unix_uri("other"), "read 0 4k", check=False)
    assert refused.returncode != 0 and "unknown export 'other'" in refused.stderr, refused
    # ... and the server's log says which name a refused client asked for
    assert "asked for export 'other', which no export serves" in srv.stderr, srv.stderr


def test_a_served_volume_cannot_be_deleted_until_its_clients_leave(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool = _served(nbd_server_factory, tmp_path)
    _cli("volume", "fork", pool, "golden", "vm1")
    assert srv.socket_path is not None
    held = raw_socket(srv.socket_path)
    try:
        raw_handshake(held, "vm1")
        (vol,) = [v for v in json.loads(_cli("volume", "list", pool, "--json").stdout)
                  if v["name"] == "vm1"]
        assert vol["in_use"].startswith("served to a client as export 'vm1'"), vol
        brief = json.loads(_cli("volume", "list", pool, "--brief", "--json").stdout)
        assert [(v["name"], v["parent"], v["depth"]) for v in brief] == [
            ("golden", None, 0), ("vm1", "golden", 1)], brief
        assert brief[1]["in_use"] == vol["in_use"] and "shared_bytes" not in brief[1]
        refused = _cli("volume", "delete", pool, "vm1", check=False)
        assert refused.returncode == 1, refused
        assert "'vm1' is in use" in refused.stderr and "cannot be deleted while it is " \
            "served" in refused.stderr, refused.stderr
    finally:
        held.close()
    # A delete right after the client left (the server may not have seen it go yet) waits
    # for it, and then frees what the volume held.
    _cli("volume", "delete", pool, "vm1")
    assert _names(srv) == ["golden"]
    checked = _cli("pool", "check", pool, "--json")
    assert json.loads(checked.stdout)["ok"], checked.stdout
    # through the running server: said, since its clients wait meanwhile
    assert "note: a running server has" in checked.stderr and "every client of that " \
        "server waits until it ends" in checked.stderr, checked.stderr


def test_delete_right_after_each_client_leaves(nbd_server_factory: ServerFactory,
                                               tmp_path: Path) -> None:
    srv, pool = _served(nbd_server_factory, tmp_path)
    control = socket_path(read_superblock(pool).uuid_str, pool)
    for i in range(5):
        _cli("volume", "fork", pool, "golden", f"vm{i}")
        nbd_python("import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                   "h.pwrite(b'x' * 4096, 0)\nh.flush()\nh.shutdown()\n",
                   srv.unix_uri(f"vm{i}"))
        _cli("volume", "delete", pool, f"vm{i}")  # no sleep between
    assert srv.socket_path is not None
    for i in range(20):  # writes in flight when the client goes, and the delete at once
        call(control, "volume.fork", {"source": "golden", "name": f"vm-fast{i}"})
        held = raw_socket(srv.socket_path)
        raw_handshake(held, f"vm-fast{i}")
        held.sendall(b"".join(request(CMD_WRITE, n, n * 65536, 65536, data=b"w" * 65536)
                              for n in range(64)))
        held.close()
        assert call(control, "volume.delete", {"name": f"vm-fast{i}"})["name"] == f"vm-fast{i}"
    assert [v["name"] for v in json.loads(_cli("volume", "list", pool, "--json").stdout)] \
        == ["golden"]


def test_a_snapshot_of_a_volume_served_by_pattern_is_a_point_in_time(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool = _served(nbd_server_factory, tmp_path)
    _cli("volume", "fork", pool, "golden", "vm1")
    # One libnbd connection writes, the snapshot is taken while it stays connected, then it
    # writes again: the snapshot has the first bytes only.
    script = """import nbd, subprocess, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b'A' * 65536, 0)
h.flush()
subprocess.run(sys.argv[2:], check=True)
h.pwrite(b'B' * 65536, 0)
h.flush()
print(h.pread(512, 0)[:1].decode())
"""
    out = nbd_python(script, srv.unix_uri("vm1"), *SERVER_CMD, "volume", "snapshot",
                     str(pool), "vm1", "vm1-at-a").stdout
    assert out.strip().endswith("B")
    _qemu_io(srv.unix_uri("vm1-at-a"), "read -P 0x41 0 64k", read_only=True)
    _qemu_io(srv.unix_uri("vm1"), "read -P 0x42 0 64k")


def test_flushed_writes_to_a_volume_served_by_pattern_survive_kill_9(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool = _served(nbd_server_factory, tmp_path)
    _cli("volume", "fork", pool, "golden", "vm1")
    _qemu_io(srv.unix_uri("vm1"), "write -P 0x5a 1M 2M")  # (qemu-io flushes at close)
    srv.kill()
    srv.start()
    _qemu_io(srv.unix_uri("vm1"), "read -P 0x5a 1M 2M")
    _qemu_io(srv.unix_uri("vm1"), "read -P 0 0 1M")
    check = json.loads(_cli("pool", "check", pool, "--json").stdout)
    assert check["ok"], check


def test_read_only_pattern_and_a_stop_with_clients_connected(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    srv, pool = _served(nbd_server_factory, tmp_path, pattern="*", **{"read-only": True})
    made = _cli("volume", "fork", pool, "golden", "vm1")
    assert "served as export 'vm1', read-only" in made.stdout, made.stdout
    # golden is the named export's; "*" adds vm1 only.
    assert _names(srv) == ["golden", "vm1"]
    refused = _qemu_io(srv.unix_uri("vm1"), "write 0 4k", check=False)
    assert refused.returncode != 0
    listed = {v["name"]: v for v in json.loads(_cli("volume", "list", pool, "--json").stdout)}
    assert listed["golden"]["in_use"] == "export 'golden'", listed  # (read-write)
    assert srv.socket_path is not None
    held = raw_socket(srv.socket_path)
    try:
        raw_handshake(held, "vm1")
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 20
    finally:
        held.close()
    assert "Traceback" not in srv.stderr, srv.stderr
    check = json.loads(_cli("pool", "check", pool, "--json").stdout)
    assert check["ok"], check


@pytest.mark.parametrize(("item", "key", "needle"), [
    ({"name": "x", "pool": "p", "volumes": "*"}, "exports[0].name", "its own name"),
    ({"pool": "p", "volume": "a", "volumes": "*"}, "exports[0].volume", "not both"),
    ({"pool": "p", "volumes": "*", "create": {"size": "1M"}}, "exports[0].create",
     "volume create"),
    ({"pool": "p", "volumes": "vm/*"}, "exports[0].volumes", "not a pattern"),
    ({"pool": "q", "volumes": "*"}, "exports[0].pool", "no pool named 'q'"),
    ({"volumes": "*"}, "exports[0]", "pool"),
    ({"pool": "p", "volumes": "vm[0-9"}, "exports[0].volumes", "each [ closed"),
])
def test_bad_volumes_exports_are_named(tmp_path: Path, item: dict[str, Any], key: str,
                                       needle: str) -> None:
    from nbdserver.config import parse_config
    from nbdserver.errors import ConfigError

    text = json.dumps({"listen": [{"unix": "s.sock"}],
                       "pools": [{"name": "p", "path": "p.img", "create": {"size": "64M"}}],
                       "exports": [item]})
    with pytest.raises(ConfigError) as err:
        parse_config(text, source=tmp_path / "c.yaml")
    assert key in str(err.value) and needle in str(err.value), str(err.value)


def test_check_config_explains_a_volumes_export(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "listen: [{unix: s.sock}]\n"
        "pools: [{name: p, path: p.img, create: {size: 64M}}]\n"
        "exports:\n  - pool: p\n    volumes: 'vm-*'\n    read-only: true\n")
    out = _cli("check-config", tmp_path / "c.yaml").stdout
    assert "every volume of pool 'p'" in out and "whose name matches 'vm-*'" in out, out
    assert "read-only" in out and "[exports[0]]" in out, out
    (export,) = json.loads(_cli("check-config", tmp_path / "c.yaml", "--json").stdout)[
        "exports"]
    assert export == {"name": None, "description": "", "read-only": True,
                      "min-block-size": 512, "kind": "volumes", "file": None, "size": None,
                      "pool": "p", "volume": None, "volumes": "vm-*", "create": None,
                      "key": "exports[0]"}


@pytest.mark.parametrize(("first", "second", "overlap"), [
    ("*", "vm*", True), ("vm*", "vm*", True), ("vm*", "*-1", True), ("vm?", "vm[0-9]", True),
    ("vm-*", "web-*", False), ("vm[0-4]*", "vm[5-9]*", False), ("vm?", "vm??", False),
    ("[!v]*", "vm*", False),
])
def test_patterns_of_one_pool_that_overlap_are_refused(tmp_path: Path, first: str,
                                                      second: str, overlap: bool) -> None:
    """A volume both match would be served by the first only, with its settings (a later
    read-only: true silently ignored): refused, naming both."""
    from nbdserver.config import config_warnings, parse_config
    from nbdserver.errors import ConfigError

    text = json.dumps({"listen": [{"unix": "s.sock"}],
                       "pools": [{"name": "p", "path": "p.img", "create": {"size": "64M"}},
                                 {"name": "q", "path": "q.img", "create": {"size": "64M"}}],
                       "exports": [{"pool": "p", "volumes": first},
                                   {"pool": "q", "volumes": second},  # another pool: fine
                                   {"pool": "p", "volumes": second, "read-only": True}]})
    if not overlap:
        config = parse_config(text, source=tmp_path / "c.yaml")
        assert len(config.exports) == 3
        return
    # Across pools a name both hold is served from the first only: a warning.
    two = json.loads(text)
    two["exports"].pop()
    warnings = config_warnings(parse_config(json.dumps(two), source=tmp_path / "c.yaml"))
    assert any(w.startswith("exports[1].volumes: ") and "served from pool 'p' only" in w
               for w in warnings), warnings
    with pytest.raises(ConfigError) as err:
        parse_config(text, source=tmp_path / "c.yaml")
    message = str(err.value)
    assert "exports[2].volumes" in message and "exports[0].volumes" in message, message
    assert "served by the first only" in message, message


def test_a_bare_star_pattern_is_told_to_be_quoted(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "listen: [{unix: s.sock}]\n"
        "pools: [{name: p, path: p.img, create: {size: 64M}}]\n"
        "exports:\n  - pool: p\n    volumes: *\n")
    proc = _cli("check-config", tmp_path / "c.yaml", check=False)
    assert proc.returncode == 2 and "c.yaml:5:" in proc.stderr, proc.stderr
    assert 'quote a pattern that starts with *, as in volumes: "*"' in proc.stderr


def test_a_volume_whose_name_a_named_export_has_is_not_served_and_the_cli_says_so(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    pool = tmp_path / "pool.img"
    srv = nbd_server_factory(
        [{"name": "vm-file", "file": tmp_path / "f.img", "size": "1M"},
         {"pool": "p", "volumes": "vm*"}],
        pools=[{"name": "p", "path": pool, "create": {"size": "128M"}}])
    made = _cli("volume", "create", pool, "vm-file", "--size", "4M")
    assert "note: the running server does not serve 'vm-file' to NBD clients: the export " \
        "name 'vm-file' is taken by exports[0]" in made.stderr, made.stderr
    info = json.loads(run(["nbdinfo", "--json", srv.unix_uri("vm-file")]).stdout)
    assert info["exports"][0]["export-size"] == 1 << 20  # the file, not the volume
    assert _names(srv) == ["vm-file"]  # listed once: the named export


def test_many_forks_at_once_are_served_and_deleted_at_once(
        nbd_server_factory: ServerFactory, tmp_path: Path) -> None:
    """A honeyfarm's day: a fork per VM in one command, each served at once, and all
    deleted in one command; a failure names what was done before it."""
    srv, pool = _served(nbd_server_factory, tmp_path)
    names = [f"vm{i:03}" for i in range(40)]
    made = json.loads(_cli("volume", "fork", pool, "golden", *names, "--json").stdout)
    assert [m["name"] for m in made] == names and all(m["served_as"] == m["name"]
                                                      for m in made)
    assert _names(srv) == ["golden", *names]
    _qemu_io(srv.unix_uri("vm039"), "write -P 0x39 0 4k")
    # The names are checked before any fork is made
    failed = _cli("volume", "fork", pool, "golden", "vm100", "vm000", "vm101", check=False)
    assert failed.returncode == 1 and failed.stdout == "", failed
    assert "a volume named 'vm000' already exists" in failed.stderr, failed.stderr
    twice = _cli("volume", "fork", pool, "golden", "vm100", "vm100", check=False)
    assert twice.returncode == 1 and "the name 'vm100' is given twice" in twice.stderr
    assert _names(srv) == ["golden", *names]
    # Deletes too are checked first (a bad name deletes nothing), then done together
    failed = _cli("volume", "delete", pool, "vm000", "nosuch", "vm001", check=False)
    assert failed.returncode == 1 and failed.stdout == "", failed
    assert "no volume 'nosuch'" in failed.stderr, failed.stderr
    assert srv.socket_path is not None
    held = raw_socket(srv.socket_path)
    try:
        raw_handshake(held, "vm002")  # a client on one of them: none is deleted
        refused = _cli("volume", "delete", pool, "vm000", "vm001", "vm002", check=False)
        assert refused.returncode == 1 and "'vm002' is in use" in refused.stderr, refused
    finally:
        held.close()
    assert _names(srv) == ["golden", *names]
    freed = json.loads(_cli("volume", "delete", pool, *names, "--json").stdout)
    assert [f["name"] for f in freed] == names
    assert sum(f["freed_bytes"] for f in freed) == 4096
    assert _names(srv) == ["golden"]


async def test_served_as_before_the_exports_are_open_says_the_server_is_starting(
        tmp_path: Path) -> None:
    """The control sockets open with the pools, before the exports (a pool may take
    minutes to zero-fill meanwhile): a volume made then is not called unserved."""
    from nbdserver.config import parse_config
    from nbdserver.server.app import NbdServer

    config = parse_config(json.dumps({
        "listen": [{"unix": "s.sock"}],
        "pools": [{"name": "p", "path": "p.img", "create": {"size": "64M"}}],
        "exports": [{"pool": "p", "volumes": "*"}]}), source=tmp_path / "c.yaml")
    server = NbdServer(config)
    try:
        export, read_only, why = server.served_as(None, "vm1")  # type: ignore[arg-type]
    finally:
        server.engine.close()
    assert (export, read_only) == (None, False) and "still starting" in why, why


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.01, 0.02, 0.05])
def test_kill_9_during_a_batch_delete_deletes_all_or_none(
        nbd_server_factory: ServerFactory, tmp_path: Path, delay: float) -> None:
    """The batch is marked in one commit: after a kill -9 at any moment and a restart,
    either every volume of it is gone (the pool finishes marked deletions when it opens)
    or none is, the others' data is intact, and the pool checks clean."""
    srv, pool = _served(nbd_server_factory, tmp_path)
    names = [f"vm{i:02}" for i in range(24)]
    _cli("volume", "fork", pool, "golden", *names)
    nbd_python("import nbd, sys\nfor uri in sys.argv[1:]:\n    h = nbd.NBD()\n"
               "    h.connect_uri(uri)\n    h.pwrite(bytes([len(uri) % 251]) * (1 << 20), 0)\n"
               "    h.flush()\n    h.shutdown()\n",
               *[srv.unix_uri(n) for n in names])
    _cli("volume", "fork", pool, "golden", "keep")  # not in the batch
    control = socket_path(read_superblock(pool).uuid_str, pool)

    def delete() -> None:
        with contextlib.suppress(Exception):  # (the server is killed under it)
            call(control, "volume.deletes", {"names": names[:20]}, timeout=10)

    thread = threading.Thread(target=delete)
    thread.start()
    time.sleep(delay)
    srv.kill()
    thread.join(15)
    srv.start()
    left = {v["name"] for v in json.loads(_cli("volume", "list", pool, "--brief",
                                                "--json").stdout)}
    batch = set(names[:20])
    assert not (batch & left) or batch <= left, sorted(left)  # all or none
    finished = srv.stderr.count("finishing the deletion of volume")
    assert finished in (0, 20), srv.stderr  # (marked together: finished together)
    print(f"kill after {delay}s: the batch {'stayed' if batch <= left else 'went'}"
          f"{' (finished when the pool opened again)' if finished else ''}")
    assert {"golden", "keep", *names[20:]} <= left
    for name in names[20:]:
        _qemu_io(srv.unix_uri(name), f"read -P {len(srv.unix_uri(name)) % 251} 0 1M")
    srv.stop()
    check = json.loads(_cli("pool", "check", pool, "--json").stdout)
    assert check["ok"], check
