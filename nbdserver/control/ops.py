"""Pool and volume operations, run the same way offline (CLI) and online (control socket).

Each operation takes an open :class:`~nbdserver.pool.pool.Pool` and a dict of
arguments, and returns a JSON-serialisable result; errors are
:class:`~nbdserver.errors.UserError` with a message for people. Create, snapshot
and fork answer with the volume's catalog fields only (``Pool.volume_summary``):
the map statistics of ``volume info`` walk the whole map, and a fork of a large
volume must stay instant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nbdserver.errors import PoolDamaged, UserError
from nbdserver.pool.format import FormatError
from nbdserver.pool.pool import Pool

Op = Callable[[Pool, dict[str, Any]], Awaitable[Any]]

# The arguments of each operation: name -> (kind, required). Kinds: "name" (a string),
# "names" (a non-empty list of strings),
# "size" (an integer number of bytes, >= 1), "chunk" (an integer >= 0), "count" (an
# integer >= 1, or null), "bool" (true or false), "callable" (in process only: a
# progress callback; never from JSON).
ARGS: dict[str, dict[str, tuple[str, bool]]] = {
    "pool.info": {},
    "pool.check": {"progress": ("callable", False)},
    "volume.create": {"name": ("name", True), "size": ("size", True),
                      "guarantee": ("bool", False)},
    "volume.snapshot": {"source": ("name", True), "name": ("name", True)},
    "volume.fork": {"source": ("name", True), "name": ("name", True),
                    "guarantee": ("bool", False)},
    "volume.forks": {"source": ("name", True), "names": ("names", True),
                     "guarantee": ("bool", False)},
    "volume.delete": {"name": ("name", True), "progress": ("callable", False)},
    "volume.deletes": {"names": ("names", True), "progress": ("callable", False)},
    "volume.list": {"brief": ("bool", False)},
    "volume.info": {"name": ("name", True)},
    "volume.defrag": {"name": ("name", True), "start": ("chunk", False),
                      "limit": ("count", False), "progress": ("callable", False)},
}


def check_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """`args` checked against ARGS[op]: UserError naming the argument at fault (missing,
    unknown, or of the wrong type); the absent optional ones as None."""
    spec = ARGS[op]
    unknown = sorted(set(args) - set(spec))
    if unknown:
        valid = ", ".join(spec) or "none"
        raise UserError(f"operation {op!r} has no argument {unknown[0]!r} (valid: {valid})")
    out: dict[str, Any] = {}
    for key, (kind, required) in spec.items():
        value = args.get(key)
        if value is None:
            if required:
                raise UserError(f"operation {op!r} is missing the argument {key!r}")
            out[key] = None
            continue
        what = f"argument {key!r} of {op!r}"
        if kind == "name":
            if not isinstance(value, str):
                raise UserError(f"{what} must be a string, not {value!r}")
        elif kind == "names":
            if not (isinstance(value, list) and value
                    and all(isinstance(v, str) for v in value)):
                raise UserError(f"{what} must be a non-empty list of strings, not {value!r}")
        elif kind in ("size", "chunk", "count"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{what} must be an integer, not {value!r}")
            low = 0 if kind == "chunk" else 1
            if value < low:
                raise UserError(f"{what} must be at least {low}, not {value}")
            if value >= 1 << 63:
                raise UserError(f"{what} is too large: {value}")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise UserError(f"{what} must be true or false, not {value!r}")
        elif kind == "callable" and not callable(value):
            raise UserError(f"{what} cannot be given here")
        out[key] = value
    return out


async def pool_info(pool: Pool, args: dict[str, Any]) -> Any:
    return pool.info()


async def pool_check(pool: Pool, args: dict[str, Any]) -> Any:
    report = await pool.check(args["progress"])
    return {
        "ok": report.ok,
        "problems": report.problems,
        "warnings": report.warnings,
        "volumes": report.volumes,
        "data_chunks_referenced": report.data_chunks_referenced,
        "metadata_pages_referenced": report.metadata_pages_referenced,
        "leaked_chunks": report.leaked_chunks,
        "leaked_pages": report.leaked_pages,
        "free_bytes": pool.data.free * pool.chunk_size,
    }


async def volume_create(pool: Pool, args: dict[str, Any]) -> Any:
    vol = await pool.create_volume(args["name"], args["size"],
                                   guarantee=bool(args["guarantee"]))
    return pool.volume_summary(vol)


async def volume_snapshot(pool: Pool, args: dict[str, Any]) -> Any:
    vol = await pool.clone_volume(args["source"], args["name"], snapshot=True)
    return pool.volume_summary(vol)


async def volume_fork(pool: Pool, args: dict[str, Any]) -> Any:
    vol = await pool.clone_volume(args["source"], args["name"], snapshot=False,
                                  guarantee=bool(args["guarantee"]))
    return pool.volume_summary(vol)


async def volume_forks(pool: Pool, args: dict[str, Any]) -> Any:
    """Several forks of one point in time of the source (Pool.clone_volumes)."""
    vols = await pool.clone_volumes(args["source"], args["names"], snapshot=False,
                                    guarantee=bool(args["guarantee"]))
    return [pool.volume_summary(vol) for vol in vols]


async def volume_delete(pool: Pool, args: dict[str, Any]) -> Any:
    """An in-process caller may pass `progress(freed bytes so far)` (never over the socket:
    JSON)."""
    progress = args["progress"]
    chunk = pool.chunk_size
    freed = await pool.delete_volume(args["name"], None if progress is None else (
        lambda chunks: progress(chunks * chunk)))
    return {"name": args["name"], "freed_bytes": freed * chunk}


async def volume_deletes(pool: Pool, args: dict[str, Any]) -> Any:
    """Several deletes, checked first and committed together (Pool.delete_volumes); an
    in-process `progress(freed bytes so far)` as for volume.delete."""
    progress = args["progress"]
    chunk = pool.chunk_size
    freed = await pool.delete_volumes(args["names"], None if progress is None else (
        lambda chunks: progress(chunks * chunk)))
    return [{"name": name, "freed_bytes": n * chunk}
            for name, n in zip(args["names"], freed, strict=True)]


async def volume_list(pool: Pool, args: dict[str, Any]) -> Any:
    """Every live volume's info. One whose map cannot be read (a damaged page) is still
    listed: its catalog fields, null map statistics, and `damaged` saying why. `brief`:
    the catalog fields only (Pool.volume_summary), without walking any map: instant for
    hundreds of forks of a large volume."""
    if args["brief"]:
        return [pool.volume_summary(vol) for vol in pool.live_volumes()]
    return [await pool.volume_info(vol, damaged_ok=True) for vol in pool.live_volumes()]


async def volume_info(pool: Pool, args: dict[str, Any]) -> Any:
    return await pool.volume_info(pool.volume(args["name"]))


async def volume_defrag(pool: Pool, args: dict[str, Any]) -> Any:
    """Make the volume's own chunks contiguous; `start`/`limit` (bytes) run a slice.
    An in-process caller may pass a `progress` callable (never over the socket: JSON)."""
    from nbdserver.defrag import defrag_volume

    return await defrag_volume(pool, args["name"], start=args["start"] or 0,
                               limit=args["limit"], progress=args["progress"])


OPS: dict[str, Op] = {
    "pool.info": pool_info,
    "pool.check": pool_check,
    "volume.create": volume_create,
    "volume.snapshot": volume_snapshot,
    "volume.fork": volume_fork,
    "volume.forks": volume_forks,
    "volume.delete": volume_delete,
    "volume.deletes": volume_deletes,
    "volume.list": volume_list,
    "volume.info": volume_info,
    "volume.defrag": volume_defrag,
}


async def run_op(pool: Pool, op: str, args: dict[str, Any]) -> Any:
    """Run `op` with `args` (checked first: see check_args)."""
    fn = OPS.get(op)
    if fn is None:
        raise UserError(f"unknown operation {op!r}; valid: {', '.join(sorted(OPS))}")
    checked = check_args(op, args)
    try:
        return await fn(pool, checked)
    except FormatError as e:  # a map or catalog page that fails its checksum, say
        raise PoolDamaged(f"pool {pool.path}: damaged metadata: {e} ('nbdserver pool check "
                        f"{pool.path}' lists what is damaged)") from None
