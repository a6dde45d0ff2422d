"""Backends: what an export serves (a raw file or device, or a volume of a pool)."""

from nbdserver.backend.base import Backend, Done, ReadDone, ReadResult, StatusDone

__all__ = ["Backend", "Done", "ReadDone", "ReadResult", "StatusDone"]
