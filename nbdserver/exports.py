"""Export names -> backends, and the catalog the protocol core reads during the handshake.

Two kinds of export: *named* ones, opened when the server starts and served
until it stops, and *sources* that serve many names found when a client asks
(:class:`ExportSource`: the volumes of a pool, by pattern, see
:class:`nbdserver.pools.VolumeExports`). A source opens a backend when a
connection starts transmission and closes it when the last connection using it
has ended. Named exports come first: a name both serve is the named export's.

The empty export name (a client that does not name one) means the first named
export in the configuration, as with qemu-nbd and nbdkit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from nbdserver.backend.base import Backend, ExportTraits
from nbdserver.protocol import ExportInfo

MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE we accept (NBD's portable limit, 2^25)


@dataclass
class Export:
    """An export: its handshake information and the backend that serves it."""

    info: ExportInfo
    backend: Backend


class ExportSource(Protocol):
    """Exports found by name when a client asks (module note)."""

    def lookup(self, name: str) -> ExportInfo | None:
        """The export `name` as it is now, or None if this source does not serve it."""
        ...

    def list_exports(self) -> Iterable[ExportInfo]: ...

    def open(self, name: str) -> tuple[Backend, Callable[[], None]]:
        """The backend for `name` (just looked up, with no await since) and the call that
        releases it once the connection has ended with no request in flight."""
        ...

    async def close(self) -> None:
        """Close every backend still open (the server stops)."""
        ...


def export_info(name: str, backend: ExportTraits, *, min_block: int) -> ExportInfo:
    """The handshake view of `backend` served as `name`."""
    return ExportInfo(
        name=name,
        size=backend.size,
        description=backend.description,
        read_only=backend.read_only,
        can_flush=True,
        can_fua=True,
        can_trim=backend.can_trim and not backend.read_only,
        can_zero=backend.can_zero and not backend.read_only,
        can_fast_zero=backend.can_fast_zero and not backend.read_only,
        can_cache=True,
        can_multi_conn=True,
        rotational=backend.rotational,
        min_block=min_block,
        pref_block=max(backend.preferred_block, min_block, 512),
        max_block=MAX_PAYLOAD,
        meta_contexts=backend.meta_contexts,
    )


class ExportTable:
    """The exports a server offers: named ones in configuration order, then the sources
    (an ExportCatalog). Iterating and len() see the named exports only."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}
        self.sources: list[ExportSource] = []

    def add(self, export: Export) -> None:
        if export.info.name in self._exports:
            raise ValueError(f"duplicate export {export.info.name!r}")
        self._exports[export.info.name] = export

    def add_source(self, source: ExportSource) -> None:
        self.sources.append(source)

    def get(self, name: str) -> Export | None:
        """The named export `name` (the first for "")."""
        if name == "" and self._exports:
            return next(iter(self._exports.values()))
        return self._exports.get(name)

    def lookup(self, name: str) -> ExportInfo | None:
        export = self.get(name)
        if export is not None:
            return export.info
        if name:
            for source in self.sources:
                info = source.lookup(name)
                if info is not None:
                    return info
        return None

    def open(self, name: str) -> tuple[Backend, Callable[[], None] | None]:
        """The backend of `name`, which lookup() just found, and what releases it (None
        for a named export, open until the server stops)."""
        export = self.get(name)
        if export is not None:
            return export.backend, None
        for source in self.sources:
            if source.lookup(name) is not None:
                return source.open(name)
        raise KeyError(name)  # (the core only lets names it looked up through)

    def list_exports(self) -> Iterable[ExportInfo]:
        out = [e.info for e in self._exports.values()]
        seen = set(self._exports)
        for source in self.sources:
            for info in source.list_exports():
                if info.name not in seen:
                    seen.add(info.name)
                    out.append(info)
        return out

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)
