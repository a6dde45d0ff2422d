"""The command line as a user meets it: ``--help``, ``check-config``, exit codes.

Run as subprocesses (``python -m nbdserver``), as people and scripts run it.
Config parsing itself is unit-tested in tests/test_config.py; these check what
the commands print and return.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SERVER_CMD, run

from nbdserver.cli import build_parser


def nbdserver(*args: str | Path, check: bool = False) -> tuple[int, str, str]:
    proc = run([*SERVER_CMD, *args], check=check, timeout=30)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert len(actions) == 1
    names = list(actions[0].choices)  # type: ignore[attr-defined]
    assert {"serve", "check-config"} <= set(names)
    return names


def test_help_mentions_every_subcommand() -> None:
    status, out, _ = nbdserver("--help")
    assert status == 0
    for name in subcommands():
        assert re.search(rf"^\s+{re.escape(name)}\b", out, re.M), f"{name} not in --help"


@pytest.mark.parametrize("name", subcommands())
def test_each_subcommand_has_help(name: str) -> None:
    status, out, _ = nbdserver(name, "--help")
    assert status == 0
    assert out.startswith("usage: nbdserver " + name)


def leaf_commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    """Every command that runs something (``serve``, ``pool create``, ...) and its parser."""
    out: list[tuple[list[str], argparse.ArgumentParser]] = []

    def walk(words: list[str], parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append((words, parser))
        for action in subs:
            for name, sub in action.choices.items():
                walk([*words, name], sub)

    walk([], build_parser())
    return out


@pytest.mark.parametrize("words", [w for w, _ in leaf_commands()], ids=" ".join)
def test_each_command_s_help_teaches(words: list[str]) -> None:
    """A description of what it does, and help for every argument it takes."""
    (parser,) = [p for w, p in leaf_commands() if w == words]
    assert parser.description and len(parser.description) > 40, words
    for action in parser._actions:
        assert action.help, f"{' '.join(words)}: {action.dest} has no help"


@pytest.mark.parametrize("args", [["serve", "-c", ""], ["check-config", ""],
                                  ["pool", "info", ""], ["volume", "list", ""]])
def test_an_empty_path_is_a_usage_error(args: list[str]) -> None:
    """An unset shell variable ("$POOL") is a mistake, not the default config or '.'."""
    status, _, err = nbdserver(*args)
    assert status == 2 and "an empty path" in err, err


def test_no_command_prints_usage_and_fails() -> None:
    status, out, err = nbdserver()
    assert status == 2
    assert "usage: nbdserver" in out + err


def test_version() -> None:
    status, out, _ = nbdserver("--version")
    assert status == 0
    assert re.fullmatch(r"nbdserver \d+\.\d+\.\d+\S*\n", out), out


def test_unknown_option_is_a_usage_error() -> None:
    status, _, err = nbdserver("serve", "--no-such-option")
    assert status == 2
    assert "--no-such-option" in err


def good_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "good.yaml"
    (tmp_path / "exists.img").write_bytes(b"\0" * 8192)
    cfg.write_text("""\
listen:
  - unix: run/nbd.sock
  - tcp: 127.0.0.1:0
server:
  max-connections: 8
exports:
  - name: new
    file: data/new.img
    size: 16M
    description: created on first start
  - name: old
    file: exists.img
    read-only: true
""")
    return cfg


def test_check_config_good(tmp_path: Path) -> None:
    cfg = good_config(tmp_path)
    status, out, err = nbdserver("check-config", cfg)
    assert status == 0, err
    assert out.rstrip().endswith(f"{cfg}: configuration is valid")
    # Relative paths are explained resolved against the config's directory.
    assert str(tmp_path / "run" / "nbd.sock") in out
    assert str(tmp_path / "data" / "new.img") in out
    assert "will be created at 16 MiB" in out
    assert "'old': read-only" in out
    assert "up to 8 connections" in out
    # Checking changes nothing on disk.
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "run").exists()


def test_check_config_without_a_file_checks_the_default_config() -> None:
    """As serve without -c does: the source tree's config/nbdserver.yaml."""
    from nbdserver.config import DEFAULT_CONFIG_PATH

    status, out, err = nbdserver("check-config")
    assert status == 0, err
    assert out.rstrip().endswith(f"{DEFAULT_CONFIG_PATH}: configuration is valid"), out
    assert "every volume of pool 'main'" in out, out


def test_check_config_json(tmp_path: Path) -> None:
    cfg = good_config(tmp_path)
    status, out, _ = nbdserver("check-config", "--json", cfg)
    assert status == 0
    data = json.loads(out)
    assert data["source"] == str(cfg)
    assert [e["name"] for e in data["exports"]] == ["new", "old"]
    assert data["exports"][0]["size"] == 16 << 20
    assert data["exports"][0]["file"] == str(tmp_path / "data" / "new.img")
    assert data["exports"][1]["read-only"] is True
    assert data["listen"][1] == {"kind": "tcp", "path": None, "host": "127.0.0.1", "port": 0,
                                 "key": "listen[1].tcp"}
    assert data["server"]["max-connections"] == 8
    assert data["warnings"] == [f"listen[0].unix: {tmp_path / 'run'} does not exist; serve "
                                "creates it (unless socket activation passes the sockets)"], \
        data["warnings"]


@pytest.mark.parametrize("text, needles", [
    pytest.param("listen: [{unix: s.sock}]\nexports:\n  - name: d\n    file: nope.img\n",
                 [":4:", "exports[0].file", "does not exist", "size"], id="missing-file"),
    pytest.param("listen: [{unix: s.sock}]\nexports:\n  - name: d\n    file: x.img\n"
                 "    sise: 1G\n", [":5:", "exports[0].sise", "unknown key", "'size'"],
                 id="unknown-key"),
    pytest.param("listen: [{tcp: 127.0.0.1:99999}]\nexports: []\n",
                 ["listen[0].tcp", "out of range"], id="bad-port"),
    pytest.param("listen: [{unix: s.sock}]\nexports:\n  - name: d\n    file: x.img\n"
                 "    size: 1G\n    read-only: yes\n", ["exports[0].read-only", "'yes'"],
                 id="yes-is-not-a-boolean"),
    pytest.param("listen:\n\t- unix: s.sock\n", ["tabs"], id="tab"),
    pytest.param("", ["empty"], id="empty"),
])
def test_check_config_bad(tmp_path: Path, text: str, needles: list[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    status, out, err = nbdserver("check-config", cfg)
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith(f"nbdserver: error: {cfg}")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_check_config_missing_file(tmp_path: Path) -> None:
    status, _, err = nbdserver("check-config", tmp_path / "nope.yaml")
    assert status == 2
    assert "no such config file" in err


def test_check_config_warns_but_succeeds(tmp_path: Path) -> None:
    (tmp_path / "empty.img").touch()
    cfg = tmp_path / "warn.yaml"
    cfg.write_text("listen: [{unix: s.sock}]\nexports:\n  - name: e\n    file: empty.img\n")
    status, out, _ = nbdserver("check-config", cfg)
    assert status == 0
    assert "warning: exports[0].file" in out and "empty" in out


def test_serve_missing_config_file(tmp_path: Path) -> None:
    status, _, err = nbdserver("serve", "-c", tmp_path / "nope.yaml")
    assert status == 2
    assert err.strip().splitlines()[-1] == \
        f"nbdserver: error: {tmp_path / 'nope.yaml'}: no such config file"


def test_a_fork_whose_parent_was_deleted_has_a_null_parent_in_json(tmp_path: Path) -> None:
    """`parent` is a volume's name or null, as documented: a script may look it up. The
    id stays in `parent_id`, and the text output shows it."""
    pool = tmp_path / "p.pool"
    for args in (("pool", "create", pool, "--size", "64M"),
                 ("volume", "create", pool, "golden", "--size", "1M"),
                 ("volume", "fork", pool, "golden", "vm")):
        assert nbdserver(*args)[0] == 0
    golden_id = json.loads(nbdserver("volume", "info", pool, "golden", "--json")[1])["id"]
    vm = json.loads(nbdserver("volume", "info", pool, "vm", "--json")[1])
    assert (vm["parent"], vm["parent_id"]) == ("golden", golden_id)
    assert nbdserver("volume", "delete", pool, "golden")[0] == 0
    vm = json.loads(nbdserver("volume", "info", pool, "vm", "--json")[1])
    assert (vm["parent"], vm["parent_id"]) == (None, golden_id)
    listed = json.loads(nbdserver("volume", "list", pool, "--json")[1])
    assert [(v["name"], v["parent"]) for v in listed] == [("vm", None)]
    assert f"(deleted #{golden_id})" in nbdserver("volume", "list", pool)[1]
    assert f"(deleted #{golden_id})" in nbdserver("volume", "info", pool, "vm")[1]


def test_pool_check_json_reports_a_pool_it_cannot_open(tmp_path: Path) -> None:
    """A script reading `pool check --json` gets a report even when the pool cannot be
    opened at all: ok false and the reason, exit 1."""
    junk = tmp_path / "junk.pool"
    junk.write_bytes(b"\x01" * (1 << 20))
    status, out, err = nbdserver("pool", "check", junk, "--json")
    assert status == 1
    report = json.loads(out)
    assert report["ok"] is False and report["volumes"] is None
    assert "not an nbdserver pool" in report["problems"][0]
    assert "not an nbdserver pool" in err


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """`nbdserver volume list POOL | head -1`: the pipe closes before the output is
    written; the command ends quietly (exit 1), as other tools do."""
    pool = tmp_path / "p.pool"
    assert nbdserver("pool", "create", pool, "--size", "64M")[0] == 0
    assert nbdserver("volume", "create", pool, "v", "--size", "1M")[0] == 0
    proc = subprocess.Popen([*map(str, SERVER_CMD), "volume", "list", str(pool), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_pool_create_without_size_is_a_usage_error(tmp_path: Path) -> None:
    status, out, err = nbdserver("pool", "create", tmp_path / "p.img")
    assert status == 2, (status, out, err)
    assert "--size is required" in err and "p.img" in err
    assert not (tmp_path / "p.img").exists()  # nothing made


def test_a_missing_argument_shows_the_order_they_go_in() -> None:
    """`volume fork demo vm3` (POOL forgotten) lacks NAME by argparse's count: the usage
    line beside it shows which one was left out."""
    status, _out, err = nbdserver("volume", "fork", "demo", "vm3")
    assert status == 2 and err.count("\n") == 1, err
    assert "arguments are required: NAME; usage: nbdserver volume fork " in err, err
    assert err.rstrip().endswith("POOL SOURCE NAME [NAME ...] (see 'nbdserver volume fork "
                                 "--help')"), err


def test_pool_create_where_no_file_can_be_made_is_a_one_line_error(tmp_path: Path) -> None:
    """A dangling symbolic link, or a path below a regular file: the error names the path
    and why, with no traceback, and nothing is made."""
    (tmp_path / "dangling.img").symlink_to(tmp_path / "missing" / "pool.img")
    (tmp_path / "afile").write_bytes(b"x")
    for path, why in ((tmp_path / "dangling.img", "symbolic link to"),
                      (tmp_path / "afile" / "p.img", "is not a directory")):
        status, out, err = nbdserver("pool", "create", path, "--size", "64M")
        assert status == 1, (status, out, err)
        assert str(path) in err and why in err and "Traceback" not in err, err
    assert not (tmp_path / "missing").exists()
    assert (tmp_path / "afile").read_bytes() == b"x"


def test_pool_create_refuses_a_missing_directory_a_directory_and_a_fifo(
        tmp_path: Path) -> None:
    """The CLI makes no directories (a typo in a path must not make a tree), and a path
    that is a directory, a FIFO or empty is named for what it is."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, why in ((tmp_path / "a" / "b" / "p.img", "directory"),
                      (tmp_path, "is a directory"),
                      (fifo, "not a regular file or block device")):
        status, out, err = nbdserver("pool", "create", path, "--size", "64M")
        assert status == 1, (status, out, err)
        assert str(path) in err and why in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists()
    status, _, err = nbdserver("pool", "create", "", "--size", "64M")
    assert status == 2 and "argument POOL: an empty path" in err, err
    status, _, err = nbdserver("pool", "create", "/dev/null")  # (no --size: not asked for)
    assert status == 1 and "/dev/null: not a regular file or block device" in err, err


def test_a_symbolic_link_loop_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    status, _, err = nbdserver("pool", "create", tmp_path / "a", "--size", "64M")
    assert status == 1 and "a symbolic link in a loop" in err, err
    status, _, err = nbdserver("pool", "info", tmp_path / "a")
    assert status == 1 and err.strip() == \
        f"nbdserver: error: {tmp_path / 'a'}: Too many levels of symbolic links", err


def test_pool_create_on_a_block_device_refuses_a_pool_or_data_there(
        loop_device: Callable[..., Path], tmp_path: Path) -> None:
    """A block device is used whole: a zeroed one becomes a pool; one holding a pool (its
    volumes intact) or other data is refused, naming what is there, unless --force; a
    --size that is not the device's is refused."""
    dev = loop_device("32M")
    status, out, err = nbdserver("pool", "create", dev, "--size", "16M")
    assert status == 2 and "a pool takes the whole device (leave out --size)" in err, err
    assert nbdserver("pool", "create", dev, "--blockmap", "extent")[0] == 0
    assert nbdserver("volume", "create", dev, "precious", "--size", "1M")[0] == 0
    status, out, err = nbdserver("pool", "create", dev)
    assert status == 1, (status, out, err)
    assert f"{dev} holds an nbdserver pool (extent, 32 MiB" in err and "--force" in err, err
    status, out, _ = nbdserver("volume", "list", dev, "--json")
    assert status == 0 and [v["name"] for v in json.loads(out)] == ["precious"]
    assert nbdserver("pool", "create", dev, "--force")[0] == 0
    status, out, _ = nbdserver("volume", "list", dev, "--json")
    assert status == 0 and json.loads(out) == []
    # not a pool, but anything else in the first MiB (a file system, say)
    run(["dd", "if=/dev/zero", f"of={dev}", "bs=1M", "count=1", "oflag=direct",
         "status=none"])
    assert nbdserver("pool", "create", dev)[0] == 0  # all zeros again: taken
    run(["dd", "if=/dev/zero", f"of={dev}", "bs=1M", "count=1", "oflag=direct",
         "status=none"])
    run(["dd", "if=/dev/urandom", f"of={dev}", "bs=4096", "count=1", "seek=200",
         "oflag=direct", "status=none"])
    status, out, err = nbdserver("pool", "create", dev)
    assert status == 1 and "holds data in its first 1 MiB" in err, err
    assert nbdserver("pool", "create", dev, "--force")[0] == 0
    assert nbdserver("pool", "check", dev)[0] == 0
    # a pool whose superblocks are both damaged is still named as one
    run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1", "count=8", "seek=100", "conv=notrunc",
         "status=none"])
    run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1", "count=8", "seek=4196", "conv=notrunc",
         "status=none"])
    status, out, err = nbdserver("pool", "create", dev)
    assert status == 1 and "looks like a damaged nbdserver pool" in err, err
    # a device too small for a page: the size is what is wrong (no traceback)
    tiny = loop_device("2K")
    status, out, err = nbdserver("pool", "create", tiny)
    assert status == 1 and "too small" in err, err


def test_config_pool_create_makes_its_directories_and_removes_them_on_failure(
        tmp_path: Path) -> None:
    """A pool created by a config may live in directories that do not exist yet (the
    default config's ./data): they are made, and removed again if the create fails."""
    from nbdserver.errors import UserError
    from nbdserver.pool.pool import Pool

    made = tmp_path / "x" / "y" / "pool.img"
    Pool.create(made, 64 << 20, make_parents=True)
    assert made.stat().st_size == 64 << 20
    failed = tmp_path / "u" / "v" / "pool.img"
    with pytest.raises(UserError, match="too small"):
        Pool.create(failed, 1 << 20, make_parents=True)  # planned before anything is made
    with pytest.raises(UserError, match="cannot grow"):
        Pool.create(failed, 1 << 62, make_parents=True)  # made, then too large to grow
    assert not (tmp_path / "u").exists()
    with pytest.raises(UserError, match="cannot create"):  # the file itself cannot be made
        Pool.create(tmp_path / "u" / "v" / ("n" * 300), 64 << 20, make_parents=True)
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["pool", "create", "{p}", "--size", "64M", "--chunk-size", "3K"],
     "argument --chunk-size: expected a power of two from 4 KiB to 1 MiB, got '3K'"),
    (["pool", "create", "{p}", "--size", "64M", "--max-volumes", "2000000"],
     "argument --max-volumes: at most"),
    (["volume", "create", "{p}", "bad/name", "--size", "1M"],
     "argument NAME: invalid volume name 'bad/name'"),
    (["volume", "create", "{p}", "ok", "--size", "1000"],
     "argument --size: a volume's size must be a multiple of 512 bytes, got 1000"),
    (["volume", "fork", "{p}", "golden", "bad!"], "argument NAME: invalid volume name"),
    (["volume", "snapshot", "{p}", "golden", ""], "argument NAME: invalid volume name"),
    (["volume", "create", "{p}", "nl\n", "--size", "1M"], "argument NAME: invalid volume name"),
    (["pool", "create", "{p}", "--size", "-1G"],
     "argument --size: a size cannot be negative, got '-1G'"),
])
def test_bad_arguments_are_usage_errors_naming_the_argument(
        tmp_path: Path, args: list[str], fragment: str) -> None:
    """Exit 2 (docs/cli.md), the argument named, and nothing made or opened."""
    pool = tmp_path / "p.img"
    status, out, err = nbdserver(*[a.replace("{p}", str(pool)) for a in args])
    assert status == 2, (status, out, err)
    assert fragment in err and "Traceback" not in err, err
    assert not pool.exists()


@pytest.mark.parametrize("args", [("volume", "create"), ("bogus",),
                                  ("pool", "create", "p.img", "--size", "64M", "--bad")])
def test_a_usage_error_is_one_line_naming_the_command_and_its_help(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    status, out, err = nbdserver(*args)
    assert status == 2 and not out
    (line,) = err.splitlines()
    assert line.startswith("nbdserver: error: "), line
    command = " ".join(a for a in args[:2] if a in ("volume", "pool", "create"))
    assert line.endswith(f"(see '{' '.join(['nbdserver', command]).strip()} --help')"), line
