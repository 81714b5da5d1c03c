"""``blockgraph SUBCOMMAND ...``: find the subcommand in the plugin registry and run it.

Global options come before the subcommand: ``--log-level``, ``--log-format=json``,
``-p no:NAME`` to block a plugin, ``--plugin FILE.py`` to load a one-off plugin.
"""

from __future__ import annotations

import sys

from ..errors import BlockGraphError
from ..log import LEVELS, configure
from ..plugins import PluginHost


def _usage(host: PluginHost) -> str:
    lines = ["usage: blockgraph [--log-level LEVEL] [--log-format json] [-p no:PLUGIN] [--plugin FILE]",
             "                  COMMAND [ARGS...]", "", "commands:"]
    for name, entry in sorted(host.table("cli").items()):
        lines.append(f"  {name:<10} {entry.meta.get('help', '')}")
    return "\n".join(lines)


def _load_file_plugin(path: str) -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"blockgraph_local_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise BlockGraphError(f"--plugin: cannot load '{path}'")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    level, json_logs, blocked, extra = "warning", False, [], []
    try:
        while argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            opt = argv.pop(0)
            key, eq, value = opt.partition("=")
            if not eq and key in ("--log-level", "--log-format", "-p", "--plugin"):
                if not argv:
                    raise BlockGraphError(f"option '{key}' needs a value")
                value = argv.pop(0)
            if key == "--log-level" and value in LEVELS:
                level = value
            elif key == "--log-format" and value in ("json", "console"):
                json_logs = value == "json"
            elif key == "-p" and value.startswith("no:"):
                blocked.append(value[3:])
            elif key == "--plugin":
                extra.append((_load_file_plugin(value), f"local:{value}"))
            else:
                raise BlockGraphError(f"unknown option '{opt}'")
        configure(level, json_logs)
        host = PluginHost(block=blocked, extra=extra)
    except BlockGraphError as e:
        print(f"blockgraph: {e}", file=sys.stderr)
        return 1
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(host))
        return 0 if argv else 1
    entry = host.table("cli").get(argv[0])
    if entry is None:
        print(f"blockgraph: unknown command '{argv[0]}'\n\n{_usage(host)}", file=sys.stderr)
        return 1
    try:
        return int(entry.resolve().main(argv[1:], host) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
