"""nbdserver.config: loading, validation with keyed errors, describe() and JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

import pytest

from nbdserver.config import (
    DEFAULT_CONFIG_PATH,
    KNOWN_BLOCKMAPS,
    Config,
    ExportConfig,
    Listener,
    PoolCreate,
    ServerSettings,
    VolumeCreate,
    config_to_json,
    config_warnings,
    creation_order,
    describe,
    load_config,
    parse_config,
)
from nbdserver.errors import ConfigError, UserError
from nbdserver.pool.pool import Pool

EXAMPLES = DEFAULT_CONFIG_PATH.parent / "examples"

MINIMAL = """\
listen:
  - tcp: 127.0.0.1:10809
exports:
  - name: disk
    file: disk.img
    size: 1M
"""


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str, *, socket_activation: bool = False) -> Config:
    return load_config(write(tmp_path, text), socket_activation=socket_activation)


def error(tmp_path: Path, text: str, **kw: bool) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the `nth` line of `text` that contains `needle`."""
    hits = [i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line]
    return hits[nth - 1]


def expect(tmp_path: Path, text: str, line_needle: str, key: str, *fragments: str,
           nth: int = 1, **kw: bool) -> str:
    """Load `text`, expect a ConfigError at the line holding `line_needle`, naming `key`."""
    msg = error(tmp_path, text, **kw)
    prefix = f"{tmp_path / 'x.yaml'}:{line_of(text, line_needle, nth)}: {key}: "
    assert msg.startswith(prefix), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ----------------------------------------------------------------------------------------
# The default config and the examples
# ----------------------------------------------------------------------------------------


def test_default_config_path() -> None:
    expected = Path(__file__).resolve().parent.parent / "config" / "nbdserver.yaml"
    assert expected == DEFAULT_CONFIG_PATH
    assert DEFAULT_CONFIG_PATH.is_file()


def test_default_config_loads() -> None:
    config = load_config(DEFAULT_CONFIG_PATH)
    repo = DEFAULT_CONFIG_PATH.parent.parent
    assert config.source == DEFAULT_CONFIG_PATH
    assert config.listen == (
        Listener("unix", repo / "data" / "nbd.sock", None, None, "listen[0].unix"),
        Listener("tcp", None, "127.0.0.1", 10809, "listen[1].tcp"),
    )
    assert config.server == ServerSettings()
    (pool,) = config.pools
    assert (pool.name, pool.path, pool.key) == ("main", repo / "data" / "pool.img", "pools[0]")
    assert pool.create == PoolCreate(size=4 << 30, blockmap="radix", chunk_size=4096)
    demo, volumes, scratch = config.exports
    assert (volumes.kind, volumes.pool, volumes.volumes, volumes.key) == (
        "volumes", "main", "*", "exports[1]")
    assert (demo.name, demo.pool, demo.volume, demo.file) == ("demo", "main", "demo", None)
    assert demo.create == VolumeCreate(size=1 << 30)
    assert demo.kind == "volume" and not demo.read_only
    assert (scratch.name, scratch.file, scratch.size) == (
        "scratch", repo / "data" / "scratch.img", 256 << 20)
    assert scratch.kind == "file" and scratch.pool is None and scratch.create is None
    assert config.export_named("scratch") is scratch
    assert config.pool_named("main") is pool
    assert config.pool_named("nope") is None


def test_default_config_from_another_directory(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(DEFAULT_CONFIG_PATH)
    assert config.listen[0].path == DEFAULT_CONFIG_PATH.parent.parent / "data" / "nbd.sock"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    try:
        config = load_config(path)
    except ConfigError as e:  # an example naming a block device this machine lacks
        assert "exports[0].file" in str(e) and "/dev/" in str(e)
        return
    assert config.exports
    assert describe(config)
    json.dumps(config_to_json(config))


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"raw-file.yaml", "block-device-readonly.yaml", "pool.yaml"} <= names


# ----------------------------------------------------------------------------------------
# Defaults, paths and values
# ----------------------------------------------------------------------------------------


def test_minimal_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    assert config.server == ServerSettings(io="aio", max_connections=256,
                                           handshake_timeout=10.0, log_level="info",
                                           cache_size=64 << 20)
    assert config.pools == ()
    (export,) = config.exports
    assert export == ExportConfig(
        name="disk", description="", read_only=False, min_block_size=512,
        file=tmp_path / "disk.img", size=1 << 20, pool=None, volume=None, create=None,
        key="exports[0]")
    assert isinstance(config.listen, tuple) and isinstance(config.exports, tuple)


def test_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.exports[0].name = "x"  # type: ignore[misc]
    assert not hasattr(config, "__dict__")  # slots


def test_relative_paths_resolve_against_config_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc" / "conf"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(conf_dir, """\
        listen:
          - unix: ../run/nbd.sock
          - unix: /abs/nbd.sock
        pools:
          - name: p
            path: ./pools/../pool.img
            create: {size: 1G}
        exports:
          - name: disk
            file: ../../data/disk.img
            size: 1M
        """)
    config = load_config(os.path.relpath(path))
    assert config.source == path
    assert config.listen[0].path == tmp_path / "etc" / "run" / "nbd.sock"
    assert config.listen[1].path == Path("/abs/nbd.sock")
    assert config.pools[0].path == conf_dir / "pool.img"
    assert config.exports[0].file == tmp_path / "data" / "disk.img"


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load(tmp_path, MINIMAL.replace("file: disk.img", "file: ~/disk.img"))
    assert config.exports[0].file == tmp_path / "home" / "disk.img"


def test_parse_config_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(MINIMAL, base_dir=tmp_path / "b")
    assert config.source is None
    assert config.exports[0].file == tmp_path / "b" / "disk.img"
    config = parse_config(MINIMAL, source=tmp_path / "s" / "c.yaml")
    assert config.source == tmp_path / "s" / "c.yaml"
    assert config.exports[0].file == tmp_path / "s" / "disk.img"
    monkeypatch.chdir(tmp_path)
    assert parse_config(MINIMAL).exports[0].file == tmp_path / "disk.img"


def test_parse_config_errors_without_source() -> None:
    with pytest.raises(ConfigError, match=r"^<config>:4: exports\[0\]: unknown key|"
                                          r"^<config>:\d+: exports\[0\]\.bogus: unknown key"):
        parse_config(MINIMAL + "    bogus: 1\n")


def test_config_error_is_a_user_error() -> None:
    assert issubclass(ConfigError, UserError)


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "existing.img").write_bytes(b"\0" * 4096)
    Pool.create(tmp_path / "other.img", 16 << 20)
    config = load(tmp_path, """\
        listen:
          - unix: nbd.sock
          - tcp: "[::1]:0"
          - tcp: localhost:10810
          - tcp: 0.0.0.0:10811
        server:
          io: threads
          max-connections: 4
          handshake-timeout: 500ms
          stop-timeout: 2m
          log-level: DEBUG
          cache-size: 1G
        pools:
          - name: main
            path: pool.img
            create: {size: 20G, blockmap: extent, chunk-size: 64K}
          - name: other
            path: other.img
        exports:
          - name: disk
            file: existing.img
            read-only: true
            description: a disk
            min-block-size: 4K
          - name: vm1
            pool: main
            volume: vm1
            create: {fork: golden}
          - name: vm2
            pool: main
            volume: vm2
            create: {snapshot: golden}
          - name: golden
            pool: main
            volume: golden
            create: {size: 1G}
          - name: archive
            pool: other
            volume: archive
        """)
    assert [(li.kind, li.host, li.port, li.key) for li in config.listen] == [
        ("unix", None, None, "listen[0].unix"),
        ("tcp", "::1", 0, "listen[1].tcp"),
        ("tcp", "localhost", 10810, "listen[2].tcp"),
        ("tcp", "0.0.0.0", 10811, "listen[3].tcp"),
    ]
    assert config.listen[1].address == "[::1]:0"
    assert config.listen[2].address == "localhost:10810"
    assert config.server == ServerSettings("threads", 4, 0.5, "debug", 1 << 30, 120.0)
    assert config.pools[0].create == PoolCreate(20 << 30, "extent", 64 << 10)
    assert config.pools[1].create is None
    disk, vm1, vm2, golden, archive = config.exports
    assert (disk.read_only, disk.description, disk.min_block_size, disk.size) == (
        True, "a disk", 4096, None)
    assert vm1.create == VolumeCreate(fork="golden")
    assert vm2.create == VolumeCreate(snapshot="golden") and vm2.read_only
    assert golden.create == VolumeCreate(size=1 << 30) and golden.pool == "main"
    assert archive.create is None and archive.pool == "other"


def test_plain_scalars_taken_as_written(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL.replace("name: disk", "name: 2024\n    description: yes"))
    assert config.exports[0].name == "2024"
    assert config.exports[0].description == "yes"


def test_sizes_in_many_spellings(tmp_path: Path) -> None:
    for text, expected in [("4096", 4096), ("4_096", 4096), ('"01024"', 1024),
                           ("1.5G", 3 << 29), ("20GiB", 20 << 30), ('"64 KiB"', 64 << 10),
                           ("1t", 1 << 40)]:
        config = load(tmp_path, MINIMAL.replace("size: 1M", f"size: {text}"))
        assert config.exports[0].size == expected, text


def test_export_name_limits(tmp_path: Path) -> None:
    name = "é" * 2048  # 4096 bytes of UTF-8
    config = load(tmp_path, MINIMAL.replace("name: disk", f"name: {name}"))
    assert config.exports[0].name == name
    expect(tmp_path, MINIMAL.replace("name: disk", f"name: {name}x"), "name:",
           "exports[0].name", "at most 4096 bytes", "got 4097")
    expect(tmp_path, MINIMAL.replace("name: disk", 'name: ""'), "name:", "exports[0].name",
           "empty")


def test_merge_keys(tmp_path: Path) -> None:
    config = load(tmp_path, """\
        listen: [{tcp: "127.0.0.1:1"}]
        pools:
          - {name: main, path: pool.img, create: {size: 1G}}
        exports:
          - &base
            name: a
            pool: main
            volume: a
            create: {size: 1M}
            read-only: true
          - <<: *base
            name: b
            volume: b
        """)
    a, b = config.exports
    assert (b.name, b.volume, b.pool, b.read_only) == ("b", "b", "main", True)
    assert a.volume == "a"


def test_socket_activation_allows_no_listeners(tmp_path: Path) -> None:
    no_listen = "\n".join(MINIMAL.splitlines()[2:]) + "\n"
    assert load(tmp_path, no_listen, socket_activation=True).listen == ()
    empty = "listen: []\n" + no_listen
    assert load(tmp_path, empty, socket_activation=True).listen == ()


def test_no_listeners_warns_about_socket_activation(tmp_path: Path) -> None:
    """What check-config accepts without listen: only socket activation can serve it."""
    no_listen = "\n".join(MINIMAL.splitlines()[2:]) + "\n"
    for text in (no_listen, "listen: []\n" + no_listen, "listen:\n" + no_listen):
        config = load(tmp_path, text, socket_activation=True)
        assert "listen: no listeners are configured; this config can only be served " \
               "through systemd socket activation" in config_warnings(config)
        assert "listen: no listeners" in describe(config)
    assert not any(w.startswith("listen") for w in config_warnings(load(tmp_path, MINIMAL)))


def test_custom_blockmap_list(tmp_path: Path) -> None:
    text = """\
        listen: [{unix: s}]
        pools: [{name: p, path: p.img, create: {size: 1G, blockmap: btree}}]
        exports: []
        """
    path = write(tmp_path, text)
    assert load_config(path, blockmaps=("btree",)).pools[0].create == PoolCreate(
        1 << 30, "btree", 4096)
    with pytest.raises(ConfigError, match=r"blockmap: expected one of radix, extent, linear"):
        load_config(path)
    assert KNOWN_BLOCKMAPS == ("radix", "extent", "linear")


def test_existing_file_without_size(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"\0" * 512)
    config = load(tmp_path, MINIMAL.replace("    size: 1M\n", ""))
    assert config.exports[0].size is None


# ----------------------------------------------------------------------------------------
# Errors: YAML level
# ----------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    msg = error(tmp_path, "listen:\n  - tcp: 127.0.0.1:1\nexports: {name: [\n")
    assert msg.startswith(f"{tmp_path / 'x.yaml'}:4:1: invalid YAML: "), msg
    assert "Traceback" not in msg


def test_yaml_error_hints_at_quoting_ipv6(tmp_path: Path) -> None:
    msg = error(tmp_path, "listen:\n  - tcp: [::1]:10809\n")
    assert msg.startswith(f"{tmp_path / 'x.yaml'}:2:"), msg
    assert 'quote IPv6 addresses, as in tcp: "[::1]:10809"' in msg


def test_yaml_error_hints_at_tabs(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("listen:\n\t- tcp: 127.0.0.1:1\n")
    with pytest.raises(ConfigError, match=r"x.yaml:2:\d+: invalid YAML: .*tabs for indentation"):
        load_config(path)
    path.write_text("exports:\n  - name: d\n    file:\ta.img\n")  # a tab, not indenting
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).endswith("use spaces, not a tab, in YAML"), e.value


def test_a_file_that_is_no_text_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"listen: []\n\0\0\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "invalid YAML" in str(e.value) and "\n" not in str(e.value), e.value


def test_two_documents(tmp_path: Path) -> None:
    msg = error(tmp_path, MINIMAL + "---\nlisten: []\n")
    assert "invalid YAML" in msg and "single document" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    msg = error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'x.yaml'}: the config is empty"), msg


@pytest.mark.parametrize(("text", "got"), [("- a\n- b\n", "a list"), ("hello\n", "'hello'"),
                                           ("42\n", "'42'")])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    msg = error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'x.yaml'}:1: (top level): expected a mapping"), msg
    assert got in msg and "listen, server, pools, exports" in msg


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_load_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_bytes(b"listen: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "x.yaml")


# ----------------------------------------------------------------------------------------
# Errors: keys
# ----------------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    text = MINIMAL + "export:\n  - name: x\n"
    expect(tmp_path, text, "export:", "export", "unknown key", "did you mean 'exports'?",
           "valid keys here: listen, server, pools, exports")


def test_unknown_export_key_suggests(tmp_path: Path) -> None:
    text = MINIMAL + "    read_only: true\n"
    expect(tmp_path, text, "read_only", "exports[0].read_only", "did you mean 'read-only'?",
           "valid keys here: name, description, read-only, min-block-size, file, size, pool, "
           "volume, volumes, create")


def test_unknown_key_without_suggestion(tmp_path: Path) -> None:
    msg = expect(tmp_path, MINIMAL + "    zzzz: 1\n", "zzzz", "exports[0].zzzz",
                 "unknown key; valid keys here:")
    assert "did you mean" not in msg


def test_unknown_server_key(tmp_path: Path) -> None:
    text = MINIMAL + "server:\n  max-conections: 3\n"
    expect(tmp_path, text, "max-conections", "server.max-conections",
           "did you mean 'max-connections'?")


def test_duplicate_key(tmp_path: Path) -> None:
    text = MINIMAL + "    size: 2M\n"
    expect(tmp_path, text, "size:", "exports[0].size", "key appears twice",
           f"first at line {line_of(text, 'size:')}", nth=2)


def test_missing_name(tmp_path: Path) -> None:
    text = MINIMAL.replace("  - name: disk\n    file", "  - file")
    expect(tmp_path, text, "- file", "exports[0]", "missing required key 'name'")


def test_missing_listen(tmp_path: Path) -> None:
    text = "\n".join(MINIMAL.splitlines()[2:]) + "\n"
    msg = error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'x.yaml'}:1: (top level): missing required key "
                          "'listen'"), msg
    assert "socket activation" in msg


def test_empty_listen(tmp_path: Path) -> None:
    text = MINIMAL.replace("  - tcp: 127.0.0.1:10809\n", "").replace("listen:", "listen: []")
    expect(tmp_path, text, "listen", "listen", "at least one listener is required",
           "socket activation")


# ----------------------------------------------------------------------------------------
# Errors: types and values
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "key", "fragment"), [
    ('    description: "bad \\ud800"', "exports[0].description",
     "'\\ud800' at character 4 is not valid in UTF-8"),
    ('  - name: "x\\udfff"', "exports[1].name", "not valid in UTF-8"),
    ("    description: !!binary aGVsbG8=", "exports[0].description",
     "unsupported YAML tag 'tag:yaml.org,2002:binary'"),
    ("    description: !!python/str hello", "exports[0].description", "unsupported YAML tag"),
])
def test_strings_a_client_could_not_be_sent(tmp_path: Path, line: str, key: str,
                                            fragment: str) -> None:
    """Names and descriptions go on the wire as UTF-8: a lone surrogate (which YAML's
    escapes allow) or a non-string tag is refused when the config is read, not when a
    client lists the exports."""
    extra = "    file: other.img\n    size: 1M\n" if line.startswith("  - ") else ""
    text = MINIMAL + line + "\n" + extra
    expect(tmp_path, text, line.strip()[:12], key, fragment)


def test_a_volume_name_the_pool_would_refuse_is_a_config_error(tmp_path: Path) -> None:
    """check-config says so too, before serve creates any pool file."""
    text = POOLED.replace("volume: vm1", 'volume: "bad/vol!"')
    expect(tmp_path, text, "volume: ", "exports[1].volume", "invalid volume name 'bad/vol!'")


def test_an_export_name_with_nul_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("name: disk", 'name: "di\\0sk"')
    expect(tmp_path, text, "name:", "exports[0].name", "cannot contain a NUL")


def test_a_date_is_text_where_a_string_is_expected(tmp_path: Path) -> None:
    text = MINIMAL + "    description: 2024-01-01\n"
    assert load(tmp_path, text).exports[0].description == "2024-01-01"


@pytest.mark.parametrize(("value", "got"), [
    ("yes", "got 'yes'"), ("no", "got 'no'"), ("on", "got 'on'"), ("1", "got '1'"),
    ('"true"', "got 'true' (a quoted string)"), ("", "got nothing"), ("[true]", "got a list"),
])
def test_read_only_must_be_a_real_boolean(tmp_path: Path, value: str, got: str) -> None:
    text = MINIMAL + f"    read-only: {value}\n"
    expect(tmp_path, text, "read-only", "exports[0].read-only",
           f"expected true or false, {got}")


@pytest.mark.parametrize("value", ["true", "false", "True", "FALSE"])
def test_booleans(tmp_path: Path, value: str) -> None:
    config = load(tmp_path, MINIMAL + f"    read-only: {value}\n")
    assert config.exports[0].read_only is (value.lower() == "true")


def test_error_line_example_from_the_brief(tmp_path: Path) -> None:
    text = """\
        listen:
          - unix: nbd.sock
        exports:
          - name: disk
            file: disk.img
            size: 1G
            read-only: yes
        """
    msg = error(tmp_path, text)
    assert msg == f"{tmp_path / 'x.yaml'}:7: exports[0].read-only: expected true or false, " \
                  "got 'yes'"


@pytest.mark.parametrize(("value", "fragment"), [
    ("0", "greater than zero"),
    ("-1G", "cannot be negative"),
    ("-5", "cannot be negative"),
    ("1.5", "not a whole number of bytes"),
    ("lots", "expected a size"),
    ("true", "expected a size"),
    ("[1]", "expected a size"),
    ("", "expected a size"),
    ("9E", "too large"),
])
def test_bad_export_size(tmp_path: Path, value: str, fragment: str) -> None:
    text = MINIMAL.replace("size: 1M", f"size: {value}")
    expect(tmp_path, text, "size:", "exports[0].size", fragment)


def test_too_large_size_message_is_exact(tmp_path: Path) -> None:
    """The limit is 2**63 - 1 bytes: not "at most 8.00 EiB", which 8E is."""
    for value in ("8E", str(1 << 63)):
        msg = expect(tmp_path, MINIMAL.replace("size: 1M", f"size: {value}"), "size:",
                     "exports[0].size", f"'{value}' is too large",
                     "less than 8 EiB", f"at most {(1 << 63) - 1} bytes")
        assert "8.00" not in msg
    config = load(tmp_path, MINIMAL.replace("size: 1M", f"size: {(1 << 63) - 512}"))
    assert config.exports[0].size == (1 << 63) - 512


@pytest.mark.parametrize(("value", "reading"), [
    ("01000", "01000 would read as octal 512 in YAML"),
    ("0100000", "0100000 would read as octal 32768 in YAML"),
    ("1:20", "1:20 would read as base 60 80 in YAML"),
    ("0x1000", "0x1000 would read as hexadecimal 4096 in YAML"),
    ("0b1000000000", "0b1000000000 would read as binary 512 in YAML"),
    ("00", "00 would read as octal 0 in YAML"),
])
def test_sizes_must_be_decimal(tmp_path: Path, value: str, reading: str) -> None:
    """YAML 1.1 reads these integers in another base: silently, a size other than meant."""
    text = MINIMAL.replace("size: 1M", f"size: {value}")
    expect(tmp_path, text, "size:", "exports[0].size",
           f"{reading}; write sizes in decimal or with a unit (e.g. 1000, 4K)")


@pytest.mark.parametrize(("line", "key", "reading"), [
    ("server:\n  max-connections: 010", "server.max-connections", "octal 8"),
    ("server:\n  cache-size: 0x10000000", "server.cache-size", "hexadecimal 268435456"),
    ("server:\n  handshake-timeout: 1:30", "server.handshake-timeout", "base 60 90"),
    ("server:\n  stop-timeout: 1:30.5", "server.stop-timeout", "base 60 90.5"),
    ("pools: [{name: p, path: p.img, create: {size: 1G, chunk-size: 010000}}]",
     "pools[0].create.chunk-size", "octal 4096"),
    ("    min-block-size: 01000", "exports[0].min-block-size", "octal 512"),
])
def test_other_numbers_must_be_decimal(tmp_path: Path, line: str, key: str,
                                       reading: str) -> None:
    text = MINIMAL + line + "\n"
    expect(tmp_path, text, line.splitlines()[-1].strip()[:14], key,
           f"would read as {reading} in YAML; write ")


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("io", "uring", "expected one of aio, threads, got 'uring'"),
    ("io", "thread", "did you mean 'threads'?"),
    ("log-level", "verbose", "expected one of debug, info, warning, error"),
    ("log-level", "warn", "did you mean 'warning'?"),
    ("max-connections", "0", "must be from 1 to 1,000,000, got 0"),
    ("max-connections", "99999999999999999999", "must be from 1 to 1,000,000"),
    ("handshake-timeout", "99999999999999999999", "at most a day (86400 s)"),
    ("stop-timeout", "25h", "at most a day (86400 s)"),
    ("max-connections", "many", "expected a whole number of connections, got 'many'"),
    ("max-connections", "1.5", "expected a whole number"),
    ("handshake-timeout", "0", "greater than zero"),
    ("handshake-timeout", "soon", "expected seconds"),
    ("stop-timeout", "0", "greater than zero"),
    ("stop-timeout", "later", "expected seconds"),
    ("cache-size", "0", "greater than zero"),
    ("cache-size", "1", "at least 64 KiB (16 metadata pages), got 1 B"),
])
def test_bad_server_settings(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    text = MINIMAL + f"server:\n  {key}: {value}\n"
    expect(tmp_path, text, f"{key}:", f"server.{key}", fragment)


def test_a_cache_larger_than_the_machine_is_a_warning(tmp_path: Path) -> None:
    warnings = config_warnings(load(tmp_path, MINIMAL + "server:\n  cache-size: 1P\n"))
    assert any(w.startswith("server.cache-size: 1 PiB is more than this machine's memory")
               for w in warnings), warnings
    assert not config_warnings(load(tmp_path, MINIMAL + "server:\n  cache-size: 1M\n"))


def test_server_not_a_mapping(tmp_path: Path) -> None:
    expect(tmp_path, MINIMAL + "server: fast\n", "server:", "server",
           "expected a mapping of server settings, got 'fast'")


def test_exports_not_a_list(tmp_path: Path) -> None:
    text = "listen: [{unix: s}]\nexports:\n  name: disk\n"
    expect(tmp_path, text, "name: disk", "exports", "expected a list of exports")


def test_export_not_a_mapping(tmp_path: Path) -> None:
    text = "listen: [{unix: s}]\nexports:\n  - disk\n"
    expect(tmp_path, text, "- disk", "exports[0]", "expected a mapping", "got 'disk'")


def test_min_block_size(tmp_path: Path) -> None:
    for value, expected in [("1", 1), ("512", 512), ("4096", 4096), ("64K", 65536)]:
        config = load(tmp_path, MINIMAL + f"    min-block-size: {value}\n")
        assert config.exports[0].min_block_size == expected
    for value in ["3000", "128K", "0"]:
        expect(tmp_path, MINIMAL + f"    min-block-size: {value}\n", "min-block-size",
               "exports[0].min-block-size")


# ----------------------------------------------------------------------------------------
# Errors: exports, pools and their relations
# ----------------------------------------------------------------------------------------

POOLED = """\
listen: [{unix: nbd.sock}]
pools:
  - name: main
    path: pool.img
    create: {size: 20G, blockmap: radix, chunk-size: 4K}
exports:
  - name: disk
    file: disk.img
    size: 1M
  - name: vm1
    pool: main
    volume: vm1
    create: {size: 1G}
"""


def test_pooled_loads(tmp_path: Path) -> None:
    config = load(tmp_path, POOLED)
    assert config.exports[1].pool == "main"


def test_duplicate_export_names_name_both_lines(tmp_path: Path) -> None:
    text = POOLED.replace("name: vm1", "name: disk")
    expect(tmp_path, text, "name: disk", "exports[1].name", "duplicate export name 'disk'",
           f"exports[0].name at line {line_of(text, 'name: disk')}", nth=2)


def test_duplicate_pool_names(tmp_path: Path) -> None:
    text = POOLED.replace("exports:", "  - name: main\n    path: other.img\nexports:")
    expect(tmp_path, text, "name: main", "pools[1].name", "duplicate pool name 'main'",
           f"pools[0].name at line {line_of(text, 'name: main')}", nth=2)


def test_unknown_pool_suggests(tmp_path: Path) -> None:
    text = POOLED.replace("pool: main", "pool: mian")
    expect(tmp_path, text, "pool: mian", "exports[1].pool", "no pool named 'mian'",
           "did you mean 'main'?", "pools: main")


def test_unknown_pool_when_there_are_none(tmp_path: Path) -> None:
    text = MINIMAL + "  - name: vm\n    pool: main\n    volume: vm\n"
    expect(tmp_path, text, "pool: main", "exports[1].pool", "no pools are defined")


def test_file_and_pool(tmp_path: Path) -> None:
    text = POOLED.replace("    size: 1M\n", "    pool: main\n")
    expect(tmp_path, text, "pool: main", "exports[0].pool",
           "either file, or pool and volume, not both")


def test_neither_file_nor_pool(tmp_path: Path) -> None:
    text = MINIMAL.replace("    file: disk.img\n    size: 1M\n", "    read-only: true\n")
    expect(tmp_path, text, "- name: disk", "exports[0]", "missing 'file'",
           "'pool' and 'volume'")


def test_pool_without_volume(tmp_path: Path) -> None:
    text = POOLED.replace("    volume: vm1\n", "")
    expect(tmp_path, text, "- name: vm1", "exports[1]", "missing required key 'volume'")


def test_volume_without_pool(tmp_path: Path) -> None:
    text = POOLED.replace("    pool: main\n", "")
    expect(tmp_path, text, "- name: vm1", "exports[1]", "missing required key 'pool'")


def test_size_only_with_file(tmp_path: Path) -> None:
    text = POOLED.replace("    create: {size: 1G}\n", "    size: 1G\n")
    expect(tmp_path, text, "size: 1G", "exports[1].size", "only for file exports",
           "create: {size: 1G}")


def test_create_only_with_pool(tmp_path: Path) -> None:
    text = MINIMAL + "    create: {size: 1G}\n"
    expect(tmp_path, text, "create:", "exports[0].create", "create is for pool volumes")


def test_missing_file_without_size_names_key_and_path(tmp_path: Path) -> None:
    text = MINIMAL.replace("    size: 1M\n", "")
    expect(tmp_path, text, "file:", "exports[0].file",
           f"{tmp_path / 'disk.img'} does not exist", "add 'size'")


def test_missing_device(tmp_path: Path) -> None:
    text = MINIMAL.replace("    size: 1M\n", "").replace("disk.img", "/dev/no-such-disk")
    expect(tmp_path, text, "file:", "exports[0].file", "/dev/no-such-disk: no such device")


def test_file_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "disk.img").mkdir()
    expect(tmp_path, MINIMAL, "file:", "exports[0].file", "is a directory")


def test_pool_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "pool.img").mkdir()
    expect(tmp_path, POOLED, "path: pool.img", "pools[0].path", "is a directory")


@pytest.mark.parametrize("path", ["./pool.img", "sym.img", "hard.img"])
def test_file_export_of_a_pool_file(tmp_path: Path, path: str) -> None:
    """Through any path to it, links included: a raw export of a pool's file lets a
    client overwrite the pool's metadata under the server that serves the pool."""
    (tmp_path / "pool.img").write_bytes(b"")
    (tmp_path / "sym.img").symlink_to("pool.img")
    (tmp_path / "hard.img").hardlink_to(tmp_path / "pool.img")
    text = POOLED.replace("file: disk.img", f"file: {path}")
    expect(tmp_path, text, "file:", "exports[0].file", "is the file of pool 'main'")


def test_file_export_of_a_pool_file_serve_makes(tmp_path: Path) -> None:
    """Not 'add a size' (which would then say this): the file is the pool's."""
    text = POOLED.replace("file: disk.img\n    size: 1M", "file: pool.img")
    expect(tmp_path, text, "file:", "exports[0].file", "is the file of pool 'main'")


@pytest.mark.parametrize(("create", "key", "fragment"), [
    ("{}", "exports[1].create", "give exactly one of size"),
    ("{size: 1G, fork: golden}", "exports[1].create", "give exactly one of size"),
    ("{fork: vm1}", "exports[1].create.fork", "cannot be created from itself"),
    ("{forks: golden}", "exports[1].create.forks", "did you mean 'fork'?"),
    ("{size: 0}", "exports[1].create.size", "greater than zero"),
    ("{fork: ''}", "exports[1].create.fork", "empty"),
    ("golden", "exports[1].create", "expected a mapping such as {size: 1G}"),
    ("{fork: 'bad/vol!'}", "exports[1].create.fork", "invalid volume name 'bad/vol!'"),
])
def test_bad_volume_create(tmp_path: Path, create: str, key: str, fragment: str) -> None:
    text = POOLED.replace("create: {size: 1G}", f"create: {create}")
    expect(tmp_path, text, f"create: {create}", key, fragment)


@pytest.mark.parametrize(("create", "key", "fragment"), [
    ("{blockmap: radix}", "pools[0].create", "missing required key 'size'"),
    ("{size: 20G, blockmap: btree}", "pools[0].create.blockmap",
     "expected one of radix, extent, linear, got 'btree'"),
    ("{size: 20G, blockmap: radx}", "pools[0].create.blockmap", "did you mean 'radix'?"),
    ("{size: 20G, chunk-size: 2K}", "pools[0].create.chunk-size",
     "power of two from 4K to 1M"),
    ("{size: 20G, chunk-size: 2M}", "pools[0].create.chunk-size", "power of two"),
    ("{size: 20G, chunk-size: 12K}", "pools[0].create.chunk-size", "power of two"),
    ("{size: -1G}", "pools[0].create.size", "negative"),
    ("{size: 16K, chunk-size: 64K}", "pools[0].create.size", "too small"),
    ("{size: 20G, preallocate: yes-please}", "pools[0].create.preallocate",
     "expected true, false, falloc or full, got 'yes-please'"),
    ("{size: 20G, preallocate: 1}", "pools[0].create.preallocate",
     "expected true, false, falloc or full, got '1'"),
    ("{size: 20G, prealocate: true}", "pools[0].create.prealocate",
     "did you mean 'preallocate'?"),
])
def test_bad_pool_create(tmp_path: Path, create: str, key: str, fragment: str) -> None:
    text = POOLED.replace("create: {size: 20G, blockmap: radix, chunk-size: 4K}",
                          f"create: {create}")
    expect(tmp_path, text, f"create: {create}", key, fragment)


@pytest.mark.parametrize(("value", "mode", "shown"), [
    ("true", "falloc", "falloc"), ("falloc", "falloc", "falloc"), ("full", "full", "full"),
    ("false", "", False), (None, "", False)])
def test_pool_create_preallocate(tmp_path: Path, value: str | None, mode: str,
                                 shown: str | bool) -> None:
    text = POOLED if value is None else POOLED.replace(
        "chunk-size: 4K}", f"chunk-size: 4K, preallocate: {value}}}")
    config = load(tmp_path, text)
    assert config.pools[0].create is not None and config.pools[0].create.preallocate == mode
    assert config_to_json(config)["pools"][0]["create"]["preallocate"] == shown
    described = describe(config)
    assert ("preallocated and zero-filled" in described) is (mode == "full")
    assert ("preallocated" in described) is bool(mode)


@pytest.mark.parametrize("create", ["{size: 64K}", "{size: 2M, chunk-size: 1M}",
                                    "{size: 20M, chunk-size: 1M}"])
def test_pool_too_small_for_its_layout(tmp_path: Path, create: str) -> None:
    """Room for one chunk is not enough: the superblock, journal, catalog and metadata
    come first (Pool.create would refuse it when serve starts)."""
    text = POOLED.replace("create: {size: 20G, blockmap: radix, chunk-size: 4K}",
                          f"create: {create}")
    expect(tmp_path, text, "create:", "pools[0].create.size", "is too small",
           "chunks it needs at least ", " bytes (for example ")


@pytest.mark.parametrize("chunk", ["4K", "64K", "1M"])
def test_pool_minimum_size_is_what_pool_create_needs(tmp_path: Path, chunk: str) -> None:
    """The minimum the config states is exact, and agrees with Pool.create."""
    from nbdserver.pool.pool import Pool

    def pooled(size: int) -> str:
        return POOLED.replace("create: {size: 20G, blockmap: radix, chunk-size: 4K}",
                              f"create: {{size: {size}, chunk-size: {chunk}}}")

    chunk_size = {"4K": 4 << 10, "64K": 64 << 10, "1M": 1 << 20}[chunk]
    msg = error(tmp_path, pooled(1 << 20))
    least = int(msg.split("needs at least ")[1].split(" bytes")[0])
    assert load(tmp_path, pooled(least)).pools[0].create == PoolCreate(least, "radix",
                                                                      chunk_size)
    assert f"needs at least {least} bytes" in error(tmp_path, pooled(least - 1))
    Pool.create(tmp_path / "ok.img", least, chunk_size=chunk_size)
    with pytest.raises(UserError, match="too small"):
        Pool.create(tmp_path / "small.img", least - 1, chunk_size=chunk_size)


@pytest.mark.parametrize("second", ["pool.img", "./sub/../pool.img", "~/pool.img",
                                    "link.img", "hard.img"])
def test_two_pools_with_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 second: str) -> None:
    """Serve would find the pool locked by itself, wait, and blame another process."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "link.img").symlink_to("pool.img")
    (tmp_path / "pool.img").write_bytes(b"")
    (tmp_path / "hard.img").hardlink_to(tmp_path / "pool.img")
    text = POOLED.replace("exports:", f"  - name: other\n    path: {second}\nexports:")
    expect(tmp_path, text, f"path: {second}", "pools[1].path",
           "is the file of pool 'main' too",
           f"(pools[0].path at line {line_of(text, 'path: pool.img')})",
           "each pool needs its own file", nth=2 if second == "pool.img" else 1)
    text = POOLED.replace("exports:", "  - name: other\n    path: pool2.img\n"
                                      "    create: {size: 1G}\nexports:")
    assert [p.name for p in load(tmp_path, text).pools] == ["main", "other"]


def test_volume_create_size_must_be_a_multiple_of_512(tmp_path: Path) -> None:
    text = POOLED.replace("create: {size: 1G}", "create: {size: 1000}")
    expect(tmp_path, text, "create: {size: 1000}", "exports[1].create.size",
           "a volume's size must be a multiple of 512 bytes, got 1000 (for example 1024)")
    text = POOLED.replace("create: {size: 1G}", "create: {size: 1536}")
    assert load(tmp_path, text).exports[1].create == VolumeCreate(size=1536)


def test_a_volume_exported_twice(tmp_path: Path) -> None:
    """Serve would refuse the second export when it opens the volume."""
    text = POOLED + "  - name: vm1-again\n    pool: main\n    volume: vm1\n    read-only: true\n"
    expect(tmp_path, text, "volume: vm1", "exports[2].volume",
           "volume 'vm1' of pool 'main' is already exported by exports[1] ('vm1', line "
           f"{line_of(text, 'volume: vm1')})", nth=2)
    Pool.create(tmp_path / "p2.img", 16 << 20)
    other = POOLED.replace("exports:", "  - name: p2\n    path: p2.img\nexports:") + \
        "  - name: vm1-p2\n    pool: p2\n    volume: vm1\n"
    assert [e.volume for e in load(tmp_path, other).exports] == [None, "vm1", "vm1"]


def test_pool_missing_path(tmp_path: Path) -> None:
    text = POOLED.replace("    path: pool.img\n", "")
    expect(tmp_path, text, "- name: main", "pools[0]", "missing required key 'path'")


def test_pool_name_spaces(tmp_path: Path) -> None:
    text = POOLED.replace("- name: main", "- name: ' main'")
    expect(tmp_path, text, "name: ' main'", "pools[0].name", "leading or trailing spaces")


# ----------------------------------------------------------------------------------------
# Errors: listeners
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "fragment"), [
    ("127.0.0.1", "(no port)"),
    ("10809", "(no port)"),
    ("localhost:http", "expected HOST:PORT"),
    ("127.0.0.1:99999", "port 99999 is out of range"),
    (":10809", "missing host"),
    ("::1:10809", "put an IPv6 address in brackets"),
    ('"[nothost]:10809"', "is not an IPv6 address"),
    ("bad_host!:10809", "is not a host name or IP address"),
    ("'127.0.0.1:'", "expected HOST:PORT"),
    ("", "expected HOST:PORT"),
    ("{host: x}", "got a mapping"),
])
def test_malformed_host_port(tmp_path: Path, value: str, fragment: str) -> None:
    text = MINIMAL.replace("tcp: 127.0.0.1:10809", f"tcp: {value}")
    expect(tmp_path, text, "tcp:", "listen[0].tcp", fragment)


def test_unquoted_ipv6_in_flow_list(tmp_path: Path) -> None:
    text = MINIMAL.replace("- tcp: 127.0.0.1:10809", "- tcp: [\"::1\"]")
    expect(tmp_path, text, "tcp:", "listen[0].tcp", "got a list", "quote IPv6")


def test_listener_with_two_kinds(tmp_path: Path) -> None:
    text = MINIMAL.replace("  - tcp: 127.0.0.1:10809\n",
                           "  - tcp: 127.0.0.1:10809\n    unix: s.sock\n")
    expect(tmp_path, text, "- tcp", "listen[0]", "exactly one of unix: PATH or tcp: HOST:PORT")


def test_listener_unknown_kind(tmp_path: Path) -> None:
    text = MINIMAL.replace("tcp: 127.0.0.1:10809", "udp: 127.0.0.1:10809")
    expect(tmp_path, text, "udp", "listen[0].udp", "unknown key", "valid keys here: unix, tcp")


def test_listener_not_a_mapping(tmp_path: Path) -> None:
    text = MINIMAL.replace("- tcp: 127.0.0.1:10809", "- 127.0.0.1:10809")
    expect(tmp_path, text, "- 127", "listen[0]", "unix: PATH or tcp: HOST:PORT")


def test_duplicate_listeners(tmp_path: Path) -> None:
    text = MINIMAL.replace("  - tcp: 127.0.0.1:10809\n",
                           "  - tcp: 127.0.0.1:10809\n  - unix: a.sock\n"
                           "  - tcp: 127.0.0.1:10809\n")
    expect(tmp_path, text, "tcp:", "listen[2].tcp", "the same address as listen[0].tcp",
           f"(line {line_of(text, 'tcp:')})", nth=2)


def test_port_zero_may_repeat(tmp_path: Path) -> None:
    text = MINIMAL.replace("  - tcp: 127.0.0.1:10809\n",
                           "  - tcp: 127.0.0.1:0\n  - tcp: 127.0.0.1:0\n")
    assert [li.port for li in load(tmp_path, text).listen] == [0, 0]


# ----------------------------------------------------------------------------------------
# describe() and config_to_json()
# ----------------------------------------------------------------------------------------


def test_describe_default_config_shape(tmp_path: Path) -> None:
    text = DEFAULT_CONFIG_PATH.read_text()
    config = parse_config(text, source=tmp_path / "config" / "nbdserver.yaml")
    out = describe(config)
    data = tmp_path / "data"
    assert f"Unix socket {data / 'nbd.sock'}  [listen[0].unix]" in out
    assert "TCP 127.0.0.1:10809  [listen[1].tcp]" in out
    assert "aio I/O, up to 256 connections, handshake timeout 10 s, stop timeout 30 s, " \
           "log level info, block-map cache 64 MiB" in out
    assert f"main: {data / 'pool.img'}  [pools[0]]" in out
    assert "does not exist yet; it will be created at 4 GiB with the radix block map and " \
           "4 KiB chunks" in out
    assert "'demo': read-write" in out
    assert f"volume 'demo' of pool 'main' ({data / 'pool.img'})" in out
    assert "if missing, created as an empty thin volume of 1 GiB" in out
    assert "'scratch': read-write" in out
    assert f"file {data / 'scratch.img'}" in out
    assert "file does not exist yet; it will be created at 256 MiB" in out
    assert "Warnings" not in out


def test_describe_existing_files_and_warnings(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"\0" * 8192)
    Pool.create(tmp_path / "pool.img", 16 << 20)  # (a file that is no pool is refused)
    (tmp_path / "empty.img").write_bytes(b"")
    config = load(tmp_path, """\
        listen: [{unix: s.sock}, {tcp: "[::1]:0"}]
        pools:
          - {name: main, path: pool.img, create: {size: 1G}}
        exports:
          - {name: disk, file: disk.img, size: 1G}
          - {name: new, file: new.img, size: 2M, read-only: true}
          - {name: same, file: disk.img}
          - {name: empty, file: empty.img}
          - {name: f, pool: main, volume: f, create: {fork: base}}
          - {name: s, pool: main, volume: s, create: {snapshot: base}}
          - {name: e, pool: main, volume: e, description: existing volume}
        """)
    out = describe(config)
    assert "TCP [::1]:0 (any free port)" in out
    assert "an existing file of 8 KiB" in out
    assert "exists, so 'create' is not used" in out
    assert "created as a fork of volume 'base'" in out
    assert "created as a snapshot of volume 'base'" in out
    assert "the volume must already exist" in out
    assert "description: existing volume" in out
    warnings = config_warnings(config)
    assert any(w.startswith("exports[0].size: ignored") and "(8 KiB)" in w and "1 GiB" in w
               for w in warnings), warnings
    assert any(w.startswith("exports[1]: read-only") for w in warnings), warnings
    assert any(w.startswith("exports[2].file:") and "also exported by exports[0]" in w
               for w in warnings), warnings
    assert any(w.startswith("exports[3].file:") and "is empty" in w for w in warnings)
    assert "Warnings:" in out
    for w in warnings:
        assert f"warning: {w}" in out


def test_unusable_paths_are_errors(tmp_path: Path) -> None:
    """What serve would refuse at start: a pool that is not there and that it may not
    create, a path under a file, a symbolic-link loop, a name too long."""
    text = POOLED.replace("exports:", "  - name: gone\n    path: gone.img\nexports:")
    expect(tmp_path, text, "path: gone.img", "pools[1].path", "gone.img does not exist and "
           "the pool has no 'create'", "nbdserver pool create")
    (tmp_path / "a-file").write_bytes(b"")
    expect(tmp_path, POOLED.replace("file: disk.img", "file: a-file/disk.img"),
           "file: a-file", "exports[0].file", "a-file/disk.img: Not a directory")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    expect(tmp_path, POOLED.replace("path: pool.img", "path: loop1"), "path: loop1",
           "pools[0].path", "loop1: Too many levels of symbolic links")
    long = "x" * 300 + ".img"
    expect(tmp_path, POOLED.replace("file: disk.img", f"file: {long}"), "file: x",
           "exports[0].file", "File name too long")


def test_a_socket_directory_serve_would_make_is_a_warning(tmp_path: Path) -> None:
    """serve makes a missing directory for a Unix socket: a typo there would make a
    tree, so check-config says so, unless a pool or file serve makes goes there too."""
    text = POOLED.replace("unix: nbd.sock", "unix: run/nbd.sock")
    warnings = config_warnings(load(tmp_path, text))
    assert f"listen[0].unix: {tmp_path / 'run'} does not exist; serve creates it (unless " \
        "socket activation passes the sockets)" in warnings
    text = text.replace("path: pool.img", "path: run/pool.img")
    assert not any("serve creates it" in w for w in config_warnings(load(tmp_path, text)))


def test_describe_socket_activation_and_no_exports(tmp_path: Path) -> None:
    config = load(tmp_path, "exports: []\n", socket_activation=True)
    out = describe(config)
    assert "systemd socket activation" in out
    assert "Exports: none" in out
    assert "no exports are configured" in out


def test_long_unix_socket_path_is_an_error(tmp_path: Path) -> None:
    """Listening would fail: check-config says so, naming the key."""
    longest = "/" + "s" * 106  # 107 bytes: the kernel's limit
    config = load(tmp_path, MINIMAL.replace("tcp: 127.0.0.1:10809", f"unix: {longest}"))
    assert config.listen[0].path == Path(longest)
    text = MINIMAL.replace("tcp: 127.0.0.1:10809", f"unix: {longest}s")
    expect(tmp_path, text, "unix:", "listen[0].unix", "is 108 bytes", "at most 107 bytes")
    deep = "d" * 60 + "/" + "e" * 60 + "/s.sock"  # relative: long once resolved
    expect(tmp_path, MINIMAL.replace("tcp: 127.0.0.1:10809", f"unix: {deep}"), "unix:",
           "listen[0].unix", str(tmp_path / deep))


def test_config_to_json(tmp_path: Path) -> None:
    config = load(tmp_path, POOLED.replace("listen: [{unix: nbd.sock}]",
                                           "listen: [{unix: nbd.sock}, {tcp: '[::1]:5'}]"))
    data = config_to_json(config)
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "source": str(tmp_path / "x.yaml"),
        "listen": [
            {"kind": "unix", "path": str(tmp_path / "nbd.sock"), "host": None, "port": None,
             "key": "listen[0].unix"},
            {"kind": "tcp", "path": None, "host": "::1", "port": 5, "key": "listen[1].tcp"},
        ],
        "server": {"io": "aio", "max-connections": 256, "handshake-timeout": 10.0,
                   "stop-timeout": 30.0, "log-level": "info", "cache-size": 64 << 20},
        "pools": [{"name": "main", "path": str(tmp_path / "pool.img"), "key": "pools[0]",
                   "create": {"size": 20 << 30, "blockmap": "radix", "chunk-size": 4096,
                              "preallocate": False}}],
        "exports": [
            {"name": "disk", "description": "", "read-only": False, "min-block-size": 512,
             "kind": "file", "file": str(tmp_path / "disk.img"), "size": 1 << 20,
             "pool": None, "volume": None, "volumes": None, "create": None,
             "key": "exports[0]"},
            {"name": "vm1", "description": "", "read-only": False, "min-block-size": 512,
             "kind": "volume", "file": None, "size": None, "pool": "main", "volume": "vm1",
             "volumes": None, "create": {"size": 1 << 30, "fork": None, "snapshot": None},
             "key": "exports[1]"},
        ],
    }


def test_config_to_json_without_source() -> None:
    assert config_to_json(parse_config(MINIMAL))["source"] is None


def test_file_export_size_must_be_a_multiple_of_512(tmp_path: Path) -> None:
    """A size no client can address whole (the export is served in 512-byte sectors):
    refused, with the next size that is, instead of a file served short."""
    text = MINIMAL.replace("size: 1M", "size: 1000")
    expect(tmp_path, text, "size: 1000", "exports[0].size", "multiple of 512 bytes",
           "got 1000", "for example 1024")


def test_a_volume_created_as_a_snapshot_is_exported_read_only(tmp_path: Path) -> None:
    """check-config and --json must say what serve does: a snapshot is read-only."""
    golden = "  - {name: golden, pool: main, volume: golden, create: {size: 1G}}\n"
    text = POOLED.replace("create: {size: 1G}", "create: {snapshot: golden}") + golden
    (export,) = [e for e in load(tmp_path, text).exports if e.name == "vm1"]
    assert export.read_only
    text = POOLED.replace("    create: {size: 1G}",
                          "    read-only: false\n    create: {snapshot: golden}") + golden
    expect(tmp_path, text, "read-only: false", "exports[1].read-only", "snapshot",
           "read-only", "create: {fork: golden}")
    text = POOLED.replace("    create: {size: 1G}",
                          "    read-only: true\n    create: {snapshot: golden}") + golden
    assert [e.read_only for e in load(tmp_path, text).exports] == [False, True, False]


def test_copies_are_created_after_what_they_copy_and_circles_are_refused(
        tmp_path: Path) -> None:
    """An export may name, in create, a volume a later export creates: serve creates in
    dependency order (config order otherwise). Volumes created from each other in a
    circle can never be made, so check-config refuses them."""
    text = """\
        listen: [{unix: nbd.sock}]
        pools: [{name: p, path: pool.img, create: {size: 1G}}]
        exports:
          - {name: vm2, pool: p, volume: vm2, create: {fork: vm1}}
          - {name: vm1, pool: p, volume: vm1, create: {fork: golden}}
          - {name: other, pool: p, volume: other, create: {size: 1M}}
          - {name: golden, pool: p, volume: golden, create: {size: 1G}}
          - {name: snap, pool: p, volume: snap, create: {snapshot: golden}}
        """
    config = load(tmp_path, text)
    assert [e.name for e in config.exports] == ["vm2", "vm1", "other", "golden", "snap"]
    assert [e.name for e in creation_order(config.exports)] == [
        "golden", "vm1", "vm2", "other", "snap"]
    circle = text.replace("create: {size: 1G}}\n          - {name: snap",
                          "create: {snapshot: vm2}}\n          - {name: snap")
    expect(tmp_path, circle, "name: vm2", "exports[0].create", "in a circle",
           "'vm2' -> 'vm1' -> 'golden' -> 'vm2'")


def test_what_serve_would_refuse_when_it_opens_is_refused_here(tmp_path: Path) -> None:
    """check-config and serve agree: a pool file that holds no pool, a volume without
    create in a pool the config creates (serve would make the pool, then find no volume;
    also from an empty file), and sizes a client keeping to min-block-size could not
    wholly reach; each refusal names the key and line."""
    (tmp_path / "noise.img").write_bytes(os.urandom(1 << 20))
    msg = error(tmp_path, """\
        listen: [{unix: s.sock}]
        pools: [{name: p, path: noise.img}]
        exports: []
        """)
    assert ":2: pools[0].path:" in msg and "not an nbdserver pool" in msg, msg
    msg = error(tmp_path, """\
        listen: [{unix: s.sock}]
        pools: [{name: p, path: new.img, create: {size: 64M}}]
        exports: [{name: v, pool: p, volume: v}]
        """)
    assert ":3: exports[0].volume:" in msg and "no volume 'v'" in msg, msg
    assert not (tmp_path / "new.img").exists()
    (tmp_path / "blank.img").write_bytes(b"")
    msg = error(tmp_path, """\
        listen: [{unix: s.sock}]
        pools: [{name: p, path: blank.img, create: {size: 64M}}]
        exports: [{name: v, pool: p, volume: v}]
        """)
    assert ":3: exports[0].volume:" in msg and "an empty file" in msg, msg
    # a fork or snapshot of a volume no export creates in such a pool
    for kind in ("fork", "snapshot"):
        msg = error(tmp_path, f"""\
            listen: [{{unix: s.sock}}]
            pools: [{{name: p, path: new.img, create: {{size: 64M}}}}]
            exports:
              - {{name: v, pool: p, volume: v, create: {{{kind}: w}}}}
            """)
        assert f"exports[0].create.{kind}:" in msg and "no export creates volume 'w'" in msg, msg
    config = load(tmp_path, """\
        listen: [{unix: s.sock}]
        pools: [{name: p, path: new.img, create: {size: 64M}}]
        exports:
          - {name: v, pool: p, volume: v, create: {fork: w}}
          - {name: w, pool: p, volume: w, create: {size: 1M}}
        """)
    assert [e.name for e in config.exports] == ["v", "w"]  # the source is created too
    msg = error(tmp_path, """\
        listen: [{unix: s.sock}]
        exports: [{name: e, file: e.img, size: 6K, min-block-size: 4096}]
        """)
    assert "exports[0].size:" in msg and "not a multiple of min-block-size 4096" in msg, msg
    msg = error(tmp_path, """\
        listen: [{unix: s.sock}]
        pools: [{name: p, path: new.img, create: {size: 64M}}]
        exports: [{name: v, pool: p, volume: v, min-block-size: 4K, create: {size: 6K}}]
        """)
    assert "exports[0].create.size:" in msg and "min-block-size" in msg, msg
    # An empty file named as a pool with create is sized by serve, as pool create does.
    (tmp_path / "empty.img").write_bytes(b"")
    load(tmp_path, """\
        listen: [{unix: s.sock}]
        pools: [{name: p, path: empty.img, create: {size: 64M}}]
        exports: [{name: v, pool: p, volume: v, create: {size: 1M}}]
        """)


def test_a_host_name_that_does_not_resolve_is_a_warning(tmp_path: Path) -> None:
    """Not an error: a socket-activated server does not use its listeners (and the name
    may resolve once the network is up); check-config says serve would fail there."""
    config = load(tmp_path, 'listen: [{tcp: "no-such-host.invalid:10809"}, '
                            '{tcp: "localhost:10809"}, {tcp: "[::1]:10809"}]\nexports: []\n')
    warnings = config_warnings(config)
    bad = [w for w in warnings if "cannot resolve" in w]
    assert len(bad) == 1 and bad[0].startswith("listen[0].tcp: cannot resolve host name "
                                                "'no-such-host.invalid'"), warnings


def test_existing_files_that_serve_would_cut_are_warned_about(tmp_path: Path) -> None:
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    (tmp_path / "six.img").write_bytes(bytes(6144))
    config = load(tmp_path, """\
        listen: [{unix: s.sock}]
        exports:
          - {name: odd, file: odd.img}
          - {name: six, file: six.img, min-block-size: 4096}
        """)
    warnings = config_warnings(config)
    assert any(w.startswith("exports[0].file:") and "at most the first 512 are served" in w
               for w in warnings), warnings
    assert any(w.startswith("exports[1].file:") and "min-block-size 4096" in w
               for w in warnings), warnings


def test_deeply_nested_yaml_is_a_one_line_error(tmp_path: Path) -> None:
    msg = error(tmp_path, "a: " + "[" * 2000 + "]" * 2000 + "\n")
    assert "nested too deeply" in msg, msg


def test_config_at_names_where_a_key_was_written(tmp_path: Path) -> None:
    """Config.at: the line of the key, else of the nearest enclosing key written; a config
    parsed from text with no file gives the bare key."""
    text = ("listen: [{unix: s.sock}]\n"
            "exports:\n"
            "  - name: v\n"
            "    file: v.img\n"
            "    size: 1M\n")
    config = parse_config(text, source=tmp_path / "c.yaml")
    assert config.at("exports[0].file") == f"{tmp_path / 'c.yaml'}:4: exports[0].file"
    assert config.at("exports[0].create.fork") == \
        f"{tmp_path / 'c.yaml'}:3: exports[0].create.fork"
    assert config.at("listen[0].unix") == f"{tmp_path / 'c.yaml'}:1: listen[0].unix"
    assert parse_config(text, base_dir=tmp_path).at("exports[0].file") == "exports[0].file"


def test_an_existing_pool_is_described_and_a_create_it_contradicts_is_a_warning(
        tmp_path: Path) -> None:
    from nbdserver.pool.pool import Pool

    Pool.create(tmp_path / "pool.img", 64 << 20, blockmap="extent", chunk_size=4096)
    text = ("listen: [{unix: s.sock}]\n"
            "pools: [{name: p, path: pool.img, create: {size: 2G, blockmap: radix, "
            "chunk-size: 64K}}]\nexports: []\n")
    config = load(tmp_path, text)
    out = describe(config)
    assert "an nbdserver pool of 64 MiB: the extent block map, 4 KiB chunks" in out, out
    assert "pools[0].create: not used: the pool exists, 64 MiB with the extent block map and " \
        "4 KiB chunks (create says 2 GiB, radix, 64 KiB)" in config_warnings(config)
    same = load(tmp_path, text.replace("blockmap: radix, chunk-size: 64K",
                                       "blockmap: extent").replace("2G", "64M"))
    assert not any("create: not used" in w for w in config_warnings(same))
    larger = load(tmp_path, text.replace("blockmap: radix, chunk-size: 64K",
                                         "blockmap: extent"))
    assert any("create: not used: the pool exists, 64 MiB" in w
               for w in config_warnings(larger))


def test_a_fork_of_a_volume_the_same_start_creates_empty_is_a_warning(tmp_path: Path) -> None:
    text = ("listen: [{unix: s.sock}]\n"
            "pools: [{name: p, path: new.img, create: {size: 1G}}]\n"
            "exports:\n"
            "  - {name: golden, pool: p, volume: golden, create: {size: 64M}}\n"
            "  - {name: vm1, pool: p, volume: vm1, create: {fork: golden}}\n"
            "  - {name: vm1-b, pool: p, volume: vm1-b, create: {snapshot: vm1}}\n")
    warnings = config_warnings(load(tmp_path, text))
    assert any(w.startswith("exports[2].create: a snapshot of 'vm1', which exports[1] creates "
                            "empty") for w in warnings), warnings  # (a chain of copies)
    assert "exports[1].create: a fork of 'golden', which exports[0] creates empty in the new " \
        "pool 'p': 'vm1' starts empty too (fill 'golden' first, then create the fork)" \
        in warnings, warnings
    from nbdserver.pool.pool import Pool

    Pool.create(tmp_path / "new.img", 64 << 20)  # an existing pool: golden may be full
    assert not any("starts empty" in w for w in config_warnings(load(tmp_path, text)))
