"""The sans-IO NBD protocol core: :class:`ServerConnection` turns bytes into events.

See :mod:`nbdserver.protocol.connection` for the design note and
:mod:`nbdserver.protocol.events` for the events and export data. Wire numbers
live in :mod:`nbdserver.protocol.constants`.
"""

from nbdserver.protocol import constants
from nbdserver.protocol.connection import WRITE_DISCARD_LIMIT, ServerConnection, State
from nbdserver.protocol.constants import nbd_error_code
from nbdserver.protocol.events import (
    NEED_DATA,
    Command,
    ConnectionLimits,
    Disconnect,
    Event,
    ExportCatalog,
    ExportInfo,
    MetaContext,
    NeedData,
    ProtocolViolation,
    Request,
    TransmissionStarted,
)

__all__ = [
    "NEED_DATA",
    "WRITE_DISCARD_LIMIT",
    "Command",
    "ConnectionLimits",
    "Disconnect",
    "Event",
    "ExportCatalog",
    "ExportInfo",
    "MetaContext",
    "NeedData",
    "ProtocolViolation",
    "Request",
    "ServerConnection",
    "State",
    "TransmissionStarted",
    "constants",
    "nbd_error_code",
]
