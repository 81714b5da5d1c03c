"""``blockgraph serve``: a storage daemon with qemu-storage-daemon's command line and a QMP monitor."""

from __future__ import annotations

import asyncio
import sys

from ..plugins import PluginHost


def main(argv: list[str], host: PluginHost) -> int:
    from .. import __version__
    from ..daemon.argv import HELP, PROG, UsageError, parse
    from ..daemon.run import daemonize, serve

    try:
        parsed = parse(argv)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if parsed.help:
        print(HELP, end="")
        return 0
    if parsed.version:
        print(f"{PROG} version {__version__} (qemu-storage-daemon compatible)")
        return 0
    ready = daemonize() if parsed.daemonize else None
    return asyncio.run(serve(host, parsed.options, daemonized=parsed.daemonize, ready=ready))
