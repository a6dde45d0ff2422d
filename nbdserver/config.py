"""The YAML configuration: parsed into frozen, validated dataclasses.

A config names where to listen, a few server settings, the pools (files or
block devices holding thin, forkable volumes) and the exports (what NBD clients
can connect to)::

    listen:
      - unix: ../data/nbd.sock
      - tcp: 127.0.0.1:10809          # IPv6: "[::1]:10809" (quoted); port 0 = any free port
    server:                           # optional; every key optional
      io: aio                         # aio (default) | threads
      max-connections: 256
      handshake-timeout: 10           # seconds (also 500ms, 2m)
      stop-timeout: 30                # seconds stop waits for requests in flight
      log-level: info                 # debug | info | warning | error
      cache-size: 64M                 # block-map metadata cache of the pools
    pools:                            # optional
      - name: main
        path: ../data/pool.img
        create: {size: 20G, blockmap: radix, chunk-size: 4K}   # optional
    exports:
      - name: disk
        file: ../data/disk.img        # raw file or block device
        size: 1G                      # create the file at this size if missing
      - name: vm1
        pool: main
        volume: vm1
        create: {size: 1G}            # or {fork: golden} or {snapshot: golden}

**Relative paths** (``listen[].unix``, ``pools[].path``, ``exports[].file``)
are resolved against the directory that contains the config file, not against
the current directory, so a config works wherever the server is started from.
``~`` is expanded. :func:`parse_config` resolves against `base_dir` (default:
the directory of `source`, else the current directory).

Sizes are binary (``64K``, ``512M``, ``1.5G``, ``20GiB``; see
:mod:`nbdserver.sizes`); booleans must be real YAML booleans (``true`` or
``false``; ``yes``/``no``/``on``/``off`` are refused as too easy to misread).
For the same reason a bare number (a size, a count, seconds) must be written
in decimal: YAML 1.1 reads ``01000`` as octal (512), ``1:20`` as base 60 (80),
and also takes ``0x1000`` and ``0b1010``; those are refused, saying how they
would have been read (``"01000"``, quoted, is the string, so 1000 bytes).

Every mistake raises :class:`~nbdserver.errors.ConfigError` with one line that
names the file, the line and the key path, for example::

    config/x.yaml:7: exports[0].read-only: expected true or false, got 'yes'

To get those line numbers the file is loaded with :func:`yaml.compose` and the
node tree is walked here, rather than with :func:`yaml.safe_load`.

``listen`` may be missing or empty only with `socket_activation` (systemd
passes the sockets). ``serve`` sets it when it was started that way;
``check-config`` always does, and :func:`config_warnings` then says that the
config can only be served through socket activation.

What ``serve`` would refuse later is refused here, with the key: a Unix socket
path longer than the kernel's 107 bytes; a ``pools[].create.size`` too small
for the pool's own layout (superblock, journal, catalog, metadata and a few
chunks: the minimum is computed with :func:`nbdserver.pool.format.plan_layout`,
as ``Pool.create`` does, and stated in the message); a new volume's size that
is not a multiple of 512 bytes; two pools on one file (paths compared after
resolving ``~``, relative paths and symbolic links); the same volume of a pool
exported twice.

Checks that look at the file system: a path no one could use (too long, a
symbolic-link loop, under a regular file) is refused; an
export whose ``file`` does not exist must give a ``size`` (to create it), and a
pool whose ``path`` does not exist must have ``create``; a ``file`` or pool
``path`` must not be a directory; an export's ``file`` must not be a pool's
``path``. Whether a pool holds the volumes named is only known when the pool is
opened.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nbdserver.errors import ConfigError, UserError
from nbdserver.pool.format import min_pool_size, valid_chunk_size
from nbdserver.sizes import (
    format_duration,
    format_size,
    not_whole_blocks,
    not_whole_sectors,
    parse_duration,
    parse_size,
)
from nbdserver.storage.device import file_identity

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "IO_ENGINES",
    "KNOWN_BLOCKMAPS",
    "LOG_LEVELS",
    "Config",
    "ExportConfig",
    "Listener",
    "PoolConfig",
    "PoolCreate",
    "ServerSettings",
    "VolumeCreate",
    "config_to_json",
    "config_warnings",
    "creation_order",
    "describe",
    "load_config",
    "made_by_serve",
    "parse_config",
]

#: The config ``nbdserver serve`` uses without ``-c``: ``config/nbdserver.yaml`` in the source tree.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "nbdserver.yaml"

#: Block-map formats a pool can be created with (``pools[].create.blockmap``).
KNOWN_BLOCKMAPS: tuple[str, ...] = ("radix", "extent", "linear")
#: ``server.io`` values.
IO_ENGINES: tuple[str, ...] = ("aio", "threads")
#: ``server.log-level`` values.
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

DEFAULT_IO = "aio"
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_LOG_LEVEL = "info"
DEFAULT_CACHE_SIZE = 64 << 20
MIN_CACHE_SIZE = 64 << 10  # the page cache's floor: 16 pages
DEFAULT_BLOCKMAP = "radix"
DEFAULT_CHUNK_SIZE = 4 << 10
DEFAULT_MIN_BLOCK_SIZE = 512
MAX_MIN_BLOCK_SIZE = 65536
MAX_EXPORT_NAME_BYTES = 4096  # the NBD protocol's limit on export names (and descriptions)
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


# ----------------------------------------------------------------------------------------
# The dataclasses
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listener:
    """Where the server accepts connections: one item of ``listen``.

    `kind` is ``"unix"`` (then `path` is the absolute socket path) or ``"tcp"``
    (then `host` is a host name or IP address, without the brackets of an IPv6
    address, and `port` is 0..65535, 0 meaning any free port). `key` is the
    config path, such as ``"listen[1].tcp"``, for messages about this listener.
    """

    kind: Literal["unix", "tcp"]
    path: Path | None
    host: str | None
    port: int | None
    key: str

    @property
    def address(self) -> str:
        """The socket path, or ``host:port`` (``[::1]:10809`` for IPv6)."""
        if self.kind == "unix":
            return str(self.path)
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The ``server`` section; every value has a default.

    `io`: ``"aio"`` (Linux native AIO) or ``"threads"``. `max_connections`:
    connections served at once. `handshake_timeout`: seconds a client may take
    to finish the handshake. `stop_timeout`: seconds a stop (SIGTERM) waits for
    the requests in flight before dropping their connections. `log_level`: ``"debug"``, ``"info"``,
    ``"warning"`` or ``"error"``. `cache_size`: bytes of block-map metadata the
    pools may cache.
    """

    io: str = DEFAULT_IO
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    log_level: str = DEFAULT_LOG_LEVEL
    cache_size: int = DEFAULT_CACHE_SIZE
    stop_timeout: float = DEFAULT_STOP_TIMEOUT


@dataclass(frozen=True, slots=True)
class PoolCreate:
    """How to create a pool that does not exist yet (``pools[].create``).

    `size` in bytes, `blockmap` one of the known block-map formats, `chunk_size`
    the allocation unit in bytes (a power of two from 4 KiB to 1 MiB),
    `preallocate` "" for a sparse file, "falloc" to allocate the whole file at once,
    "full" to also write zeros over it (see BlockDevice.preallocate).
    """

    size: int
    blockmap: str = DEFAULT_BLOCKMAP
    chunk_size: int = DEFAULT_CHUNK_SIZE
    preallocate: str = ""


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A pool: a file or block device holding volumes (one item of ``pools``).

    `path` is absolute. `create` is None when the pool must already exist.
    `key` is the config path, such as ``"pools[0]"``.
    """

    name: str
    path: Path
    create: PoolCreate | None
    key: str


@dataclass(frozen=True, slots=True)
class VolumeCreate:
    """How to create a pool volume that does not exist yet (``exports[].create``).

    Exactly one field is set: `size` (a new, empty thin volume of that many
    bytes), `fork` (a writable copy of the named volume, sharing its blocks) or
    `snapshot` (a read-only copy of the named volume).
    """

    size: int | None = None
    fork: str | None = None
    snapshot: str | None = None

    @property
    def source(self) -> str | None:
        """The volume it is copied from (fork or snapshot), or None."""
        return self.fork if self.fork is not None else self.snapshot


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """An export: what a client gets when it asks for `name` (one item of ``exports``).

    Either `file` is set (an absolute path to a raw file or block device; `size`
    is the size to create it at when missing, or None) or `pool` and `volume`
    are (a volume of the pool named `pool`; `create` says how to create it when
    missing, or is None), or `pool` and `volumes` are: every volume of the pool
    whose name matches the shell pattern `volumes` (``*``, ``vm-*``), each
    served under its own name, as it exists when a client asks for it (`name`
    is then ``""``). `min_block_size` is the smallest block clients should use
    (a power of two, 1 to 65536). `key` is the config path, such as
    ``"exports[0]"``.
    """

    name: str
    description: str
    read_only: bool
    min_block_size: int
    file: Path | None
    size: int | None
    pool: str | None
    volume: str | None
    create: VolumeCreate | None
    key: str
    volumes: str | None = None

    @property
    def kind(self) -> Literal["file", "volume", "volumes"]:
        """``"file"`` for a raw file or block device, ``"volume"`` for a pool volume,
        ``"volumes"`` for the volumes of a pool that match a pattern."""
        if self.file is not None:
            return "file"
        return "volumes" if self.volumes is not None else "volume"


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration.

    `source` is the absolute path of the file it was read from (None when parsed
    from a string without one). Everything is in configuration order.
    """

    source: Path | None
    listen: tuple[Listener, ...]
    server: ServerSettings
    pools: tuple[PoolConfig, ...]
    exports: tuple[ExportConfig, ...]
    # where each key path was written, for errors found later (see :meth:`at`)
    shown: str = field(default="", compare=False, repr=False)
    key_lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def at(self, key: str) -> str:
        """`key` as load errors name it, ``"FILE:LINE: key"``, for a problem ``serve``
        finds later (a volume missing from its pool, a socket in use); the line of the
        nearest enclosing key written in the file, or just `key`."""
        probe = key
        while probe:
            line = self.key_lines.get(probe)
            if line is not None and self.shown:
                return f"{self.shown}:{line}: {key}"
            probe = probe[:max(probe.rfind("."), probe.rfind("["), 0)]
        return key

    def pool_named(self, name: str) -> PoolConfig | None:
        """The pool called `name`, or None."""
        return next((p for p in self.pools if p.name == name), None)

    def export_named(self, name: str) -> ExportConfig | None:
        """The export called `name`, or None."""
        return next((e for e in self.exports if e.name == name and e.volumes is None), None)


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


def load_config(
    path: str | Path,
    *,
    socket_activation: bool = False,
    blockmaps: Sequence[str] = KNOWN_BLOCKMAPS,
) -> Config:
    """Read and validate the YAML config at `path`.

    Relative paths inside are resolved against the directory of `path`. With
    `socket_activation`, ``listen`` may be empty or missing (the sockets come
    from systemd's ``LISTEN_FDS``). `blockmaps` lists the valid
    ``pools[].create.blockmap`` values. Raises ConfigError.
    """
    shown = str(path)
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: not UTF-8 text (byte {e.start})") from None
    source = Path(os.path.abspath(p))
    return _parse(text, source=source, shown=shown, base_dir=source.parent,
                  socket_activation=socket_activation, blockmaps=blockmaps)


def parse_config(
    text: str,
    *,
    source: Path | None = None,
    base_dir: Path | None = None,
    socket_activation: bool = False,
    blockmaps: Sequence[str] = KNOWN_BLOCKMAPS,
) -> Config:
    """Validate the YAML config in `text`.

    `source` names the file in messages and in :attr:`Config.source`. Relative
    paths are resolved against `base_dir`, else the directory of `source`, else
    the current directory. See :func:`load_config` for the other arguments.
    """
    if source is not None:
        source = Path(os.path.abspath(source))
    if base_dir is None:
        base_dir = source.parent if source is not None else Path.cwd()
    return _parse(text, source=source, shown=str(source) if source else None,
                  base_dir=Path(os.path.abspath(base_dir)),
                  socket_activation=socket_activation, blockmaps=blockmaps)


def _parse(text: str, *, source: Path | None, shown: str | None, base_dir: Path,
           socket_activation: bool, blockmaps: Sequence[str]) -> Config:
    where = shown or "<config>"
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_yaml_error(where, text, e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: " + " ".join(str(e).split())) from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None
    if root is None:
        raise ConfigError(
            f"{where}: the config is empty; it needs at least 'listen' and 'exports' "
            f"(see {DEFAULT_CONFIG_PATH})")
    return _Parser(where, base_dir, socket_activation, tuple(blockmaps)).config(root, source)


# The characters a volume name may hold, and those it may begin with
# (nbdserver.pool.pool.NAME_RE).
_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _NAME_FIRST | frozenset("._+-")
_Glob = list[tuple[bool, frozenset[str]]]  # (a *, the name characters one position takes)


def _glob_tokens(pattern: str) -> _Glob | None:
    """`pattern` (fnmatch's syntax) as a list of positions over the volume-name
    characters: (True, all) for ``*``, else (False, the characters it matches: a
    ``[...]`` class is asked of fnmatch itself, character by character); None when a
    ``[`` is not closed (fnmatch would take it as a ``[``, which no name holds)."""
    out: _Glob = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append((True, _NAME_CHARS))
        elif c == "?":
            out.append((False, _NAME_CHARS))
        elif c == "[":
            j = i + 1  # (fnmatch's scan: a leading ! and then a leading ] are in the class)
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                return None
            cls = pattern[i:j + 1]
            out.append((False, frozenset(x for x in _NAME_CHARS if fnmatchcase(x, cls))))
            i = j
        else:
            out.append((False, frozenset(c) & _NAME_CHARS))
        i += 1
    return out


def _globs_overlap(a: _Glob, b: _Glob) -> bool:
    """Whether some volume name (not empty; its first character a letter or digit)
    matches both patterns: a search over pairs of positions."""
    seen: set[tuple[int, int, bool]] = set()
    todo = [(0, 0, False)]
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j, started = state
        if i == len(a) and j == len(b) and started:
            return True
        if i < len(a) and a[i][0]:
            todo.append((i + 1, j, started))  # a * that matches nothing more
        if j < len(b) and b[j][0]:
            todo.append((i, j + 1, started))
        if i < len(a) and j < len(b):  # one character both take
            both = a[i][1] & b[j][1] if started else a[i][1] & b[j][1] & _NAME_FIRST
            if both:
                todo.append((i if a[i][0] else i + 1, j if b[j][0] else j + 1, True))
    return False


def _yaml_error(where: str, text: str, e: yaml.MarkedYAMLError) -> str:
    mark = e.problem_mark or e.context_mark
    problem = e.problem or "syntax error"
    if e.context and e.context_mark is not None:
        problem += f" ({e.context} at line {e.context_mark.line + 1}, " \
                   f"column {e.context_mark.column + 1})"
    if mark is None:  # pragma: no cover - PyYAML always gives one of the marks
        return f"{where}: invalid YAML: {problem}"
    msg = f"{where}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    if re.search(r"\btcp:\s*\[", line):
        msg += '; quote IPv6 addresses, as in tcp: "[::1]:10809"'
    elif re.search(r"\bvolumes:\s*\*", line):
        msg += '; quote a pattern that starts with *, as in volumes: "*"'
    elif "\t" in line[: mark.column + 1]:
        indent = len(line) - len(line.lstrip(" \t"))
        msg += ("; YAML does not allow tabs for indentation, use spaces"
                if "\t" in line[:indent] else "; use spaces, not a tab, in YAML")
    return msg


_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_STR = "tag:yaml.org,2002:str"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_TEXT_TAGS = (_STR, _INT, _FLOAT, _BOOL, _TIMESTAMP)  # scalars a string may be written as
_MERGE = "tag:yaml.org,2002:merge"
_CONSTRUCTOR = yaml.constructor.SafeConstructor()  # for its construct_yaml_int/float
#: The one YAML 1.1 integer form that reads as it looks (PyYAML's decimal pattern).
_DECIMAL_INT = re.compile(r"[-+]?(?:0|[1-9][0-9_]*)")

_TOP_KEYS = ("listen", "server", "pools", "exports")
_LISTEN_KEYS = ("unix", "tcp")
_SERVER_KEYS = ("io", "max-connections", "handshake-timeout", "stop-timeout", "log-level",
                "cache-size")
_POOL_KEYS = ("name", "path", "create")
_POOL_CREATE_KEYS = ("size", "blockmap", "chunk-size", "preallocate")
_EXPORT_KEYS = ("name", "description", "read-only", "min-block-size", "file", "size", "pool",
                "volume", "volumes", "create")
#: Characters of a ``volumes:`` pattern: a volume name's, and fnmatch's ``* ? [ ] !``.
_PATTERN_RE = re.compile(r"[A-Za-z0-9._+\-*?\[\]!]+")
_VOLUME_CREATE_KEYS = ("size", "fork", "snapshot")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _got(node: Node) -> str:
    """How to show `node` in 'expected X, got Y'."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "nothing" if node.value in ("", "~") else repr(node.value)
    if isinstance(node, ScalarNode) and node.style in ("'", '"'):
        return f"{node.value!r} (a quoted string)"
    return repr(node.value)


def _suggest(word: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    if not close and "_" in word:  # read_only -> read-only
        close = difflib.get_close_matches(word.replace("_", "-"), valid, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _one_of(valid: Sequence[str]) -> str:
    return ", ".join(valid)


class _Map:
    """A YAML mapping being read: string keys, no duplicates, no unknown keys.

    Merge keys (``<<: *anchor``) are supported; keys written in the mapping
    itself win over merged ones.
    """

    def __init__(self, parser: _Parser, node: Node, path: str, valid: Sequence[str],
                 what: str) -> None:
        self.p = parser
        self.path = path
        if not isinstance(node, MappingNode):
            parser.fail(node, path, f"expected {what}, got {_got(node)}")
        self.node: MappingNode = node
        self.items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in self._own(node):
            key = key_node.value
            if key not in valid:
                kp = _join(path, key)
                parser.fail(key_node, kp, f"unknown key; {_suggest(key, valid)}"
                            f"valid keys here: {_one_of(valid)}")
            self.items[key] = (key_node, value_node)
        for merged in self._merged(node, set()):
            for key_node, value_node in self._own(merged):
                if key_node.value not in valid:
                    parser.fail(key_node, _join(path, key_node.value),
                                f"unknown key (merged with <<); {_suggest(key_node.value, valid)}"
                                f"valid keys here: {_one_of(valid)}")
                self.items.setdefault(key_node.value, (key_node, value_node))
        if path:
            parser.lines.setdefault(path, node.start_mark.line + 1)
        for key, (written, _) in self.items.items():
            parser.lines.setdefault(_join(path, key), written.start_mark.line + 1)

    def _own(self, node: MappingNode) -> Iterator[tuple[ScalarNode, Node]]:
        seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag == _NULL:
                self.p.fail(key_node, self.path or "(top level)",
                            f"keys must be names, got {_got(key_node)}")
            key = str(key_node.value)
            if key in seen:
                first = seen[key].start_mark.line + 1
                self.p.fail(key_node, _join(self.path, key),
                            f"key appears twice (first at line {first})")
            seen[key] = key_node
            yield key_node, value_node

    def _merged(self, node: MappingNode, seen: set[int]) -> Iterator[MappingNode]:
        """The mappings merged into `node` with ``<<``, highest precedence first."""
        if id(node) in seen:
            self.p.fail(node, _join(self.path, "<<"), "an alias merges into itself")
        seen.add(id(node))
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE:
                continue
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for src in sources:
                if not isinstance(src, MappingNode):
                    self.p.fail(src, _join(self.path, "<<"),
                                f"can only merge mappings, got {_got(src)}")
                yield src
                yield from self._merged(src, seen)

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def get(self, key: str) -> Node | None:
        """The value node of `key`, or None if absent (a YAML null counts as present)."""
        item = self.items.get(key)
        return item[1] if item else None

    def key_node(self, key: str) -> Node:
        return self.items[key][0]

    def sub(self, key: str) -> str:
        return _join(self.path, key)

    def require(self, key: str, hint: str = "") -> Node:
        node = self.get(key)
        if node is None:
            self.p.fail(self.node, self.path or "(top level)",
                        f"missing required key {key!r}{hint}")
        return node


class _Parser:
    def __init__(self, where: str, base_dir: Path, socket_activation: bool,
                 blockmaps: tuple[str, ...]) -> None:
        self.where = where
        self.lines: dict[str, int] = {}  # key path -> line (Config.key_lines)
        self.base_dir = base_dir
        self.socket_activation = socket_activation
        self.blockmaps = blockmaps

    # -- errors -----------------------------------------------------------------------------

    def fail(self, node: Node, key: str, message: str) -> NoReturn:
        line = node.start_mark.line + 1
        raise ConfigError(f"{self.where}:{line}: {key}: {message}")

    # -- scalars ----------------------------------------------------------------------------

    def text(self, node: Node, key: str, *, what: str = "a string",
             allow_empty: bool = False) -> str:
        """A string. A plain scalar is taken as written (``name: 2024`` is "2024")."""
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            self.fail(node, key, f"expected {what}, got {_got(node)}")
        if node.tag not in _TEXT_TAGS:
            self.fail(node, key, f"unsupported YAML tag {node.tag!r}")
        value = str(node.value)
        if not value and not allow_empty:
            self.fail(node, key, f"expected {what}, got an empty string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # an escaped lone surrogate ("\ud800")
            self.fail(node, key, f"{value[e.start]!r} at character {e.start} is not "
                      "valid in UTF-8 (an unpaired surrogate)")
        return value

    def name(self, node: Node, key: str, what: str) -> str:
        value = self.text(node, key, what=what)
        if value != value.strip():
            self.fail(node, key, f"{what} {value!r} has leading or trailing spaces")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            self.fail(node, key, f"{what} {value!r} contains control characters")
        return value

    def boolean(self, node: Node, key: str) -> bool:
        if (isinstance(node, ScalarNode) and node.tag == _BOOL
                and node.value.lower() in ("true", "false")):
            return str(node.value).lower() == "true"
        self.fail(node, key, f"expected true or false, got {_got(node)}")

    def preallocation(self, node: Node, key: str) -> str:
        """A pool file's preallocation: true (falloc), false (""), falloc or full."""
        if isinstance(node, ScalarNode) and node.tag == _STR and node.value in ("falloc", "full"):
            return str(node.value)
        if (isinstance(node, ScalarNode) and node.tag == _BOOL
                and node.value.lower() in ("true", "false")):
            return "falloc" if node.value.lower() == "true" else ""
        self.fail(node, key, f"expected true, false, falloc or full, got {_got(node)}")

    def yaml_int(self, node: ScalarNode, key: str, advice: str) -> int:
        """The value of a YAML integer written in decimal. YAML 1.1 also reads octal
        (``010`` is 8), hexadecimal (``0x10``), binary (``0b10``) and base 60 (``1:20``
        is 80): those are refused, with how they would have been read and `advice`."""
        value = _CONSTRUCTOR.construct_yaml_int(node)
        assert isinstance(value, int)
        text = str(node.value)
        if not _DECIMAL_INT.fullmatch(text):
            digits = text.lstrip("+-").lower()
            base = ("base 60" if ":" in digits else "hexadecimal" if digits.startswith("0x")
                    else "binary" if digits.startswith("0b") else "octal")
            self.fail(node, key, f"{text} would read as {base} {value} in YAML; {advice}")
        return value

    def integer(self, node: Node, key: str, what: str) -> int:
        if isinstance(node, ScalarNode) and node.tag == _INT:
            return self.yaml_int(node, key, "write whole numbers in decimal (e.g. 100)")
        self.fail(node, key, f"expected {what}, got {_got(node)}")

    def size(self, node: Node, key: str) -> int:
        raw: str | int
        if isinstance(node, ScalarNode) and node.tag == _INT:
            raw = self.yaml_int(node, key, "write sizes in decimal or with a unit "
                                           "(e.g. 1000, 4K)")
        elif isinstance(node, ScalarNode) and node.tag in (_STR, _FLOAT):
            raw = str(node.value)
        else:
            self.fail(node, key, f"expected a size such as 4096, 64K, 512M or 1.5G, "
                                 f"got {_got(node)}")
        try:
            value = parse_size(raw, what=key)
        except ValueError as e:
            self.fail(node, key, str(e).removeprefix(f"{key}: "))
        return value

    def duration(self, node: Node, key: str) -> float:
        raw: str | int | float
        advice = "write seconds in decimal or with a unit (e.g. 90, 1.5, 2m)"
        if isinstance(node, ScalarNode) and node.tag == _INT:
            raw = self.yaml_int(node, key, advice)
        elif isinstance(node, ScalarNode) and node.tag == _FLOAT:
            raw = _CONSTRUCTOR.construct_yaml_float(node)
            if ":" in str(node.value):  # YAML 1.1's base 60 float: 1:30.5 is 90.5
                self.fail(node, key, f"{node.value} would read as base 60 {raw:g} in YAML; "
                                     f"{advice}")
        elif isinstance(node, ScalarNode) and node.tag == _STR:
            raw = str(node.value)
        else:
            self.fail(node, key, f"expected seconds such as 10, 2.5, 500ms or 2m, "
                                 f"got {_got(node)}")
        try:
            return parse_duration(raw, what=key)
        except ValueError as e:
            self.fail(node, key, str(e).removeprefix(f"{key}: "))

    def choice(self, node: Node, key: str, valid: Sequence[str]) -> str:
        value = self.text(node, key, what=f"one of {_one_of(valid)}").strip().lower()
        if value not in valid:
            hint = _suggest(value, valid).strip()
            self.fail(node, key, f"expected one of {_one_of(valid)}, got {_got(node)}"
                                 + (f"; {hint}" if hint else ""))
        return value

    def path(self, node: Node, key: str) -> Path:
        text = self.text(node, key, what="a path")
        if "\0" in text:
            self.fail(node, key, "a path cannot contain a NUL character")
        p = Path(os.path.expanduser(text))
        if not p.is_absolute():
            p = self.base_dir / p
        p = Path(os.path.normpath(p))
        try:  # a path nothing can use: too long, a loop, under a file
            os.stat(p)
        except OSError as e:  # (not EACCES: serve may run as another user)
            if e.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR):
                self.fail(node, key, f"{p}: {e.strerror}")
        return p

    def sequence(self, node: Node | None, key: str, what: str) -> list[Node]:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return []
        if not isinstance(node, SequenceNode):
            self.fail(node, key, f"expected a list of {what} (lines starting with '- '), "
                                 f"got {_got(node)}")
        return list(node.value)

    # -- sections ---------------------------------------------------------------------------

    def config(self, root: Node, source: Path | None) -> Config:
        if not isinstance(root, MappingNode):
            self.fail(root, "(top level)", "expected a mapping with the keys "
                                           f"{_one_of(_TOP_KEYS)}, got {_got(root)}")
        top = _Map(self, root, "", _TOP_KEYS, "a mapping")
        listen = self.listeners(top)
        server = self.server(top.get("server"))
        pools = self.pools(top.get("pools"))
        exports = self.exports(top.get("exports"), pools)
        return Config(source=source, listen=listen, server=server, pools=pools,
                      exports=exports, shown=self.where if source is not None else "",
                      key_lines=self.lines)

    def listeners(self, top: _Map) -> tuple[Listener, ...]:
        node = top.get("listen")
        if node is None and not self.socket_activation:
            top.require("listen", " (where to accept connections, for example "
                                  "'listen: [{tcp: 127.0.0.1:10809}]'; only systemd socket "
                                  "activation can do without)")
        items = self.sequence(node, "listen", "listeners")
        if not items and not self.socket_activation:
            assert node is not None
            self.fail(node, "listen", "at least one listener is required "
                                      "(- unix: PATH or - tcp: HOST:PORT) unless systemd "
                                      "socket activation passes the sockets")
        out: list[Listener] = []
        seen: dict[tuple[str, str, int | None], tuple[str, int]] = {}
        for i, item in enumerate(items):
            path = f"listen[{i}]"
            m = _Map(self, item, path, _LISTEN_KEYS,
                     "a mapping with one key, unix: PATH or tcp: HOST:PORT")
            if len(m.items) != 1:
                self.fail(item, path, "give exactly one of unix: PATH or tcp: HOST:PORT")
            kind = next(iter(m.items))
            value = m.items[kind][1]
            key = m.sub(kind)
            if kind == "unix":
                sock = self.path(value, key)
                n = len(os.fsencode(sock))
                if n > UNIX_PATH_MAX:
                    self.fail(value, key, f"the socket path {sock} is {n} bytes; Unix socket "
                                          f"paths are at most {UNIX_PATH_MAX} bytes: use a "
                                          "shorter one")
                out.append(Listener("unix", sock, None, None, key))
                ident: tuple[str, str, int | None] = ("unix", str(sock), None)
            else:
                host, port = self.host_port(value, key)
                out.append(Listener("tcp", None, host, port, key))
                ident = ("tcp", host, port)
            if ident in seen and ident[2] != 0:
                other, line = seen[ident]
                self.fail(value, key, f"the same address as {other} (line {line})")
            seen[ident] = (key, value.start_mark.line + 1)
        return tuple(out)

    def host_port(self, node: Node, key: str) -> tuple[str, int]:
        example = "HOST:PORT such as 127.0.0.1:10809, localhost:10809 or \"[::1]:10809\""
        if isinstance(node, SequenceNode):
            self.fail(node, key, f'expected {example}, got a list; quote IPv6 addresses, '
                                 'as in tcp: "[::1]:10809"')
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            self.fail(node, key, f"expected {example}, got {_got(node)}")
        text = str(node.value).strip()
        m = re.fullmatch(r"\[([^\]]*)\]:([0-9]+)|([^:\[\]]*):([0-9]+)", text)
        if m is None:
            if text.count(":") > 1 and not text.startswith("["):
                self.fail(node, key, f"put an IPv6 address in brackets, as in "
                                     f"\"[::1]:10809\", got {text!r}")
            if ":" not in text:
                self.fail(node, key, f"expected {example}, got {text!r} (no port)")
            self.fail(node, key, f"expected {example}, got {text!r}")
        if m[1] is not None:
            host, port_text = m[1], m[2]
            try:
                ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                self.fail(node, key, f"{host!r} in brackets is not an IPv6 address")
        else:
            host, port_text = m[3], m[4]
            if not host:
                self.fail(node, key, f"missing host in {text!r}; use 0.0.0.0:{port_text} "
                                     f"for every IPv4 address or 127.0.0.1:{port_text} "
                                     "for this machine only")
            if not re.fullmatch(r"[A-Za-z0-9._-]+", host) or host.startswith((".", "-")):
                self.fail(node, key, f"{host!r} is not a host name or IP address")
        port = int(port_text)
        if port > 65535:
            self.fail(node, key, f"port {port} is out of range (0 to 65535; 0 picks a free "
                                 "port)")
        return host, port

    def server(self, node: Node | None) -> ServerSettings:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return ServerSettings()
        m = _Map(self, node, "server", _SERVER_KEYS, "a mapping of server settings")
        io, maxc, timeout, level, cache = (DEFAULT_IO, DEFAULT_MAX_CONNECTIONS,
                                           DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_LOG_LEVEL,
                                           DEFAULT_CACHE_SIZE)
        if (v := m.get("io")) is not None:
            io = self.choice(v, m.sub("io"), IO_ENGINES)
        if (v := m.get("max-connections")) is not None:
            maxc = self.integer(v, m.sub("max-connections"), "a whole number of connections")
            if not 1 <= maxc <= MAX_CONNECTIONS:
                self.fail(v, m.sub("max-connections"),
                          f"must be from 1 to {MAX_CONNECTIONS:,}, got {maxc}")
        if (v := m.get("handshake-timeout")) is not None:
            timeout = self.duration(v, m.sub("handshake-timeout"))
            if timeout > MAX_TIMEOUT:
                self.fail(v, m.sub("handshake-timeout"), _too_long(timeout))
        stop = DEFAULT_STOP_TIMEOUT
        if (v := m.get("stop-timeout")) is not None:
            stop = self.duration(v, m.sub("stop-timeout"))
            if stop > MAX_TIMEOUT:
                self.fail(v, m.sub("stop-timeout"), _too_long(stop))
        if (v := m.get("log-level")) is not None:
            level = self.choice(v, m.sub("log-level"), LOG_LEVELS)
        if (v := m.get("cache-size")) is not None:
            cache = self.size(v, m.sub("cache-size"))
            if cache < MIN_CACHE_SIZE:
                self.fail(v, m.sub("cache-size"), f"at least {format_size(MIN_CACHE_SIZE)} "
                          f"(16 metadata pages), got {format_size(cache)}")
        return ServerSettings(io=io, max_connections=maxc, handshake_timeout=timeout,
                              log_level=level, cache_size=cache, stop_timeout=stop)

    def pools(self, node: Node | None) -> tuple[PoolConfig, ...]:
        out: list[PoolConfig] = []
        names: dict[str, tuple[str, int]] = {}
        files: dict[object, tuple[str, str, int]] = {}  # file -> (key, name, line)
        for i, item in enumerate(self.sequence(node, "pools", "pools")):
            path = f"pools[{i}]"
            m = _Map(self, item, path, _POOL_KEYS, "a mapping with name, path and create")
            name_node = m.require("name", " (the name exports use in 'pool:')")
            name = self.name(name_node, m.sub("name"), "a pool name")
            if name in names:
                other, line = names[name]
                self.fail(name_node, m.sub("name"),
                          f"duplicate pool name {name!r} (also {other}.name at line {line})")
            names[name] = (path, name_node.start_mark.line + 1)
            path_node = m.require("path", " (the file or block device holding the pool)")
            pool_path = self.path(path_node, m.sub("path"))
            if pool_path.is_dir():
                self.fail(path_node, m.sub("path"),
                          f"{pool_path} is a directory; expected a file or block device")
            real = _file_identity(pool_path)
            if real in files:
                other, other_name, line = files[real]
                self.fail(path_node, m.sub("path"),
                          f"{pool_path} is the file of pool {other_name!r} too ({other}.path "
                          f"at line {line}); each pool needs its own file")
            files[real] = (path, name, path_node.start_mark.line + 1)
            create = None
            if (c := m.get("create")) is not None:
                create = self.pool_create(c, m.sub("create"))
            kind = _stat(pool_path)[0]
            if kind in ("file", "block") and not (
                    create is not None and made_by_serve(pool_path)):
                self.existing_pool(path_node, m.sub("path"), pool_path)
            elif kind == "missing" and create is None:
                self.fail(path_node, m.sub("path"),
                          f"{pool_path} does not exist and the pool has no 'create'; create "
                          "it with 'nbdserver pool create' or add create: {size: ...}")
            elif kind not in ("file", "block", "missing"):
                self.fail(path_node, m.sub("path"),
                          f"{pool_path}: {_describe_file(kind, None)}")
            out.append(PoolConfig(name=name, path=pool_path, create=create, key=path))
        return tuple(out)

    def existing_pool(self, node: Node, key: str, path: Path) -> None:
        """An existing file or device named as a pool must hold one (serve would refuse
        it when it opens the pool): its superblock is read, with no lock taken."""
        from nbdserver.pool.pool import read_superblock  # (heavy import)

        try:
            read_superblock(path)
        except UserError as e:
            self.fail(node, key, str(e))

    def pool_create(self, node: Node, path: str) -> PoolCreate:
        m = _Map(self, node, path, _POOL_CREATE_KEYS,
                 "a mapping such as {size: 20G, blockmap: radix, chunk-size: 4K}")
        size = self.size(m.require("size", " (how large to create the pool)"), m.sub("size"))
        blockmap = DEFAULT_BLOCKMAP
        if (v := m.get("blockmap")) is not None:
            blockmap = self.choice(v, m.sub("blockmap"), self.blockmaps)
        chunk = DEFAULT_CHUNK_SIZE
        if (v := m.get("chunk-size")) is not None:
            chunk = self.size(v, m.sub("chunk-size"))
            if not valid_chunk_size(chunk):
                self.fail(v, m.sub("chunk-size"),
                          f"expected a power of two from 4K to 1M, got {_got(v)}")
        if (least := min_pool_size(size, chunk)) is not None:
            self.fail(m.get("size") or node, m.sub("size"),
                      f"a pool of {format_size(size)} is too small: with "
                      f"{format_size(chunk)} chunks it needs at least {least} bytes "
                      f"(for example {-(-least // (1 << 20))}M)")
        preallocate = ""
        if (v := m.get("preallocate")) is not None:
            preallocate = self.preallocation(v, m.sub("preallocate"))
        return PoolCreate(size=size, blockmap=blockmap, chunk_size=chunk,
                          preallocate=preallocate)

    def exports(self, node: Node | None,
                pools: tuple[PoolConfig, ...]) -> tuple[ExportConfig, ...]:
        out: list[ExportConfig] = []
        names: dict[str, tuple[str, int]] = {}
        pool_files = {_file_identity(p.path): p for p in pools}
        exported: dict[tuple[str, str], tuple[str, str, int]] = {}  # -> (key, name, line)
        creates: dict[tuple[str, str], tuple[str, Node]] = {}  # -> (key, create node)
        sets: dict[tuple[str, str], tuple[str, int]] = {}  # (pool, pattern) -> (key, line)
        for i, item in enumerate(self.sequence(node, "exports", "exports")):
            path = f"exports[{i}]"
            m = _Map(self, item, path, _EXPORT_KEYS, "a mapping with name and file "
                     "(or pool and volume, or pool and volumes)")
            is_set = "volumes" in m
            name = ""
            if is_set:
                self._not_with_volumes(m)
            else:
                name_node = m.require("name", " (the name clients ask for)")
                name = self.text(name_node, m.sub("name"), what="an export name")
                nbytes = len(name.encode("utf-8"))  # (text() refused what UTF-8 cannot hold)
                if "\0" in name:
                    self.fail(name_node, m.sub("name"), "an export name cannot contain a NUL "
                              "character (no client could ask for it)")
                if nbytes > MAX_EXPORT_NAME_BYTES:
                    self.fail(name_node, m.sub("name"), f"export names are at most "
                              f"{MAX_EXPORT_NAME_BYTES} bytes of UTF-8, got {nbytes}")
                if name in names:
                    other, line = names[name]
                    self.fail(name_node, m.sub("name"), f"duplicate export name {name!r} "
                              f"(also {other}.name at line {line})")
                names[name] = (path, name_node.start_mark.line + 1)

            description = ""
            if (v := m.get("description")) is not None:
                if not (isinstance(v, ScalarNode) and v.tag == _NULL):
                    description = self.text(v, m.sub("description"), allow_empty=True)
                if len(description.encode("utf-8")) > MAX_EXPORT_NAME_BYTES:
                    self.fail(v, m.sub("description"), f"at most {MAX_EXPORT_NAME_BYTES} "
                              "bytes of UTF-8")
            read_only = False
            if (v := m.get("read-only")) is not None:
                read_only = self.boolean(v, m.sub("read-only"))
            min_block = DEFAULT_MIN_BLOCK_SIZE
            if (v := m.get("min-block-size")) is not None:
                min_block = self.size(v, m.sub("min-block-size"))
                if min_block > MAX_MIN_BLOCK_SIZE or min_block & (min_block - 1):
                    self.fail(v, m.sub("min-block-size"), "expected a power of two from 1 to "
                              f"65536 (usually 512 or 4096), got {_got(v)}")

            if is_set:
                set_pool, pattern = self.volume_set(m, pools, sets)
                out.append(ExportConfig(
                    name="", description=description, read_only=read_only,
                    min_block_size=min_block, file=None, size=None, pool=set_pool,
                    volume=None, create=None, key=path, volumes=pattern))
                continue
            has_file = "file" in m
            has_pool = "pool" in m or "volume" in m
            if has_file and has_pool:
                other = "pool" if "pool" in m else "volume"
                self.fail(m.key_node(other), m.sub(other),
                          "give either file, or pool and volume, not both")
            if not has_file and not has_pool:
                self.fail(item, path, "missing 'file' (a raw file or block device), "
                                      "'pool' and 'volume' (a volume of a pool) or 'pool' "
                                      "and 'volumes' (its volumes whose names match)")
            file = size = pool = volume = create = None
            if has_file:
                file_node = m.require("file")
                file = self.path(file_node, m.sub("file"))
                if (v := m.get("size")) is not None:
                    size = self.size(v, m.sub("size"))
                    if (why := not_whole_sectors(size, "a file export's size")) is not None:
                        self.fail(v, m.sub("size"), why)
                    if size % min_block:
                        self.fail(v, m.sub("size"), not_whole_blocks(size, min_block))
                if "create" in m:
                    self.fail(m.key_node("create"), m.sub("create"),
                              "create is for pool volumes; a file export is created "
                              "from 'size' when missing")
                if file.is_dir():
                    self.fail(file_node, m.sub("file"),
                              f"{file} is a directory; expected a raw file or block device")
                if (of := pool_files.get(_file_identity(file))) is not None:
                    self.fail(file_node, m.sub("file"),
                              f"{file} is the file of pool {of.name!r} ({of.key}: "
                              f"{of.path}); export one of its volumes with pool: and "
                              "volume: instead")
                if not file.exists() and size is None:
                    if file.parts[:2] == ("/", "dev"):
                        self.fail(file_node, m.sub("file"), f"{file}: no such device")
                    self.fail(file_node, m.sub("file"),
                              f"{file} does not exist; add 'size' (for example size: 1G) "
                              "to create it")
            else:
                if "size" in m:
                    self.fail(m.key_node("size"), m.sub("size"),
                              "size is only for file exports; to create a volume use "
                              "create: {size: 1G}")
                pool = self.pool_ref(m, pools, " (the pool that holds 'volume')")
                volume_node = m.require("volume", " (the volume of the pool to export)")
                volume = self.volume_name(volume_node, m.sub("volume"))
                if (first := exported.get((pool, volume))) is not None:
                    self.fail(volume_node, m.sub("volume"),
                              f"volume {volume!r} of pool {pool!r} is already exported by "
                              f"{first[0]} ({first[1]!r}, line {first[2]}); a volume can be "
                              "exported only once")
                exported[(pool, volume)] = (path, name, volume_node.start_mark.line + 1)
                if (v := m.get("create")) is not None:
                    create = self.volume_create(v, m.sub("create"), volume)
                    creates[(pool, volume)] = (path, v)
                    if create.size is not None and create.size % min_block:
                        self.fail(v, _join(m.sub("create"), "size"),
                                  not_whole_blocks(create.size, min_block))
                    if create.snapshot is not None:  # (a snapshot is read-only)
                        if (ro := m.get("read-only")) is not None and not read_only:
                            self.fail(ro, m.sub("read-only"), "the volume is created as a "
                                      "snapshot, which is read-only; to write to a copy "
                                      f"use create: {{fork: {create.snapshot}}}")
                        read_only = True
                else:
                    of = next(p for p in pools if p.name == pool)
                    if of.create is not None and made_by_serve(of.path):
                        # (serve would make the pool, empty, then find no such volume)
                        self.fail(volume_node, m.sub("volume"),
                                  f"{_made_empty(of)}, so it has no volume {volume!r}; add "
                                  "create: {size: ...} (or fork: or snapshot:) to make the "
                                  "volume")
            out.append(ExportConfig(
                name=name, description=description, read_only=read_only,
                min_block_size=min_block, file=file, size=size, pool=pool, volume=volume,
                create=create, key=path))
        self._sources_in_new_pools(out, pools, creates)
        self._no_copy_cycles(out, creates)
        return tuple(out)

    def pool_ref(self, m: _Map, pools: tuple[PoolConfig, ...], why: str) -> str:
        """An export's ``pool:``, the name of a pool the config defines."""
        node = m.require("pool", why)
        pool = self.name(node, m.sub("pool"), "a pool name")
        if not any(p.name == pool for p in pools):
            known = [p.name for p in pools]
            hint = (f"{_suggest(pool, known)}pools: {_one_of(known)}" if known
                    else "no pools are defined; add one under 'pools:'")
            self.fail(node, m.sub("pool"), f"no pool named {pool!r}; {hint}")
        return pool

    def _not_with_volumes(self, m: _Map) -> None:
        """Refuse the keys an export of a pool's volumes (``volumes:``) cannot have."""
        why = {
            "name": "each volume is served under its own name; export one volume under "
                    "another name with name: and volume:",
            "volume": "give volume (one volume) or volumes (a pattern of volume names), "
                      "not both",
            "file": "volumes: serves volumes of a pool; a file is exported with name: and "
                    "file:",
            "size": "volumes: serves the volumes a pool holds; create one with 'nbdserver "
                    "volume create' (or with name:, volume: and create: in an export)",
            "create": "volumes: serves the volumes a pool holds; create one with 'nbdserver "
                      "volume create', 'volume fork' or 'volume snapshot', live, and "
                      "clients can connect to it at once",
        }
        for key, message in why.items():
            if key in m:
                self.fail(m.key_node(key), m.sub(key), message)

    def volume_set(self, m: _Map, pools: tuple[PoolConfig, ...],
                   sets: dict[tuple[str, str], tuple[str, int]]) -> tuple[str, str]:
        """An export of a pool's volumes by pattern: (pool, pattern)."""
        pool = self.pool_ref(m, pools, " (the pool whose volumes are served)")
        node = m.require("volumes")
        pattern = self.name(node, m.sub("volumes"), "a pattern of volume names")
        tokens = _glob_tokens(pattern) if _PATTERN_RE.fullmatch(pattern) else None
        if tokens is None:
            self.fail(node, m.sub("volumes"), f"{pattern!r} is not a pattern of volume "
                      "names: use the characters of volume names and the shell wildcards "
                      "* ? [...] (each [ closed by a ]), for example \"*\" (quoted: a bare "
                      "* is YAML) or vm-*")
        for (other_pool, other), (key, line) in sets.items():
            if other_pool == pool and _globs_overlap(_glob_tokens(other) or [], tokens):
                example = "the same names" if other == pattern else "names both match"
                self.fail(node, m.sub("volumes"), f"{pattern!r} and {other!r} ({key}.volumes, "
                          f"line {line}) both serve volumes of pool {pool!r} ({example}): "
                          "a volume would be served by the first only, with its settings; "
                          "make the patterns exclusive, for example vm-* and web-*")
        sets[(pool, pattern)] = (m.path, node.start_mark.line + 1)
        return pool, pattern

    def _sources_in_new_pools(self, exports: list[ExportConfig], pools: Sequence[PoolConfig],
                              creates: dict[tuple[str, str], tuple[str, Node]]) -> None:
        """Refuse a fork or snapshot of a volume that no export creates, in a pool serve
        makes (empty: the source can only be a volume the config itself creates)."""
        new_pools = {p.name: p for p in pools if p.create is not None and made_by_serve(p.path)}
        for e in exports:
            if e.create is None or e.create.source is None or e.pool not in new_pools:
                continue
            if (e.pool, e.create.source) not in creates:
                key, node = creates[(e.pool, e.volume)]  # type: ignore[index]
                kind = "fork" if e.create.fork is not None else "snapshot"
                self.fail(node, f"{key}.create.{kind}",
                          f"{_made_empty(new_pools[e.pool])}, and no export creates volume "
                          f"{e.create.source!r} in it, so there is nothing to {kind}")

    def _no_copy_cycles(self, exports: list[ExportConfig],
                        creates: dict[tuple[str, str], tuple[str, Node]]) -> None:
        """Refuse exports whose volumes would each be created as a copy of another's,
        round in a circle (none could be made first)."""
        source = {(e.pool, e.volume): (e.pool, e.create.source) for e in exports
                  if e.create is not None and e.create.source is not None}
        for start in source:
            seen = [start]
            at = source[start]
            while at in source and at not in seen:
                seen.append(at)
                at = source[at]
            if at == start:
                key, node = creates[start]  # type: ignore[index]
                chain = " -> ".join(repr(v) for _, v in [*seen, start])
                self.fail(node, f"{key}.create", f"volumes created from each other in a "
                          f"circle ({chain}); one of them must be created from a size or "
                          "exist already")

    def volume_name(self, node: Node, key: str) -> str:
        """A name a pool volume can have (what ``volume create`` accepts)."""
        from nbdserver.pool.pool import check_volume_name  # (the pool's rule; heavy import)

        name = self.name(node, key, "a volume name")
        try:
            check_volume_name(name)
        except UserError as e:
            self.fail(node, key, str(e))
        return name

    def volume_create(self, node: Node, path: str, volume: str) -> VolumeCreate:
        m = _Map(self, node, path, _VOLUME_CREATE_KEYS,
                 "a mapping such as {size: 1G}, {fork: golden} or {snapshot: golden}")
        if len(m.items) != 1:
            self.fail(node, path, "give exactly one of size (a new thin volume), fork "
                                  "(a writable copy of a volume) or snapshot (a read-only "
                                  "copy of a volume)")
        kind, (_, v) = next(iter(m.items.items()))
        if kind == "size":
            size = self.size(v, m.sub("size"))
            if (why := not_whole_sectors(size, "a volume's size")) is not None:
                self.fail(v, m.sub("size"), why)
            return VolumeCreate(size=size)
        origin = self.volume_name(v, m.sub(kind))
        if origin == volume:
            self.fail(v, m.sub(kind), f"volume {volume!r} cannot be created from itself")
        return VolumeCreate(fork=origin) if kind == "fork" else VolumeCreate(snapshot=origin)


# ----------------------------------------------------------------------------------------
# Explaining
# ----------------------------------------------------------------------------------------


MAX_CONNECTIONS = 1_000_000  # server.max-connections at most (each is a file descriptor)
MAX_TIMEOUT = 86_400.0  # seconds: a server timeout longer than a day is a typo


def _too_long(seconds: float) -> str:
    return f"at most a day ({MAX_TIMEOUT:.0f} s), got {format_duration(seconds)}"


def _stat(path: Path) -> tuple[str, int | None]:
    """("missing"|"file"|"block"|"other"|"error: ...", size or None)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing", None
    except OSError as e:
        return f"error: {e.strerror}", None
    if stat.S_ISREG(st.st_mode):
        return "file", st.st_size
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return "block", None
        try:
            return "block", os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            return "block", None
        finally:
            os.close(fd)
    return "other", None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def made_by_serve(path: Path) -> bool:
    """Whether serve makes a pool at `path` when the pool has `create`: no file there,
    or an empty one (as ``pool create`` sizes an empty file)."""
    kind, size = _stat(path)
    return kind == "missing" or (kind == "file" and size == 0)


def _made_empty(pool: PoolConfig) -> str:
    """Why a pool serve makes holds no volume yet (for messages)."""
    there = "an empty file" if pool.path.exists() else "not there"
    return f"pool {pool.name!r} is made when serve starts ({pool.path} is {there}), empty"


def _describe_file(kind: str, size: int | None) -> str:
    if kind == "file":
        return f"an existing file of {format_size(size or 0)}"
    if kind == "block":
        return ("a block device of " + format_size(size)) if size is not None else \
            "a block device (size unknown: cannot open it)"
    if kind == "other":
        return "neither a regular file nor a block device"
    return kind  # "error: ..."


def config_warnings(config: Config) -> list[str]:
    """Things that are valid but probably not what was meant, each naming its key."""
    out: list[str] = []
    if not config.listen:
        out.append("listen: no listeners are configured; this config can only be served "
                   "through systemd socket activation")
    if not config.exports:
        out.append("exports: no exports are configured; clients will find nothing to use")
    memory = _physical_memory()
    if memory is not None and config.server.cache_size > memory:
        out.append(f"server.cache-size: {format_size(config.server.cache_size)} is more than "
                   f"this machine's memory ({format_size(memory)})")
    for listener in config.listen:
        if listener.host is not None and not _is_ip_address(listener.host):
            try:  # (not an error: under socket activation the listeners are not used)
                socket.getaddrinfo(listener.host, None, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                out.append(f"{listener.key}: cannot resolve host name {listener.host!r} "
                           f"({why}): serve will fail to listen there unless started "
                           "through socket activation")
    made = {p.path.parent for p in config.pools if p.create is not None} | {
        e.file.parent for e in config.exports if e.file is not None and e.size is not None}
    for listener in config.listen:  # (a directory serve makes for a pool or file is meant)
        if listener.path is not None and not listener.path.parent.exists() \
                and listener.path.parent not in made:
            out.append(f"{listener.key}: {listener.path.parent} does not exist; serve "
                       "creates it (unless socket activation passes the sockets)")
    for pool in config.pools:
        c = pool.create
        sb = _superblock(pool.path) if c is not None else None
        if c is not None and sb is not None and (sb.size, sb.blockmap, sb.chunk_size) != (
                c.size, c.blockmap, c.chunk_size):
            out.append(f"{pool.key}.create: not used: the pool exists, {format_size(sb.size)} "
                       f"with the {sb.blockmap} block map and {format_size(sb.chunk_size)} "
                       f"chunks (create says {format_size(c.size)}, {c.blockmap}, "
                       f"{format_size(c.chunk_size)})")
    empty: dict[tuple[str | None, str | None], str] = {}  # made empty -> the export's key
    for export in creation_order(config.exports):  # (a copy after what it copies)
        vc, of = export.create, config.pool_named(export.pool or "")
        if vc is None or of is None or of.create is None or not made_by_serve(of.path):
            continue
        if vc.size is not None:
            empty[(export.pool, export.volume)] = export.key
        elif (maker := empty.get((export.pool, vc.source))) is not None:
            empty[(export.pool, export.volume)] = export.key
            how = "fork" if vc.fork is not None else "snapshot"
            out.append(f"{export.key}.create: a {how} of {vc.source!r}, which {maker} "
                       f"creates empty in the new pool {of.name!r}: {export.volume!r} starts "
                       f"empty too (fill {vc.source!r} first, then create the {how})")
    sets = [e for e in config.exports if e.volumes is not None]
    for i, later in enumerate(sets):
        for first in sets[:i]:
            if first.pool != later.pool and _globs_overlap(
                    _glob_tokens(first.volumes or "") or [], _glob_tokens(later.volumes or "")
                    or []):
                out.append(f"{later.key}.volumes: {later.volumes!r} of pool {later.pool!r} "
                           f"and {first.volumes!r} of pool {first.pool!r} ({first.key}) "
                           "match some names alike: a volume name both pools hold is served "
                           f"from pool {first.pool!r} only")
    files: dict[Path, ExportConfig] = {}
    for export in config.exports:
        if export.file is None:
            continue
        kind, size = _stat(export.file)
        if kind == "missing" and export.read_only:
            out.append(f"{export.key}: read-only, but the file does not exist yet: it will "
                       "be created full of zeros")
        if kind in ("file", "block") and export.size is not None and size is not None \
                and size != export.size:
            out.append(f"{export.key}.size: ignored: {export.file} already exists "
                       f"({format_size(size)}), so it is not created at "
                       f"{format_size(export.size)}")
        if kind == "file" and size == 0:
            out.append(f"{export.key}.file: {export.file} is empty; serving it will fail "
                       "(a size: only creates a missing file)")
        elif kind == "file" and size is not None and size % 512:
            out.append(f"{export.key}.file: {export.file} is {size} bytes, not a multiple of "
                       "512: serve cuts the export to whole blocks of the file's direct-I/O "
                       f"alignment (512 or 4096 bytes: at most the first {size - size % 512} "
                       "are served; an unaligned tail cannot be written with O_DIRECT)")
        elif kind in ("file", "block") and size and size % export.min_block_size:
            out.append(f"{export.key}.file: {export.file}: "
                       + not_whole_blocks(size, export.min_block_size))
        if kind == "other" or kind.startswith("error"):
            out.append(f"{export.key}.file: {export.file}: {_describe_file(kind, size)}")
        other = files.get(export.file)
        if other is not None and not (other.read_only and export.read_only):
            out.append(f"{export.key}.file: {export.file} is also exported by {other.key} "
                       f"({other.name!r}); writes through one show in the other")
        files.setdefault(export.file, export)
    return out


def creation_order(exports: tuple[ExportConfig, ...]) -> list[ExportConfig]:
    """`exports` reordered so that an export whose volume is created as a copy of a
    volume another export creates comes after that export (otherwise in config order;
    the config has no circles, see _no_copy_cycles)."""
    makes = {(e.pool, e.volume): e for e in exports if e.create is not None}
    out: list[ExportConfig] = []
    placed: set[str] = set()

    def place(e: ExportConfig) -> None:
        if e.key in placed:
            return
        placed.add(e.key)
        if e.create is not None and e.create.source is not None:
            first = makes.get((e.pool, e.create.source))
            if first is not None:
                place(first)
        out.append(e)

    for e in exports:
        place(e)
    return out


def _superblock(path: Path) -> Any:
    """The superblock of the pool at `path` (read with no lock), or None when there is
    none to read (no file; not a pool: the parser has refused that already)."""
    from nbdserver.pool.pool import read_superblock  # (heavy import)

    if not path.exists():
        return None
    try:
        return read_superblock(path)
    except (UserError, OSError):
        return None


def _file_identity(path: Path) -> object:
    """What tells two paths to one file apart from two files (file_identity), or for a
    file not made yet, the path with its links resolved."""
    try:
        return file_identity(path)
    except OSError:
        return os.path.realpath(path)


def describe(config: Config) -> str:
    """Explain `config` for people (``nbdserver check-config``): listeners, server
    settings, pools and exports with resolved paths, sizes and what will be created,
    then warnings."""
    lines: list[str] = []
    if config.source is not None:
        lines.append(f"Config file {config.source}")
        lines.append(f"  (relative paths are resolved against {config.source.parent})")
    lines.append("Listeners:")
    if not config.listen:
        lines.append("  none: the sockets must come from systemd socket activation")
    for listener in config.listen:
        if listener.kind == "unix":
            lines.append(f"  Unix socket {listener.path}  [{listener.key}]")
        else:
            free = " (any free port)" if listener.port == 0 else ""
            lines.append(f"  TCP {listener.address}{free}  [{listener.key}]")
    s = config.server
    lines.append(f"Server: {s.io} I/O, up to {s.max_connections} connections, handshake "
                 f"timeout {format_duration(s.handshake_timeout)}, stop timeout "
                 f"{format_duration(s.stop_timeout)}, log level {s.log_level}, "
                 f"block-map cache {format_size(s.cache_size)}")
    if config.pools:
        lines.append("Pools:")
    for pool in config.pools:
        kind, size = _stat(pool.path)
        lines.append(f"  {pool.name}: {pool.path}  [{pool.key}]")
        if kind == "missing":
            if pool.create is not None:
                c = pool.create
                lines.append(f"    does not exist yet; it will be created at "
                             f"{format_size(c.size)} with the {c.blockmap} block map and "
                             f"{format_size(c.chunk_size)} chunks"
                             + (", preallocated and zero-filled" if c.preallocate == "full"
                                else ", preallocated" if c.preallocate else ""))
            else:
                lines.append("    does not exist (and has no 'create')")
        else:
            lines.append(f"    {_describe_file(kind, size)}")
            sb = _superblock(pool.path)
            if sb is not None:
                lines.append(f"    an nbdserver pool of {format_size(sb.size)}: the {sb.blockmap} "
                             f"block map, {format_size(sb.chunk_size)} chunks")
            if pool.create is not None:
                lines.append("    exists, so 'create' is not used")
    lines.append("Exports:" if config.exports else "Exports: none")
    for export in config.exports:
        mode = "read-only" if export.read_only else "read-write"
        if export.volumes is not None:
            source = config.pool_named(export.pool or "")
            where = f" ({source.path})" if source else ""
            lines.append(f"  every volume of pool {export.pool!r}{where} whose name matches "
                         f"{export.volumes!r}, under its own name: {mode}, minimum block "
                         f"size {export.min_block_size}  [{export.key}]")
            lines.append("    as the pool holds them when a client asks (snapshots are "
                         "read-only; a volume a named export serves is not among them)")
            if export.description:
                lines.append(f"    description: {export.description}")
            continue
        lines.append(f"  {export.name!r}: {mode}, minimum block size "
                     f"{export.min_block_size}  [{export.key}]")
        if export.description:
            lines.append(f"    description: {export.description}")
        if export.file is not None:
            kind, size = _stat(export.file)
            lines.append(f"    file {export.file}")
            if kind == "missing":
                assert export.size is not None  # enforced when loading
                lines.append(f"    file does not exist yet; it will be created at "
                             f"{format_size(export.size)}")
            else:
                lines.append(f"    {_describe_file(kind, size)}")
        else:
            source = config.pool_named(export.pool or "")
            where = f" ({source.path})" if source else ""
            lines.append(f"    volume {export.volume!r} of pool {export.pool!r}{where}")
            vc = export.create
            if vc is None:
                lines.append("    the volume must already exist")
            elif vc.size is not None:
                lines.append(f"    if missing, created as an empty thin volume of "
                             f"{format_size(vc.size)}")
            elif vc.fork is not None:
                lines.append(f"    if missing, created as a fork of volume {vc.fork!r}")
            else:
                lines.append(f"    if missing, created as a snapshot of volume "
                             f"{vc.snapshot!r}")
    warnings = config_warnings(config)
    if warnings:
        lines.append("Warnings:")
        lines.extend(f"  warning: {w}" for w in warnings)
    return "\n".join(lines)


def config_to_json(config: Config) -> dict[str, Any]:
    """The configuration as JSON-ready data (``nbdserver check-config --json``).

    The shape is stable; keys are added, never renamed. Keys use the YAML
    spelling, every key is always present (null when unset), paths are
    absolute strings, sizes are integers in bytes and durations are seconds::

        {"source": "/abs/config.yaml" | null,
         "listen": [{"kind": "unix" | "tcp", "path": str | null, "host": str | null,
                     "port": int | null, "key": "listen[0].unix"}],
         "server": {"io": str, "max-connections": int, "handshake-timeout": float,
                    "stop-timeout": float, "log-level": str, "cache-size": int},
         "pools": [{"name": str, "path": str, "key": "pools[0]",
                    "create": {"size": int, "blockmap": str, "chunk-size": int,
                               "preallocate": false | "falloc" | "full"} | null}],
         "exports": [{"name": str | null, "description": str, "read-only": bool,
                      "min-block-size": int, "kind": "file" | "volume" | "volumes",
                      "file": str | null, "size": int | null,
                      "pool": str | null, "volume": str | null, "volumes": str | null,
                      "create": {"size": int | null, "fork": str | null,
                                 "snapshot": str | null} | null,
                      "key": "exports[0]"}]}

    ``name`` is null, and ``volumes`` the pattern, for an export of a pool's volumes.
    """
    s = config.server
    return {
        "source": str(config.source) if config.source is not None else None,
        "listen": [
            {"kind": li.kind, "path": str(li.path) if li.path is not None else None,
             "host": li.host, "port": li.port, "key": li.key}
            for li in config.listen
        ],
        "server": {"io": s.io, "max-connections": s.max_connections,
                   "handshake-timeout": s.handshake_timeout,
                   "stop-timeout": s.stop_timeout, "log-level": s.log_level,
                   "cache-size": s.cache_size},
        "pools": [
            {"name": p.name, "path": str(p.path), "key": p.key,
             "create": None if p.create is None else {
                 "size": p.create.size, "blockmap": p.create.blockmap,
                 "chunk-size": p.create.chunk_size,
                 "preallocate": p.create.preallocate or False}}
            for p in config.pools
        ],
        "exports": [
            {"name": e.name if e.volumes is None else None, "description": e.description,
             "read-only": e.read_only, "min-block-size": e.min_block_size, "kind": e.kind,
             "file": str(e.file) if e.file is not None else None, "size": e.size,
             "pool": e.pool, "volume": e.volume, "volumes": e.volumes,
             "create": None if e.create is None else {
                 "size": e.create.size, "fork": e.create.fork,
                 "snapshot": e.create.snapshot},
             "key": e.key}
            for e in config.exports
        ],
    }


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
