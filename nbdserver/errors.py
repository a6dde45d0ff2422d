"""Errors shared by every layer.

`NbdError` carries a POSIX errno value (from :mod:`errno`). The only place that
turns errno values into NBD wire error numbers is
:func:`nbdserver.protocol.constants.nbd_error_code`; deeper layers never deal
with wire numbers.

`ConfigError` and `UserError` are for people, not for the wire: their message is
printed as is, without a traceback, and names the key, file or argument at fault.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable


class NbdError(Exception):
    """A request failed with `errno_value` (for example ``errno.ENOSPC``)."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(errno_value, str(errno_value)))
        self.errno = errno_value
        self.message = message


class UserError(Exception):
    """A mistake in a command, argument or file that a person should fix."""


def some_names(names: Iterable[str], shown: int = 10) -> str:
    """Names for a message: quoted, at most `shown` of them, then how many more."""
    listed = list(names)
    more = f" and {len(listed) - shown:,} more" if len(listed) > shown else ""
    return ", ".join(repr(n) for n in listed[:shown]) + more


class UsageError(UserError):
    """A command line that cannot work as given (a missing argument that only the
    target's kind makes necessary): exit status 2, as for argparse's own errors."""


class ConfigError(UserError):
    """The YAML configuration is invalid; the message names the key (and line)."""


class Interrupted(BaseException):
    """A signal that stops a command (SIGTERM, SIGHUP) raised where the command must
    undo what it began (a pool file half made); exit status 128 + `signum`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class StartCancelled(Exception):
    """A stop asked for while the server was starting abandoned a long start-up step
    (zero-filling a new pool file): the server stops as asked, not as a failure."""


class PoolDamaged(UserError):
    """An operation met a pool page that fails its checks (a checksum, say): the pool's
    metadata is damaged, not the request; a server logs it as an error."""
