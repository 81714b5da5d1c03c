"""``blockgraph nbd``: qemu-nbd's options, behaviour and messages, served by blockgraph.

One difference on purpose: without ``-b`` the server listens on 127.0.0.1, not on
every interface. Kernel ``/dev/nbdN`` (``-c``/``-d``), ``-L``, TLS and ``--object``
are refused with a message saying so, after qemu-nbd's own checks of them. Under systemd
socket activation (``activation.py``) the server takes fd 3 instead of binding.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
from blockgraph.cli.img_opts import Getopt, ImgExit, strtoul

from . import activation
from . import protocol as P

PROG = "qemu-nbd"

USAGE = f"""Usage: blockgraph nbd [OPTIONS] FILE
blockgraph's NBD server (qemu-nbd compatible)

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default `{P.DEFAULT_PORT}')
  -b, --bind=IFACE          interface to bind to (default `127.0.0.1')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1', 0: no limit)
  -t, --persistent          don't exit on the last connection
  -v, --verbose             display extra debugging information
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description

Exposing part of the image:
  -o, --offset=OFFSET       offset into the image
  -A, --allocation-depth    expose the allocation depth
  -B, --bitmap=NAME         expose a persistent dirty bitmap

General purpose options:
  --fork                    fork off the server process and exit the parent
                            once the server is running
  --pid-file=PATH           store the server's process ID in the given file

Block device options:
  -f, --format=FORMAT       set image format (raw, qcow2, ...)
  -r, --read-only           export read-only
  -s, --snapshot            use FILE as an external snapshot, create a temporary
                            file with backing_file=FILE, redirect the write to
                            the temporary one
  -l, --load-snapshot=SNAPSHOT_PARAM
                            load an internal snapshot inside FILE and export it
                            as an read-only device
  -n, --nocache             disable host cache
      --cache=MODE          set cache mode used to access the disk image, the
                            valid options are: 'none', 'writeback' (default),
                            'writethrough', 'directsync' and 'unsafe'
      --aio=MODE            set AIO mode (native, io_uring or threads)
      --discard=MODE        set discard mode (ignore, unmap)
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)
      --image-opts          treat FILE as a full set of image options
"""

SHORT = "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L"
LONG: dict[str, tuple[bool, str]] = {
    "help": (False, "h"), "version": (False, "V"), "bind": (True, "b"), "port": (True, "p"),
    "socket": (True, "k"), "offset": (True, "o"), "read-only": (False, "r"), "allocation-depth": (False, "A"),
    "bitmap": (True, "B"), "connect": (True, "c"), "disconnect": (False, "d"), "list": (False, "L"),
    "snapshot": (False, "s"), "load-snapshot": (True, "l"), "nocache": (False, "n"), "cache": (True, "cache"),
    "aio": (True, "aio"), "discard": (True, "discard"), "detect-zeroes": (True, "detect-zeroes"),
    "shared": (True, "e"), "format": (True, "f"), "persistent": (False, "t"), "verbose": (False, "v"),
    "object": (True, "object"), "export-name": (True, "x"), "description": (True, "D"),
    "tls-creds": (True, "tls-creds"), "tls-hostname": (True, "tls-hostname"), "tls-authz": (True, "tls-authz"),
    "image-opts": (False, "image-opts"), "trace": (True, "T"), "fork": (False, "fork"),
    "pid-file": (True, "pid-file"), "selinux-label": (True, "selinux-label"),
}
CACHE_MODES = {  # mode -> (writethrough, cache.direct, cache.no-flush), as bdrv_parse_cache_mode
    "none": (False, True, False), "off": (False, True, False), "writeback": (False, False, False),
    "writethrough": (True, False, False), "directsync": (True, True, False), "unsafe": (False, False, True),
}
DISCARD_MODES = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}


class NbdExit(Exception):
    """Print ``qemu-nbd: LINE`` for each line and exit 1 (``bare`` lines go out without the prefix)."""

    def __init__(self, *lines: str, bare: tuple[str, ...] = ()) -> None:
        super().__init__(lines[0] if lines else "")
        self.lines, self.bare = lines, bare


@attrs.define
class Config:
    filename: str = ""
    fmt: str | None = None
    image_opts: bool = False
    export_name: str = ""
    description: str = ""
    port: str | None = None
    bind: str | None = None
    socket: str | None = None
    read_only: bool = False
    persistent: bool = False
    shared: int = 1
    snapshot: bool = False
    load_snapshot: str | None = None
    writethrough: bool = False
    cache_direct: bool = False
    no_flush: bool = False
    aio: str | None = None
    discard: str | None = None
    detect_zeroes: str = "off"
    bitmaps: list[str] = attrs.Factory(list)
    allocation_depth: bool = False
    offset: int = 0
    fork: bool = False
    pid_file: str | None = None
    verbose: bool = False
    activation: int = 0  # sockets handed over by systemd socket activation (LISTEN_FDS), served instead
    device: str | None = None  # -c/-d/-L/--tls-*/--selinux-label: checked after the options, then refused
    disconnect: bool = False
    list_mode: bool = False
    tls_creds: str | None = None
    tls_authz: str | None = None
    tls_hostname: str | None = None
    selinux_label: str | None = None

    def address(self) -> dict[str, str]:
        if self.socket:
            return {"type": "unix", "path": self.socket}
        return {"type": "inet", "host": self.bind or "127.0.0.1", "port": self.port or str(P.DEFAULT_PORT)}


def _once(seen: set[str], key: str, message: str) -> None:
    if key in seen:
        raise NbdExit(message)
    seen.add(key)


def _in_order(opts: Iterable[tuple[str, str | None]]) -> Iterator[tuple[str, str | None]]:
    """The options; a bad one is reported, in qemu-nbd's words, when the loop reaches it (as getopt does)."""
    try:
        yield from opts
    except ImgExit as e:
        raise NbdExit(*e.lines, f"Try `{PROG} --help' for more information.") from None


def parse_args(argv: list[str]) -> Config | int:
    """The Config to serve, or an exit status (``--help``, ``--version``)."""
    opts, rest = Getopt(SHORT, LONG).parse(["nbd", *argv])
    cfg = Config()
    seen: set[str] = set()
    for key, value in _in_order(opts):
        v = value or ""
        if key == "h":
            print(USAGE, end="")
            return 0
        if key == "V":
            from . import __version__
            print(f"blockgraph nbd {__version__} (qemu-nbd compatible)")
            return 0
        if key in ("n", "cache"):
            _once(seen, "cache", "-n and --cache can only be specified once")
            mode = "none" if key == "n" else v
            if mode not in CACHE_MODES:
                raise NbdExit(f"Invalid cache mode `{mode}'")
            cfg.writethrough, cfg.cache_direct, cfg.no_flush = CACHE_MODES[mode]
        elif key == "aio":
            _once(seen, "aio", "--aio can only be specified once")
            if v not in ("threads", "native", "io_uring"):
                raise NbdExit(f"Invalid aio mode '{v}'")
            cfg.aio = v
        elif key == "discard":
            _once(seen, "discard", "--discard can only be specified once")
            if v not in DISCARD_MODES:
                raise NbdExit(f"Invalid discard mode `{v}'")
            cfg.discard = DISCARD_MODES[v]
        elif key == "detect-zeroes":
            if v not in ("off", "on", "unmap"):
                raise NbdExit(f"Failed to parse detect_zeroes mode: invalid parameter value: {v}")
            if v == "unmap" and cfg.discard != "unmap":
                raise NbdExit("setting detect-zeroes to unmap is not allowed without setting discard operation "
                              "to unmap")
            cfg.detect_zeroes = v
        elif key == "o":
            try:
                cfg.offset = strtoul(v)
            except ValueError:
                raise NbdExit(f"Invalid offset '{v}'") from None
        elif key == "e":
            try:
                cfg.shared = strtoul(v)
            except ValueError:
                raise NbdExit(f"Invalid shared device number '{v}'") from None
        elif key == "k":
            if not v.startswith("/"):
                raise NbdExit("socket path must be absolute")
            cfg.socket = v
        elif key in ("x", "D"):
            what = "export name" if key == "x" else "export description"
            if len(v.encode()) > P.MAX_STRING:
                raise NbdExit(f"{what} '{v}' too long")
            seen.add(key)
            if key == "x":
                cfg.export_name = v
            else:
                cfg.description = v
        elif key == "l":
            cfg.load_snapshot, cfg.read_only = v, True
        else:
            _simple(cfg, key, v)
    if cfg.list_mode:
        _list_mode_checks(cfg, rest, seen)
    elif len(rest) != 1:
        raise NbdExit("Invalid number of arguments", bare=(f"Try `{PROG} --help' for more information.",))
    else:
        cfg.filename = rest[0]
    _where_to_listen(cfg)
    _refusals(cfg)
    return cfg


def _list_mode_checks(cfg: Config, rest: list[str], seen: set[str]) -> None:
    if rest:
        raise NbdExit("List mode is incompatible with a file name")
    if seen & {"x", "D", "cache", "aio", "discard"} or cfg.offset or cfg.device or cfg.disconnect or cfg.fmt \
            or cfg.load_snapshot is not None or cfg.bitmaps or cfg.allocation_depth:
        raise NbdExit("List mode is incompatible with per-device settings")
    if cfg.fork:
        raise NbdExit("List mode is incompatible with forking")


def _where_to_listen(cfg: Config) -> None:
    """systemd socket activation (qemu-nbd's check_socket_activation), checked once the options are read."""
    count, error = activation.socket_activation()
    if error:
        raise NbdExit(error)
    if not count:
        return
    conflict = activation.conflicting_option(
        device=cfg.device is not None, socket=cfg.socket is not None, bind=cfg.bind is not None,
        port=cfg.port is not None, selinux=cfg.selinux_label is not None, list_mode=cfg.list_mode)
    if conflict:
        raise NbdExit(conflict)
    if count > 1:
        raise NbdExit(activation.TOO_MANY)
    cfg.activation = count


def _refusals(cfg: Config) -> None:
    """qemu-nbd's TLS and SELinux checks in its order, then what blockgraph nbd does not do."""
    if cfg.tls_creds is not None:
        if cfg.device:
            raise NbdExit("TLS is not supported with a host device")
        if cfg.tls_authz is not None and cfg.list_mode:
            raise NbdExit("TLS authorization is incompatible with export list")
        if cfg.tls_hostname is not None and not cfg.list_mode:
            raise NbdExit("TLS hostname is only supported with export list")
        raise NbdExit(f"Failed to get TLS creds: No TLS credentials with id '{cfg.tls_creds}'")
    if cfg.tls_authz is not None:
        raise NbdExit("--tls-authz is not permitted without --tls-creds")
    if cfg.tls_hostname is not None:
        raise NbdExit("--tls-hostname is not permitted without --tls-creds")
    if cfg.selinux_label is not None:
        raise NbdExit("SELinux support not enabled in this binary")
    if cfg.list_mode:
        raise NbdExit("List mode is not supported by blockgraph nbd (nbdinfo --list lists exports)")
    if cfg.device is not None or cfg.disconnect:
        raise NbdExit("Kernel /dev/nbdN support is not available in blockgraph nbd")


def _simple(cfg: Config, key: str, v: str) -> None:
    refused = {
        "object": "--object is not supported by blockgraph nbd",
        "T": "tracing (-T) is not supported by blockgraph nbd; use --log-level",
    }
    deferred = {"c": "device", "tls-creds": "tls_creds", "tls-authz": "tls_authz", "tls-hostname": "tls_hostname",
                "selinux-label": "selinux_label"}
    if key in refused:
        raise NbdExit(refused[key])
    if key in deferred:
        setattr(cfg, deferred[key], v)
    elif key == "d":
        cfg.disconnect = True
    elif key == "L":
        cfg.list_mode = True
    elif key == "b":
        cfg.bind = v
    elif key == "p":
        cfg.port = v
    elif key == "f":
        cfg.fmt = v
    elif key == "r":
        cfg.read_only = True
    elif key == "s":
        cfg.snapshot = True
    elif key == "t":
        cfg.persistent = True
    elif key == "v":
        cfg.verbose = True
    elif key == "A":
        cfg.allocation_depth = True
    elif key == "B":
        cfg.bitmaps.insert(0, v)
    elif key == "image-opts":
        cfg.image_opts = True
    elif key == "fork":
        cfg.fork = True
    elif key == "pid-file":
        cfg.pid_file = v


def _report(e: NbdExit) -> None:
    for line in e.lines:
        sys.stderr.write(f"{PROG}: {line}\n")
    for line in e.bare:
        sys.stderr.write(f"{line}\n")


def _fork() -> int:
    """qemu-nbd's --fork: the parent relays the child's stderr until the server runs, then exits."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        errors = False
        while chunk := os.read(r, 4096):
            errors = True
            os.write(2, chunk)
        os._exit(1 if errors else 0)
    os.close(r)
    os.setsid()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    os.dup2(w, 2)
    os.close(w)
    return saved


def main(argv: list[str], host: Any) -> int:
    try:
        cfg = parse_args(argv)
    except NbdExit as e:
        _report(e)
        return 1
    if isinstance(cfg, int):
        return cfg
    saved_stderr = _fork() if cfg.fork else None
    from .cli_serve import serve

    try:
        return serve(cfg, host, saved_stderr)
    except NbdExit as e:
        _report(e)
        return 1
