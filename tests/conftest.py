"""Shared fixtures: a real ``nbdserver serve`` process, and helpers to run CLI tools.

:class:`NbdServerProcess` writes a YAML config into a directory, starts
``python -m nbdserver serve -c CONFIG`` as a subprocess (stdout and stderr go
to files, so a chatty server can never block on a full pipe), waits until its
Unix socket accepts connections and it has printed its URIs, and always cleans
up. Exports, pools and server settings are plain dicts written as YAML, so the
pool and volume tests can use it too::

    def test_x(nbd_server_factory, tmp_path):
        srv = nbd_server_factory([{"name": "disk", "file": tmp_path / "d.img", "size": "8M"}])
        run(["nbdinfo", srv.unix_uri("disk")])
        srv.stop()                     # SIGTERM; asserts exit status 0

At teardown every server started by the factory is stopped (killed if need
be), and the test fails if the server's stderr shows a Python traceback:
tracebacks are for bugs only (see :mod:`nbdserver.cli`).

:func:`run` runs a command with a timeout and fails the test, showing the
command's output, when it fails. :func:`nbd_python` runs a script under the
system Python, which has libnbd's ``nbd`` module (``python3-libnbd``).

``from conftest import X`` in any test module means this file. Test
directories have no ``__init__.py``, so pytest imports every ``conftest.py``
as the module ``conftest``, and ``sys.modules["conftest"]`` is whichever was
imported last (say tests/protocol/conftest.py); :func:`pytest_collectstart`
puts this module back there just before each test module is imported.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEM_PYTHON_PATH = "/usr/lib/python3/dist-packages"
SERVER_CMD = (sys.executable, "-m", "nbdserver")
UNIX_PATH_MAX = 107

# -- running commands ---------------------------------------------------------------------


def _show(out: str | bytes | None, limit: int = 6000) -> str:
    if out is None:
        return ""
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    return out if len(out) <= limit else out[:limit // 2] + "\n[...]\n" + out[-limit // 2:]


def default_signals() -> None:
    """For a child process: SIGINT and SIGHUP as a terminal would deliver them, whatever
    the test run inherited (run in the background or under nohup, both are ignored, and
    a server then keeps SIGHUP ignored, as under nohup it should)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def run(cmd: Sequence[str | Path], *, timeout: float = 60.0, check: bool = True,
        input: str | None = None, env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd` (text mode, output captured). Fails the test with the output shown when
    it times out, or when `check` and it exits non-zero."""
    args = [str(a) for a in cmd]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              input=input, env=None if env is None else dict(env),
                              cwd=None if cwd is None else str(cwd))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}\n--- stdout\n"
                    f"{_show(e.stdout)}\n--- stderr\n{_show(e.stderr)}", pytrace=False)
    if check and proc.returncode != 0:
        pytest.fail(f"exit status {proc.returncode}: {' '.join(args)}\n--- stdout\n"
                    f"{_show(proc.stdout)}\n--- stderr\n{_show(proc.stderr)}", pytrace=False)
    return proc


def nbd_python(script: str, *args: str | Path, timeout: float = 60.0,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `script` under the system Python with libnbd's ``nbd`` module importable;
    `args` become ``sys.argv[1:]``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SYSTEM_PYTHON_PATH
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    return run([SYSTEM_PYTHON, "-c", script, *args], timeout=timeout, check=check, env=env)


# -- the server process -------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """`value` with Paths turned into strings, for yaml.safe_dump."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def file_export(name: str, path: Path, size: str | int | None = "64M",
                **extra: Any) -> dict[str, Any]:
    """An ``exports`` item for a raw file (``read_only=True`` becomes ``read-only: true``)."""
    item: dict[str, Any] = {"name": name, "file": path}
    if size is not None:
        item["size"] = size
    for key, value in extra.items():
        item[key.replace("_", "-")] = value
    return item


class NbdServerProcess:
    """An ``nbdserver serve`` subprocess; see the module note.

    `exports`, `pools` and `server` are written to the config as given (dicts);
    `listen` defaults to a Unix socket in `workdir` plus TCP on 127.0.0.1, port 0.
    `config_text`, when given, is written verbatim instead.
    """

    def __init__(self, workdir: Path, exports: Sequence[Mapping[str, Any]] = (), *,
                 pools: Sequence[Mapping[str, Any]] = (),
                 server: Mapping[str, Any] | None = None,
                 listen: Sequence[Mapping[str, Any]] | None = None,
                 tcp: bool = True, config_text: str | None = None,
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 name: str = "nbdserver") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._tmpdir: str | None = None
        sock = self.workdir / f"{name}.sock"
        if len(os.fsencode(sock)) > UNIX_PATH_MAX - 8:
            self._tmpdir = tempfile.mkdtemp(prefix="nbdt-", dir="/tmp")
            sock = Path(self._tmpdir) / f"{name}.sock"
        self.socket_path: Path | None = sock
        if listen is None:
            listen = [{"unix": sock}] + ([{"tcp": "127.0.0.1:0"}] if tcp else [])
        else:
            unix = [item["unix"] for item in listen if "unix" in item]
            self.socket_path = Path(unix[0]) if unix else None
        self.config: dict[str, Any] = {"listen": list(listen)}
        if server:
            self.config["server"] = dict(server)
        if pools:
            self.config["pools"] = list(pools)
        self.config["exports"] = list(exports)
        self.config_path = self.workdir / f"{name}.yaml"
        text = config_text if config_text is not None else yaml.safe_dump(
            _plain(self.config), sort_keys=False)
        self.config_path.write_text(text)
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.stdout_path = self.workdir / f"{name}.stdout"
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tcp_ports: list[int] = []
        self.returncode: int | None = None
        self.allow_traceback = False

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        return [*SERVER_CMD, "serve", "-c", str(self.config_path), *self.args]

    def start(self, timeout: float = 15.0) -> NbdServerProcess:
        """Start the server and wait until it listens (fails the test if it does not)."""
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir,
                                         env=self.env, preexec_fn=default_signals)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                pytest.fail(f"nbdserver exited with status {self.proc.returncode} while "
                            f"starting\n--- config\n{self.config_path.read_text()}"
                            f"--- stderr\n{_show(self.stderr)}", pytrace=False)
            if self._ready():
                break
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"nbdserver did not start listening within {timeout}s\n"
                            f"--- stdout\n{_show(self.stdout)}\n--- stderr\n"
                            f"{_show(self.stderr)}", pytrace=False)
            time.sleep(0.02)
        self.tcp_ports = sorted({int(p) for p in re.findall(r"nbd://[^/\s]*:(\d+)/",
                                                               self.stdout)})
        return self

    def _ready(self) -> bool:
        if "connect with:" not in self.stdout:  # printed once every listener is up
            return False
        if self.socket_path is None:
            return True
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(2)
            s.connect(str(self.socket_path))
            return True
        except OSError:
            return False
        finally:
            s.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self) -> None:
        if not self.alive():
            assert self.proc is not None
            pytest.fail(f"nbdserver died with status {self.proc.returncode}\n--- stderr\n"
                        f"{_show(self.stderr)}", pytrace=False)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"nbdserver did not exit within {timeout}s\n--- stderr\n"
                        f"{_show(self.stderr)}", pytrace=False)
        return self.returncode

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM; assert a clean exit (status 0, no traceback). Returns stderr."""
        assert self.proc is not None, "server not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.wait(timeout)
        err = self.stderr
        if status != 0:
            pytest.fail(f"nbdserver exited with status {status} after SIGTERM\n--- stderr\n"
                        f"{_show(err)}", pytrace=False)
        assert "Traceback" not in err, err
        return err

    def kill(self) -> None:
        """SIGKILL (no cleanup in the server) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            # A process with much direct I/O in flight can take a while to die.
            self.returncode = self.proc.wait(120)

    def cleanup(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.returncode = self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill()
        finally:
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> NbdServerProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- what it says -------------------------------------------------------------------

    @property
    def stdout(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def unix_uri(self, export: str = "") -> str:
        assert self.socket_path is not None, "no Unix listener"
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    def tcp_uri(self, export: str = "", index: int = 0) -> str:
        assert self.tcp_ports, f"no TCP listener in:\n{self.stdout}"
        return f"nbd://127.0.0.1:{self.tcp_ports[index]}/{export}"

    @property
    def tcp_port(self) -> int:
        assert self.tcp_ports, f"no TCP listener in:\n{self.stdout}"
        return self.tcp_ports[0]

    def rss_bytes(self) -> int:
        """The server's resident memory (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def serve_once(config_path: Path, *args: str, timeout: float = 20.0,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``nbdserver serve -c CONFIG`` expecting it to exit by itself (a start-up error)."""
    return run([*SERVER_CMD, "serve", "-c", config_path, *args], timeout=timeout,
               check=False, env=env)


# -- fixtures -------------------------------------------------------------------------------

_THIS_MODULE = sys.modules[__name__]


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Make ``from conftest import X`` in the module about to be imported mean this file."""
    if isinstance(collector, pytest.Module):
        sys.modules["conftest"] = _THIS_MODULE


ServerFactory = Callable[..., NbdServerProcess]


@pytest.fixture
def nbd_server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """``factory(exports, **kwargs)`` -> a started NbdServerProcess (kwargs as for the class;
    `workdir` defaults to tmp_path, `start=False` returns it unstarted)."""
    servers: list[NbdServerProcess] = []

    def factory(exports: Sequence[Mapping[str, Any]] = (), *, start: bool = True,
                workdir: Path | None = None, **kwargs: Any) -> NbdServerProcess:
        kwargs.setdefault("name", f"nbdserver{len(servers)}" if servers else "nbdserver")
        srv = NbdServerProcess(workdir or tmp_path, exports, **kwargs)
        servers.append(srv)
        return srv.start() if start else srv

    yield factory
    failures = []
    for srv in servers:
        srv.cleanup()
        if not srv.allow_traceback and "Traceback" in srv.stderr:
            failures.append(f"{srv.name}: traceback on stderr:\n{_show(srv.stderr)}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.fixture
def disk_image(tmp_path: Path) -> Path:
    """Where the default server's 64 MiB 'disk' export lives (created sparse by the server)."""
    return tmp_path / "disk.img"


@pytest.fixture
def nbd_server(nbd_server_factory: ServerFactory, tmp_path: Path,
               disk_image: Path) -> NbdServerProcess:
    """A running server with 'disk' (64 MiB, sparse, writable) and 'ro' (1 MiB, read-only,
    holding bytes(range(256)) repeated)."""
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(range(256)) * 4096)
    return nbd_server_factory([
        file_export("disk", disk_image, "64M", description="test disk"),
        file_export("ro", ro, None, read_only=True),
    ])


def require_root(why: str) -> None:
    """Fail (not skip) with a clear message when a test needs root and does not have it."""
    if os.geteuid() != 0:
        pytest.fail(f"this test needs root ({why}); run the suite as root, as CI does "
                    "(or in a container with CAP_SYS_ADMIN)", pytrace=False)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``make(size="64M", sector_size=512)`` -> a new loop block device over a sparse file
    in tmp_path (root only); detached at teardown."""
    created: list[str] = []

    def make(size: str = "64M", sector_size: int = 512) -> Path:
        require_root("it attaches loop block devices")
        backing = tmp_path / f"loop{len(created)}.img"
        run(["truncate", "-s", size, backing])
        dev = run(["losetup", "--find", "--show", f"--sector-size={sector_size}",
                   backing]).stdout.strip()
        created.append(dev)
        return Path(dev)

    yield make
    for dev in created:
        run(["losetup", "-d", dev], check=False)


def on_uvloop(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def`` test on uvloop, the loop the server uses, instead of
    pytest-asyncio's default loop (fixtures are passed through)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(fn(*args, **kwargs))
    return wrapper


def pattern(length: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking test data."""
    import random
    return random.Random(seed).randbytes(length)
