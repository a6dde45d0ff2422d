"""The ``pool`` and ``volume`` commands of the CLI.

Each command opens the pool, runs one operation from
:mod:`nbdserver.control.ops` and closes it. When a running server holds the
pool, the command is sent to that server's control socket instead, so volumes
can be snapshotted and forked while they are exported. ``--json`` prints the
operation's result as JSON (stable field names, documented in docs/cli.md);
otherwise a table or a short summary is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import stat
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nbdserver.errors import Interrupted, UsageError, UserError
from nbdserver.sizes import format_size, not_whole_sectors, parse_size

EXIT_OK = 0
EXIT_PROBLEMS = 1


def _size(text: str) -> int:
    try:
        return parse_size(text, what="size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def _number(value: object) -> str:
    """A count or a rate for people: 1,376,256 and 23,214.6 (``?`` when unknown)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _chunk_size(text: str) -> int:
    from nbdserver.pool.format import MAX_CHUNK, MIN_CHUNK, valid_chunk_size

    value = _size(text)
    if not valid_chunk_size(value):
        raise argparse.ArgumentTypeError(
            f"expected a power of two from {format_size(MIN_CHUNK)} to "
            f"{format_size(MAX_CHUNK)}, got {text!r}")
    return value


def _max_volumes(text: str) -> int:
    from nbdserver.pool.pool import MAX_VOLUMES

    value = _count(text)
    if value > MAX_VOLUMES:
        raise argparse.ArgumentTypeError(f"at most {MAX_VOLUMES}, got {value}")
    return value


def _new_volume_name(text: str) -> str:
    from nbdserver.pool.pool import check_volume_name

    try:
        check_volume_name(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _volume_size(text: str) -> int:
    value = _size(text)
    if (why := not_whole_sectors(value, "a volume's size")) is not None:
        raise argparse.ArgumentTypeError(why)
    return value


def run_pool_op(pool_path: str, op: str, args: dict[str, Any],
                local: dict[str, Any] | None = None, *, online: bool = False,
                going_online: Callable[[], None] | None = None) -> Any:
    """Run `op` on the pool at `pool_path`: directly, or through its server if it is open.
    `local` arguments override `args` when the pool is opened here (a progress callback,
    say), and are not sent to a server. `online`: a server was found to have the pool open
    a moment ago; ask it at once (trying to open the pool here first costs tens of ms)."""
    import uvloop

    from nbdserver.pool.pool import PoolBusy

    async def offline() -> Any:
        from nbdserver.control.ops import run_op
        from nbdserver.pool.pool import Pool
        from nbdserver.storage.buffers import BufferPool
        from nbdserver.storage.engine import make_engine

        engine = make_engine(asyncio.get_running_loop())
        buffers = BufferPool()
        try:
            pool = await Pool.open(pool_path, engine, buffers, offline=True)
            try:
                return await run_op(pool, op, {**args, **(local or {})})
            except asyncio.CancelledError:
                # Ctrl-C. A commit it cut short marked the pool failed: leave it as a
                # crash would (the next open recovers the last commit), and say so.
                if pool.failed is not None:
                    pool.abandon()
                    print("nbdserver: interrupted; the pool recovers its last commit "
                          "when next opened", file=sys.stderr)
                raise
            finally:
                await pool.close()
        finally:
            engine.close()

    if not online:
        try:
            return uvloop.run(offline())
        except PoolBusy:
            pass  # a server has it open: ask that server
    from nbdserver.control.socket import ServerUnreachable, call, socket_path
    from nbdserver.pool.pool import read_superblock

    sb = read_superblock(pool_path)
    if going_online is not None:
        going_online()
    try:
        return call(socket_path(sb.uuid_str, pool_path), op, args)
    except ServerUnreachable as e:  # (a server's own error replies name the pool)
        if online:  # the server has gone since: open the pool here after all
            return run_pool_op(pool_path, op, args, local)
        raise UserError(f"{pool_path}: {e}") from None


def _parent_text(info: dict[str, Any]) -> str:
    """A volume's parent for people: its name, "(deleted #id)", or "-"."""
    if info["parent"] is not None:
        return str(info["parent"])
    return f"(deleted #{info['parent_id']})" if info.get("parent_id") else "-"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _show_volume(info: dict[str, Any]) -> None:
    rows = [
        ("name", info["name"]),
        ("size", format_size(info["size"])),
        ("parent", _parent_text(info)),
        ("depth", str(info["depth"])),
        ("read-only", "yes" if info["read_only"] else "no"),
        ("snapshot", "yes" if info["snapshot"] else "no"),
        ("guarantee", f"yes ({format_size(info['reserved_bytes'])} still reserved, "
                      f"{format_size(info['metadata_reserved_bytes'])} of map pages)"
         if info["guarantee"] else "no"),
        ("mapped", format_size(info["mapped_bytes"])),
        ("exclusive", format_size(info["exclusive_bytes"])),
        ("shared", format_size(info["shared_bytes"])),
        ("extents", f"{_number(info['extents'])} ({_number(info['extents_per_gib'])} per "
                    "GiB, mean "
                    f"{format_size(info['mean_extent_bytes'])})"),
        ("created", info["created"]),
        ("in use", info["in_use"] or "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


# -- commands ---------------------------------------------------------------------------


def cmd_pool_create(args: argparse.Namespace) -> int:
    from nbdserver.pool.pool import Pool

    path = Path(args.pool)
    if args.size is None and (not path.exists() or path.is_file()):
        raise UsageError(f"{args.pool}: --size is required to create a pool in a file "
                         "(a block device is used whole)")
    try:
        params = None
        if args.fanout:
            params = (args.fanout, 0, 0, 0)
        progress = _Progress("preallocate")
        try:
            with _signals_interrupt():  # a half-made pool file is removed, whatever stops it
                sb = Pool.create(args.pool, args.size, blockmap=args.blockmap,
                                 chunk_size=args.chunk_size, max_volumes=args.max_volumes,
                                 map_params=params, preallocate=args.preallocate or False,
                                 force=args.force,
                                 progress=lambda done, total: progress.show(
                                     f"{100.0 * done / total:5.1f}% ({format_size(done)} of "
                                     f"{format_size(total)} zero-filled)"))
        finally:
            progress.finish()
    except ValueError as e:
        raise UserError(str(e)) from None
    info = run_pool_op(args.pool, "pool.info", {})
    if args.json:
        _print_json(info)
    else:
        kind = ""
        if Path(args.pool).is_file():
            kind = (", sparse (grows as data is written; see --preallocate)"
                    if _sparse(args.pool) else ", preallocated and zero-filled"
                    if args.preallocate == "full" else ", preallocated")
        print(f"created pool {args.pool}: {format_size(sb.size)}{kind}, block map "
              f"{sb.blockmap}, chunk {format_size(sb.chunk_size)}, "
              f"{format_size(info['free_bytes'])} for data")
    return EXIT_OK


def cmd_pool_info(args: argparse.Namespace) -> int:
    info = run_pool_op(args.pool, "pool.info", {})
    if args.json:
        _print_json(info)
        return EXIT_OK
    for key in ("path", "uuid", "blockmap", "created"):
        print(f"{key:<18}{info[key]}")
    for key in ("size_bytes", "allocated_bytes", "data_bytes", "used_bytes", "free_bytes",
                "reserved_bytes", "available_bytes", "metadata_bytes", "metadata_used_bytes",
                "metadata_reserved_bytes", "journal_bytes"):
        print(f"{key.replace('_bytes', '').replace('_', ' '):<18}{format_size(info[key])}")
    print(f"{'chunk size':<18}{format_size(info['chunk_size'])}")
    print(f"{'volumes':<18}{info['volumes']} (at most {info['max_volumes']})")
    if info.get("failed"):
        print(f"{'FAILED':<18}{info['failed']}: no change is made durable until the "
              "server restarts")
    return EXIT_OK


def cmd_pool_check(args: argparse.Namespace) -> int:
    progress = _Progress("check")  # (offline: every reference of every map is counted)

    def show(name: str, number: int, volumes: int, counted: int) -> None:
        progress.show(f"volume {name!r} ({number} of {volumes}), "
                      f"{counted:,} chunk references counted")

    def going_online() -> None:
        print(f"note: a running server has {args.pool} open; the check runs inside it, "
              "and every client of that server waits until it ends (a few seconds per "
              "GiB mapped; offline, with the server stopped, nothing waits)",
              file=sys.stderr)

    try:
        report = run_pool_op(args.pool, "pool.check", {}, local={"progress": show},
                             going_online=going_online)
    except UserError as e:
        progress.finish()
        if not args.json:
            raise
        # A pool that cannot be opened (a damaged catalog page, say): still one report,
        # so that a script reads why. The counts are unknown.
        print(f"nbdserver: error: {e}", file=sys.stderr)
        _print_json({"ok": False, "problems": [str(e)], "warnings": [], "volumes": None,
                     "data_chunks_referenced": None, "metadata_pages_referenced": None,
                     "leaked_chunks": None, "leaked_pages": None, "free_bytes": None})
        return EXIT_PROBLEMS
    finally:
        progress.finish()
    if args.json:
        _print_json(report)
    else:
        for problem in report["problems"]:
            print(f"problem: {problem}")
        for warning in report["warnings"]:
            print(f"warning: {warning}")
        verdict = "clean" if report["ok"] else f"{len(report['problems'])} problem(s)"
        print(f"{args.pool}: {verdict}; {_number(report['volumes'])} volume(s), "
              f"{_number(report['data_chunks_referenced'])} chunk(s) and "
              f"{_number(report['metadata_pages_referenced'])} metadata page(s) referenced, "
              f"{format_size(report['free_bytes'])} free")
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def _volume_result(args: argparse.Namespace, info: dict[str, Any], verb: str) -> int:
    if args.json:
        _print_json(info)
    else:
        _show_made(info, verb)
    return EXIT_OK


def _show_made(info: dict[str, Any], verb: str) -> None:
    """The line saying a volume was made, and whether the running server serves it."""
    served = ""
    if info.get("served_as"):
        ro = ", read-only" if info.get("served_read_only") else ""
        served = f"; served as export {info['served_as']!r}{ro}"
    print(f"{verb} volume {info['name']!r} ({format_size(info['size'])}){served}", flush=True)
    if "served_as" in info and info["served_as"] is None:  # (a running server answered)
        print(f"note: the running server does not serve {info['name']!r} to NBD clients: "
              f"{info.get('not_served') or 'no export matches it'}", file=sys.stderr)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM, and SIGHUP unless ignored (``nohup``), raise Interrupted inside (as SIGINT
    raises KeyboardInterrupt), so that what is half done is undone on the way out."""
    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    wanted = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        wanted.append(signal.SIGHUP)
    before = {sig: signal.signal(sig, interrupt) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _preallocate_mode(text: str) -> str:
    """``--preallocate``'s mode; a pool path given right after the bare option gets a hint."""
    from nbdserver.storage.device import PREALLOCATE_MODES

    if text in PREALLOCATE_MODES:
        return text
    raise argparse.ArgumentTypeError(
        f"expected falloc or full, got {text!r} (a bare --preallocate takes the next word as "
        "its mode: give the pool before it, or write --preallocate=falloc)")


def _sparse(pool: str) -> bool:
    """Whether the pool is a file with blocks its filesystem has not allocated yet."""
    st = Path(pool).stat()
    return stat.S_ISREG(st.st_mode) and st.st_blocks * 512 < st.st_size


def _note_sparse_guarantee(pool: str) -> None:
    """A guarantee reserves room in the pool; say so when the pool's own file is sparse
    (its filesystem can still run out under it)."""
    if _sparse(pool):
        print(f"note: {pool} is a sparse file: the guarantee holds inside the pool, but the "
              "filesystem under it can still run out of space; a pool created with "
              "--preallocate rules that out", file=sys.stderr)


def cmd_volume_create(args: argparse.Namespace) -> int:
    info = run_pool_op(args.pool, "volume.create",
                       {"name": args.name, "size": args.size, "guarantee": args.guarantee})
    if args.guarantee:
        _note_sparse_guarantee(args.pool)
    return _volume_result(args, info, "created")


def cmd_volume_snapshot(args: argparse.Namespace) -> int:
    info = run_pool_op(args.pool, "volume.snapshot", {"source": args.source, "name": args.name})
    return _volume_result(args, info, f"snapshotted {args.source!r} as")


def cmd_volume_fork(args: argparse.Namespace) -> int:
    if args.guarantee:
        _note_sparse_guarantee(args.pool)

    made = run_pool_op(args.pool, "volume.forks", {  # (one point in time for all)
        "source": args.source, "names": args.name, "guarantee": args.guarantee})
    if args.json:
        _print_json(made[0] if len(args.name) == 1 else made)
    else:
        for info in made:
            _show_made(info, f"forked {args.source!r} as")
    return EXIT_OK


def cmd_volume_delete(args: argparse.Namespace) -> int:
    names: list[str] = args.name
    progress = _Progress(f"delete {names[0]}" if len(names) == 1
                         else f"delete {len(names)} volumes")  # (offline: big maps take long)
    local = {"progress": lambda freed: progress.show(f"{format_size(freed)} freed so far")}
    try:  # (checked first, and committed together)
        results = run_pool_op(args.pool, "volume.deletes", {"names": names}, local=local)
    finally:
        progress.finish()
    if args.json:
        _print_json(results[0] if len(names) == 1 else results)
    else:
        for result in results:
            print(f"deleted volume {result['name']!r}; {format_size(result['freed_bytes'])} "
                  "freed")
    return EXIT_OK


def cmd_volume_list(args: argparse.Namespace) -> int:
    vols = run_pool_op(args.pool, "volume.list", {"brief": True} if args.brief else {})
    damaged = [v for v in vols if v.get("damaged")]
    if args.json:
        _print_json(vols)
    elif not vols:
        print("no volumes")
    elif args.brief:
        rows = [["NAME", "SIZE", "PARENT", "DEPTH", "RO", "CREATED", "IN USE"]]
        for v in vols:
            rows.append([v["name"], format_size(v["size"]), _parent_text(v), str(v["depth"]),
                         "yes" if v["read_only"] else "no", v["created"],
                         v.get("in_use") or "-"])
        print(_table(rows))
    else:
        rows = [["NAME", "SIZE", "PARENT", "DEPTH", "RO", "EXCLUSIVE", "SHARED", "IN USE"]]
        for v in vols:
            ok = not v.get("damaged")
            rows.append([v["name"], format_size(v["size"]), _parent_text(v), str(v["depth"]),
                         "yes" if v["read_only"] else "no",
                         format_size(v["exclusive_bytes"]) if ok else "?",
                         format_size(v["shared_bytes"]) if ok else "?",
                         v.get("in_use") or "-"])
        print(_table(rows))
    for v in damaged:  # (listed all the same: the catalog is whole)
        print(f"nbdserver: error: volume {v['name']!r}: {v['damaged']} ('nbdserver pool check "
              f"{args.pool}' lists what is damaged)", file=sys.stderr)
    return EXIT_PROBLEMS if damaged else EXIT_OK


def cmd_volume_info(args: argparse.Namespace) -> int:
    info = run_pool_op(args.pool, "volume.info", {"name": args.name})
    if args.json:
        _print_json(info)
    else:
        _show_volume(info)
    return EXIT_OK


class _Progress:
    """Progress of a long operation on stderr: after the first second, once a second."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.began = time.monotonic()
        self.last = self.began
        self.shown = False
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, moved: int) -> None:
        if not self.shown and done >= total:
            return
        pct = 100.0 * done / total if total else 100.0
        self.show(f"{pct:5.1f}% ({format_size(done)} of {format_size(total)} scanned, "
                  f"{format_size(moved)} moved)")

    def show(self, state: str) -> None:
        """Print "WHAT: state", if a second has passed since the start or the last line."""
        now = time.monotonic()
        if now - self.last < 1.0:
            return
        self.last = now
        self.shown = True
        line = f"{self.what}: {state}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def finish(self) -> None:
        """Clear the progress line (on a terminal: a last "94.6%" would stay there, under
        the result), before the next output; once."""
        if self.shown and self.tty:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
        self.shown = False


DEFRAG_SLICE = 1 << 30  # bytes per call to a running server (progress between calls)


def cmd_volume_defrag(args: argparse.Namespace) -> int:
    """Offline: one call, with progress. Online: slices of DEFRAG_SLICE, progress between."""
    from nbdserver.defrag import MIN_PIECE

    progress = _Progress(f"defrag {args.name}")
    start = moved = 0
    total: dict[str, Any] = {}
    try:
        while True:
            try:
                result = run_pool_op(
                    args.pool, "volume.defrag",
                    {"name": args.name, "start": start, "limit": DEFRAG_SLICE},
                    local={"limit": None,
                           "progress": lambda done, size, now, base=moved: progress(
                               done, size, base + now)},
                    online=bool(total))  # (a call after the first: a server answered it)
            except UserError as e:
                if not total:
                    raise
                # The server went away between two slices (a stop): say what was done.
                raise UserError(
                    f"defrag of {args.name!r} stopped after {format_size(start)} of "
                    f"{format_size(total['size'])} ({format_size(moved)} moved, which "
                    f"stays moved; run it again to finish): {e}") from None
            moved += result["moved_bytes"]
            if not total:
                total = dict(result)
            else:
                for key in ("scanned_bytes", "moved_bytes", "shared_bytes", "no_space_bytes"):
                    total[key] += result[key]
                total["seconds"] = round(total["seconds"] + result["seconds"], 3)
                total.update({k: v for k, v in result.items() if k in ("done", "after")})
            if result["done"]:
                break
            start = result["next"]
            progress(start, result["size"], moved)
    finally:
        progress.finish()
    total.pop("next", None)
    if args.json:
        _print_json(total)
        return EXIT_OK
    before, after = total.get("before", {}), total.get("after", {})
    print(f"defragmented volume {args.name!r}: {_number(before.get('extents'))} -> "
          f"{_number(after.get('extents'))} extents ({_number(before.get('extents_per_gib'))}"
          f" -> {_number(after.get('extents_per_gib'))} per GiB); moved "
          f"{format_size(total['moved_bytes'])}, left {format_size(total['shared_bytes'])} "
          "shared in place")
    if total["no_space_bytes"]:
        print(f"warning: {format_size(total['no_space_bytes'])} could not be moved for lack "
              f"of free runs of {MIN_PIECE} chunks or more (free space in shorter runs is "
              "not used)", file=sys.stderr)
    return EXIT_OK


# -- argument parsing -------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``pool`` and ``volume`` command groups to the top-level parser."""
    from nbdserver.blockmap.base import designs
    from nbdserver.pool.format import DEFAULT_CHUNK, VOLUME_NAME_RULE

    new_name_help = f"the new volume's name: {VOLUME_NAME_RULE}"
    units = textwrap.fill(
        "Sizes are bytes, or a number with a binary unit: K, M, G, T (1024-based: 1G, 1GB "
        "and 1GiB all mean 2^30 bytes); a fraction is fine when it makes whole bytes (1.5G).",
        78)
    examples = argparse.RawDescriptionHelpFormatter

    def described(text: str, *lines: str) -> str:
        """A description wrapped as argparse would, then example command lines as is."""
        return textwrap.fill(text, 78) + "\n\nExamples:\n" + "\n".join(
            f"  {line}" for line in lines)

    from nbdserver.cli import path_argument

    def common(p: argparse.ArgumentParser, json_help: str = "print JSON") -> None:
        p.add_argument("pool", metavar="POOL", type=path_argument,
                       help="the pool's file or block device")
        p.add_argument("--json", action="store_true", help=json_help)

    pool = sub.add_parser("pool", help="create, inspect and check pools",
                          description="A pool is one file or block device holding thin, "
                                      "forkable volumes.")
    psub = pool.add_subparsers(dest="pool_command", metavar="COMMAND", required=True)

    p = psub.add_parser("create", help="create a pool", formatter_class=examples,
                        description=described(
                            "Create a new, empty pool in a file (of --size bytes) or on a "
                            "block device (its whole size).",
                            "nbdserver pool create pool.img --size 20G",
                            "nbdserver pool create pool.img --size 100G --blockmap extent "
                            "--preallocate",
                            "nbdserver pool create pool.img --size 50G --preallocate=full",
                            "nbdserver pool create /dev/sdb      (the whole device)"),
                        epilog=units)
    common(p)
    p.add_argument("--size", type=_size, help="pool size for a file, e.g. 20G (units below; "
                                              "a block device is used whole: leave it out)")
    names = sorted(designs())
    p.add_argument("--blockmap", default="radix", choices=names,
                   help="block-map design: radix (Parallax tree, O(1) forks), extent (extent "
                        "lists that keep data contiguous), linear (LVM classic snapshots); "
                        "default radix")
    p.add_argument("--chunk-size", type=_chunk_size, default=DEFAULT_CHUNK,
                   help="allocation unit, a power of two from 4K to 1M (default 4K)")
    p.add_argument("--max-volumes", type=_max_volumes, default=4096,
                   help="volumes the catalog holds at most, 1 to 1048576, rounded up to a "
                        "multiple of 16 (a catalog page); default 4096")
    p.add_argument("--preallocate", nargs="?", const="falloc", type=_preallocate_mode,
                   metavar="{falloc,full}",
                   help="allocate the whole file now, so that a full host filesystem cannot "
                        "fail a write later. falloc (the default when no mode is given): "
                        "fallocate, quick, writes nothing, but the filesystem still converts "
                        "each block at its first write. full: also write zeros over the whole "
                        "file once (as long as writing the file takes; progress is shown), "
                        "so that first writes, such as a snapshot's copy-on-write, cost what "
                        "overwrites do, as on a block device. By default the file is sparse "
                        "and grows as data is written (a block device is always whole)")
    p.add_argument("--force", action="store_true",
                   help="on a block device: write the new pool even over an existing pool "
                        "or other data (a file system, a partition table) in its first MiB, "
                        "which is otherwise refused; destroys every volume there (an existing "
                        "file is always refused)")
    p.add_argument("--fanout", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_pool_create)

    p = psub.add_parser("info", help="show a pool's size, free space and layout",
                        description="Show a pool's size, free space, design, chunk size, "
                                    "volume count and on-disk layout. Works while a server "
                                    "has the pool open (asked through its control socket).")
    common(p, "print a JSON object (size_bytes, free_bytes, blockmap, ...)")
    p.set_defaults(handler=cmd_pool_info)

    p = psub.add_parser("check", help="verify every reference count and checksum",
                        description="Recount every reference from every volume's map and "
                                    "compare with the space maps, and verify that each "
                                    "guaranteed volume is promised every chunk it may still "
                                    "need. Exit 0 when clean, 1 when a problem is found "
                                    "(each one is named).")
    common(p)
    p.set_defaults(handler=cmd_pool_check)

    vol = sub.add_parser("volume", help="create, fork, snapshot, delete and list volumes",
                         description="Volumes live in a pool. Works on a pool a running server "
                                     "has open too (through its control socket).")
    vsub = vol.add_subparsers(dest="volume_command", metavar="COMMAND", required=True)

    p = vsub.add_parser("create", help="create an empty (all zeros) thin volume",
                        formatter_class=examples,
                        description=described(
                            "Create an empty volume: it reads as zeros and takes no space "
                            "until written (thin), unless --guarantee reserves it all now.",
                            "nbdserver volume create pool.img golden --size 10G",
                            "nbdserver volume create pool.img db --size 50G --guarantee"),
                        epilog=units)
    common(p)
    p.add_argument("name", metavar="NAME", type=_new_volume_name, help=new_name_help)
    p.add_argument("--size", type=_volume_size, required=True,
                   help="e.g. 10G (a multiple of 512 bytes; units below)")
    p.add_argument("--guarantee", action="store_true",
                   help="reserve every chunk the volume could need (and every map page its "
                        "map could hold), so that its writes never fail for lack of "
                        "space (fails now if the pool cannot promise it)")
    p.set_defaults(handler=cmd_volume_create)

    p = vsub.add_parser("snapshot", help="a read-only point-in-time copy (instant)",
                        description="Make a read-only copy of SOURCE as it is now, in constant "
                                    "time whatever its size: the copy shares every chunk "
                                    "until SOURCE overwrites it. An exported SOURCE is "
                                    "quiesced for the moment (its writes in flight finish "
                                    "first). Example: nbdserver volume snapshot pool.img vm1 "
                                    "vm1-monday")
    common(p)
    p.add_argument("source", metavar="SOURCE", help="the volume to copy")
    p.add_argument("name", metavar="NAME", type=_new_volume_name, help=new_name_help)
    p.set_defaults(handler=cmd_volume_snapshot)

    p = vsub.add_parser("fork", help="a writable copy that shares unchanged data (instant)",
                        description="Make a writable copy of SOURCE, in constant time whatever "
                                    "its size: both share every chunk until one of them "
                                    "writes it. A fork can be forked again, to any depth "
                                    "(not with the linear design). Example: nbdserver volume "
                                    "fork pool.img golden vm1. A running server serves the "
                                    "new volume at once, with no restart, if its config has "
                                    "an export 'volumes: PATTERN' of the pool that the name "
                                    "matches (docs/operations.md).")
    common(p, "print the new volume as a JSON object (an array of them for several NAMEs)")
    p.add_argument("source", metavar="SOURCE", help="the volume to copy")
    p.add_argument("name", metavar="NAME", nargs="+", type=_new_volume_name,
                   help=new_name_help + "; several NAMEs make several forks, all of SOURCE "
                   "at one point in time (an exported SOURCE is quiesced once), in one "
                   "commit")
    p.add_argument("--guarantee", action="store_true",
                   help="reserve every chunk and map page the fork could need, as for create")
    p.set_defaults(handler=cmd_volume_fork)

    p = vsub.add_parser("delete", help="delete a volume and free what only it used",
                        description="Delete a volume and free the chunks and map pages only "
                                    "it referenced (shared ones stay with the volumes that "
                                    "share them). Refused while the volume is exported (by a "
                                    "named export, or to a client connected through a "
                                    "'volumes:' export), and for a linear origin that still "
                                    "has snapshots.")
    common(p, "print {name, freed_bytes} as JSON (an array of them for several NAMEs)")
    p.add_argument("name", metavar="NAME", nargs="+",
                   help="the volume to delete; several are checked first (a bad one deletes "
                        "nothing) and deleted together")
    p.set_defaults(handler=cmd_volume_delete)

    p = vsub.add_parser("list", help="list volumes with their sharing",
                        description="List every volume: size, parent, read-only, fork depth, "
                                    "bytes only it references (exclusive) and bytes it shares "
                                    "with others. A volume whose map cannot be read whole is "
                                    "listed with unknown statistics, and the exit status is "
                                    "1.")
    common(p, "print a JSON array of objects (name, size, parent, read_only, depth, "
              "exclusive_bytes, shared_bytes, ...)")
    p.add_argument("--brief", action="store_true",
                   help="the catalog only (name, size, parent, depth, read-only, created, "
                        "in use), without the exclusive and shared bytes: those walk every "
                        "volume's map (seconds per fork of a large volume), this answers at "
                        "once whatever the pool holds")
    p.set_defaults(handler=cmd_volume_list)

    p = vsub.add_parser("info", help="details of one volume, fragmentation included",
                        description="Show one volume's catalog record (size, parent, "
                                    "guarantee, created), its space (exclusive and shared "
                                    "bytes) and how fragmented its data is (extents per GiB).")
    common(p)
    p.add_argument("name", metavar="NAME", help="the volume")
    p.set_defaults(handler=cmd_volume_info)

    p = vsub.add_parser("defrag", help="make a volume's own data physically contiguous",
                        description="Rewrite the chunks only this volume references so that "
                                    "each logical run of them is physically contiguous "
                                    "(shared chunks stay where they are). Safe while the "
                                    "volume is exported: concurrent writes are held for the "
                                    "moment each batch is switched over. Reports extents per "
                                    "GiB before and after; progress goes to stderr.")
    common(p, "print a JSON object (before, after, moved_bytes, shared_bytes, ...)")
    p.add_argument("name", metavar="NAME", help="the volume to defragment")
    p.set_defaults(handler=cmd_volume_defrag)


if __name__ == "__main__":
    sys.exit("use: nbdserver pool|volume ...")
