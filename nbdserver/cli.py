"""Command line: ``nbdserver serve``, ``check-config``, and the pool and volume commands.

Every expected failure (bad config, bad argument, missing file, pool errors) is
a :class:`~nbdserver.errors.UserError`: printed as one line,
``nbdserver: error: ...``, exit status 2 for usage and config errors, 1 for
operations that failed. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from nbdserver import __version__
from nbdserver.errors import ConfigError, Interrupted, NbdError, UsageError, UserError

log = logging.getLogger("nbdserver")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="nbdserver: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import uvloop

    from nbdserver.config import DEFAULT_CONFIG_PATH, load_config
    from nbdserver.server.app import serve

    path = args.config or DEFAULT_CONFIG_PATH
    activated = os.environ.get("LISTEN_PID") == str(os.getpid())
    config = load_config(path, socket_activation=activated)
    if args.io:
        import dataclasses
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, io=args.io))
    _setup_logging(args.log_level or config.server.log_level)
    log.info("configuration %s", path)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        clean = runner.run(serve(config))
        _ignore_late_stops(runner.get_loop())
    return EXIT_OK if clean else EXIT_FAILED


def _ignore_late_stops(loop: asyncio.AbstractEventLoop) -> None:
    """Once stopped, a repeated SIGTERM or SIGHUP (a supervisor's, a script's) changes
    nothing, also while the process exits: closing the loop would give them back their
    default action, which kills (status -15 instead of the stop's own). The signals are
    blocked while the loop's handlers give way to SIG_IGN, so none slips in between."""
    import signal

    late = {signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, late)
    try:
        for sig in late:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, late)


def cmd_check_config(args: argparse.Namespace) -> int:
    from nbdserver.config import (
        DEFAULT_CONFIG_PATH,
        config_to_json,
        config_warnings,
        describe,
        load_config,
    )

    # A config without listeners is valid for systemd socket activation, which passes
    # the sockets: accepted here with a warning (serve refuses it without activation).
    if args.file is None:
        args.file = DEFAULT_CONFIG_PATH
    config = load_config(args.file, socket_activation=True)
    if args.json:
        warnings = config_warnings(config)
        print(json.dumps({**config_to_json(config), "warnings": warnings}, indent=2))
        for warning in warnings:
            print(f"nbdserver: warning: {warning}", file=sys.stderr)
    else:
        print(describe(config))
        print(f"{args.file}: configuration is valid")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error (the usage is one --help away);
    subcommand parsers are made of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # "--size -1G" gives the option a negative size (refused with a message that
        # says so), not an unknown option "-1G": argparse's pattern, with a unit.
        self._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?[A-Za-z]*$")

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("nbdserver").strip()
        where = f"{command}: " if command else ""
        if message.startswith("the following arguments are required"):
            # (which argument was left out shows best beside the order they go in)
            usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
            message += f"; usage: {usage}"
        self.exit(EXIT_USAGE, f"nbdserver: error: {where}{message} (see '{self.prog} "
                              "--help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nbdserver",
        description="An NBD server that exports forkable volumes for virtual machines.",
        epilog=(
            "Examples:\n"
            "  nbdserver serve                      serve the default config\n"
            "  nbdserver serve -c my.yaml           serve another config\n"
            "  nbdserver check-config my.yaml       validate a config and explain what it serves\n"
            "  nbdserver pool create pool.img --size 20G\n"
            "  nbdserver volume create pool.img golden --size 4G\n"
            "  nbdserver volume fork pool.img golden vm1\n"
            "\nRun 'nbdserver COMMAND --help' for the options of each command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nbdserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "serve", help="serve the exports of a config file",
        description="Serve the exports of a YAML config over NBD until SIGTERM, SIGINT or "
                    "SIGHUP, then finish in-flight requests (up to server.stop-timeout), flush "
                    "and exit 0 (1 if a pool had failed a commit after a device error; SIGINT "
                    "during the stop exits 1 at once, as a crash would). Prints the NBD URIs "
                    "clients can use. Systemd socket activation (LISTEN_FDS) is honoured.",
    )
    p.add_argument("-c", "--config", metavar="FILE", type=path_argument,
                   help="YAML config (default: config/nbdserver.yaml in the source tree)")
    p.add_argument("--io", choices=("aio", "threads"),
                   help="I/O engine, overriding server.io in the config (whose default is "
                        "aio: Linux native AIO)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override server.log-level (default info)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "check-config", help="validate a config file and explain it",
        description="Validate a YAML config: exit 0 and explain what it would serve (with "
                    "warnings about what is valid but probably not meant: still exit 0), or "
                    "exit 2 with a message naming the file, line and key at fault.",
    )
    p.add_argument("file", metavar="FILE", type=path_argument, nargs="?",
                   help="the YAML config (default: config/nbdserver.yaml in the source tree, "
                        "what serve uses without -c)")
    p.add_argument("--json", action="store_true", help="print the parsed config as JSON")
    p.set_defaults(handler=cmd_check_config)

    try:
        from nbdserver import admin
    except ImportError:  # the pool commands are optional in a partial install
        pass
    else:
        admin.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to, not by nbdserver's parser
        words = [w for w in (args.command, getattr(args, "pool_command", None),
                             getattr(args, "volume_command", None)) if w]
        _Parser(prog=" ".join(["nbdserver", *words])).error(
            f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return handler(args)
    except (ConfigError, UsageError) as e:
        print(f"nbdserver: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UserError as e:
        print(f"nbdserver: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except NbdError as e:  # an I/O error of the pool's device, say
        print(f"nbdserver: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Interrupted as e:
        return 128 + e.signum
    except BrokenPipeError:  # `nbdserver volume list POOL | head`: the reader left
        # (stdout goes to /dev/null, so that flushing it at exit does not fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as e:  # a path the system refuses (too long, a loop, no permission)
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"nbdserver: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED


def path_argument(text: str) -> str:
    """argparse type of a path argument: an empty one (an unset shell variable) is a
    mistake, not the current directory or a default."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
