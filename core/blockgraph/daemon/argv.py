"""qemu-storage-daemon's command line: GNU getopt_long with ``-hT:V`` and its long options, options kept
in order (the daemon acts on each as it comes, so ``--export`` must follow its ``--blockdev``)."""

from __future__ import annotations

import attrs

PROG = "blockgraph serve"
LONG = {"blockdev": True, "chardev": True, "daemonize": False, "drive": True, "export": True, "help": False,
        "monitor": True, "nbd-server": True, "object": True, "pidfile": True, "trace": True, "version": False}
SHORT = {"h": ("help", False), "T": ("trace", True), "V": ("version", False)}

HELP = f"""\
Usage: {PROG} [options]
blockgraph storage daemon (qemu-storage-daemon's options)

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         accepted for compatibility; tracing is done with
                         'blockgraph --log-level debug serve ...'
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend (keyval or JSON)

  --drive <QEMU -drive options>
                         a drive as QEMU's -drive expands it; with
                         if=none,id=<name> it is the BlockBackend <name>

  --chardev socket,id=<id>,path=<socket-path>,server=on[,wait=off]
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on[,wait=off]
  --chardev stdio,id=<id>
                         configure a character device for a monitor

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node (the export type
                         comes from a plugin, e.g. blockgraph-nbd)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
  --nbd-server addr.type=unix,addr.path=<path>
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>; the 'id'
                         property must be set

  --pidfile <path>       write process ID to a file after startup
"""


class UsageError(Exception):
    """A getopt-level error: printed as ``PROG: message``, exit status 1."""


@attrs.define
class Parsed:
    options: list[tuple[str, str]] = attrs.Factory(list)  # (long name, argument) in command-line order
    daemonize: bool = False
    help: bool = False
    version: bool = False


def _long(arg: str, rest: list[str]) -> tuple[str, str | None]:
    body = arg[2:]
    name, eq, value = body.partition("=")
    if name not in LONG:
        matches = [n for n in LONG if n.startswith(name)] if name else []
        if len(matches) > 1:
            raise UsageError(f"option '--{name}' is ambiguous; possibilities: "
                             + " ".join(f"'--{m}'" for m in matches))
        if not matches:
            raise UsageError(f"unrecognized option '--{name}'")
        name = matches[0]
    if LONG[name]:
        if eq:
            return name, value
        if not rest:
            raise UsageError(f"option '--{name}' requires an argument")
        return name, rest.pop(0)
    if eq:
        raise UsageError(f"option '--{name}' doesn't allow an argument")
    return name, None


def parse(argv: list[str]) -> Parsed:
    out = Parsed()
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            if rest:
                raise UsageError(f"{rest[0]}: Unexpected argument")
            break
        if arg.startswith("--"):
            name, value = _long(arg, rest)
            pairs = [(name, value)]
        elif arg.startswith("-") and arg != "-":
            pairs = []
            letters = arg[1:]
            while letters:
                letter, letters = letters[0], letters[1:]
                if letter not in SHORT:
                    raise UsageError(f"invalid option -- '{letter}'")
                name, takes = SHORT[letter]
                if takes:
                    if letters:
                        value, letters = letters, ""
                    elif rest:
                        value = rest.pop(0)
                    else:
                        raise UsageError(f"option requires an argument -- '{letter}'")
                    pairs.append((name, value))
                else:
                    pairs.append((name, None))
        else:
            raise UsageError(f"{arg}: Unexpected argument")
        for name, value in pairs:
            if name == "help":
                out.help = True
            elif name == "version":
                out.version = True
            elif name == "daemonize":
                out.daemonize = True
            else:
                out.options.append((name, value or ""))
    return out
