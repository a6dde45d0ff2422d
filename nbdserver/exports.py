"""Export names -> backends, and the catalog the protocol core reads during the handshake.

The empty export name (a client that does not name one) means the first export
in the configuration, as with qemu-nbd and nbdkit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from nbdserver.backend.base import Backend
from nbdserver.protocol import ExportInfo

MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE we accept (NBD's portable limit, 2^25)


@dataclass
class Export:
    """An export: its handshake information and the backend that serves it."""

    info: ExportInfo
    backend: Backend


def export_info(name: str, backend: Backend, *, min_block: int) -> ExportInfo:
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
    """The exports a server offers, in configuration order (an ExportCatalog)."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.info.name in self._exports:
            raise ValueError(f"duplicate export {export.info.name!r}")
        self._exports[export.info.name] = export

    def get(self, name: str) -> Export | None:
        if name == "" and self._exports:
            return next(iter(self._exports.values()))
        return self._exports.get(name)

    def lookup(self, name: str) -> ExportInfo | None:
        export = self.get(name)
        return export.info if export else None

    def list_exports(self) -> Iterable[ExportInfo]:
        return [e.info for e in self._exports.values()]

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def __len__(self) -> int:
        return len(self._exports)
