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

from nbdserver.errors import UserError
from nbdserver.pool.pool import Pool

Op = Callable[[Pool, dict[str, Any]], Awaitable[Any]]


async def pool_info(pool: Pool, args: dict[str, Any]) -> Any:
    return pool.info()


async def pool_check(pool: Pool, args: dict[str, Any]) -> Any:
    report = await pool.check()
    return {
        "ok": report.ok,
        "problems": report.problems,
        "volumes": report.volumes,
        "data_chunks_referenced": report.data_chunks_referenced,
        "metadata_pages_referenced": report.metadata_pages_referenced,
        "leaked_chunks": report.leaked_chunks,
        "leaked_pages": report.leaked_pages,
        "free_bytes": pool.data.free * pool.chunk_size,
    }


async def volume_create(pool: Pool, args: dict[str, Any]) -> Any:
    vol = await pool.create_volume(args["name"], int(args["size"]),
                                   guarantee=bool(args.get("guarantee")))
    return pool.volume_summary(vol)


async def volume_snapshot(pool: Pool, args: dict[str, Any]) -> Any:
    vol = await pool.clone_volume(args["source"], args["name"], snapshot=True)
    return pool.volume_summary(vol)


async def volume_fork(pool: Pool, args: dict[str, Any]) -> Any:
    vol = await pool.clone_volume(args["source"], args["name"], snapshot=False,
                                  guarantee=bool(args.get("guarantee")))
    return pool.volume_summary(vol)


async def volume_delete(pool: Pool, args: dict[str, Any]) -> Any:
    before = pool.data.free
    await pool.delete_volume(args["name"])
    return {"name": args["name"], "freed_bytes": (pool.data.free - before) * pool.chunk_size}


async def volume_list(pool: Pool, args: dict[str, Any]) -> Any:
    return [await pool.volume_info(vol) for vol in pool.live_volumes()]


async def volume_info(pool: Pool, args: dict[str, Any]) -> Any:
    return await pool.volume_info(pool.volume(args["name"]))


async def volume_defrag(pool: Pool, args: dict[str, Any]) -> Any:
    """Make the volume's own chunks contiguous; `start`/`limit` (logical chunks) run a slice.
    An in-process caller may pass a `progress` callable (never over the socket: JSON)."""
    from nbdserver.defrag import defrag_volume

    progress = args.get("progress")
    limit = args.get("limit")
    return await defrag_volume(pool, args["name"], start=int(args.get("start") or 0),
                               limit=None if limit is None else int(limit),
                               progress=progress if callable(progress) else None)


OPS: dict[str, Op] = {
    "pool.info": pool_info,
    "pool.check": pool_check,
    "volume.create": volume_create,
    "volume.snapshot": volume_snapshot,
    "volume.fork": volume_fork,
    "volume.delete": volume_delete,
    "volume.list": volume_list,
    "volume.info": volume_info,
    "volume.defrag": volume_defrag,
}


async def run_op(pool: Pool, op: str, args: dict[str, Any]) -> Any:
    fn = OPS.get(op)
    if fn is None:
        raise UserError(f"unknown operation {op!r}; valid: {', '.join(sorted(OPS))}")
    try:
        return await fn(pool, args)
    except KeyError as e:
        raise UserError(f"operation {op!r} is missing the argument {e.args[0]!r}") from None
