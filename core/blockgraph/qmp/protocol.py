"""The QMP wire format: greeting, request framing and checks, replies, events, error classes.

Texts are QEMU's (monitor/qmp.c, qapi/qmp-dispatch.c, qobject-input-visitor.c) so that
clients and scripts that match on them keep working.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

# QEMU's QMP whose commands and replies this monitor follows; ``package`` names blockgraph.
QEMU_VERSION = {"micro": 0, "minor": 2, "major": 7}
MAX_MESSAGE = 16 << 20  # bytes of one JSON request (QEMU: 64 MiB of tokens)
MAX_NESTING = 1024  # QEMU's MAX_NESTING in json-streamer.c
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class QMPError(Exception):
    """An error reply: ``{"error": {"class": cls, "desc": desc}}``. Plugins raise it from commands."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.cls = desc, cls

    def reply(self) -> dict[str, Any]:
        return {"error": {"class": self.cls, "desc": self.desc}}


class CommandNotFound(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, "CommandNotFound")


class DeviceNotFound(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, "DeviceNotFound")


def from_exception(e: BaseException) -> QMPError:
    """The error reply for an exception a command raised, with QEMU's texts where they differ."""
    from ..errors import BlockGraphError, DriverNotFound, OptionError

    if isinstance(e, QMPError):
        return e
    if isinstance(e, DriverNotFound) and e.dist is None:
        return QMPError(f"Parameter 'driver' does not accept value '{e.driver}'")
    if isinstance(e, OptionError):
        m = (re.fullmatch(r"Invalid parameter '([^']*)'", e.reason)
             or re.fullmatch(r"Block (?:format|protocol) '[^']*' does(?:n't| not) support the option '([^']*)'",
                             e.reason))
        if m:  # QAPI refuses an unknown member before any driver sees it
            return QMPError(f"Parameter '{m.group(1)}' is unexpected")
        m = re.fullmatch(r"Parameter '([^']*)' is required", e.reason)
        if m:
            return QMPError(f"Parameter '{m.group(1)}' is missing")
        if e.reason.startswith(("Parameter ", "Invalid parameter type")) or (e.option and e.option in e.reason):
            return QMPError(e.reason)  # already names what was wrong, as QEMU's text does
    if isinstance(e, BlockGraphError):
        return QMPError(str(e))
    return QMPError(f"{type(e).__name__}: {e}")


def package() -> str:
    from .. import __version__

    return f"blockgraph {__version__}"


def version() -> dict[str, Any]:
    """query-version's VersionInfo."""
    return {"qemu": dict(QEMU_VERSION), "package": package()}


def greeting() -> dict[str, Any]:
    # No "oob": no block command may run out of band in QEMU either, so there is nothing to offer.
    return {"QMP": {"version": version(), "capabilities": []}}


def timestamp() -> dict[str, int]:
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}


def event(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"timestamp": timestamp(), "event": name}
    if data is not None:
        msg["data"] = data
    return msg


def encode(msg: dict[str, Any], pretty: bool = False) -> bytes:
    """One reply line, keys in QEMU's QDict order, so replies are byte-identical to QEMU's."""
    from ..cli.img_qjson import dumps

    return (dumps(msg, pretty=pretty) + "\r\n").encode()


# ---------------------------------------------------------------- framing


class Splitter:
    """Cut a byte stream into JSON texts the way QEMU's json-streamer does: a message ends when its
    braces and brackets balance (strings and escapes honoured), or, for a bare scalar, at whitespace."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_str = self._esc = False
        self._scan = 0

    def feed(self, data: bytes) -> Iterator[bytes | QMPError]:
        self._buf += data
        buf = self._buf
        i = self._scan
        start = 0
        while i < len(buf):
            c = buf[i]
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == 0x5C:  # backslash
                    self._esc = True
                elif c == 0x22:
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    yield QMPError("JSON parse error, nesting too deep")
                    start, i = self._reset(i + 1)
                    continue
            elif c in b"}]":
                self._depth -= 1
                if self._depth <= 0:
                    text = bytes(buf[start:i + 1])
                    self._depth = 0
                    start = i + 1
                    if text.strip():
                        yield text
            elif self._depth == 0 and c in b" \t\r\n":
                text = bytes(buf[start:i])
                start = i + 1
                if text.strip():
                    yield text
            i += 1
            if i - start > MAX_MESSAGE:
                yield QMPError("JSON parse error, message too large")
                start, i = self._reset(i)
        del buf[:start]
        self._scan = len(buf)

    def _reset(self, i: int) -> tuple[int, int]:
        self._depth = 0
        self._in_str = self._esc = False
        return i, i


def parse(text: bytes) -> dict[str, Any]:
    """A request object from one JSON text, or QMPError with QEMU's text."""
    try:
        msg = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        if isinstance(e, json.JSONDecodeError) and reason == "Expecting value":
            word = _WORD.match(e.doc, e.pos)
            if word:  # QEMU's lexer reads a bare word as a keyword it does not know
                raise QMPError(f"JSON parse error, invalid keyword '{word.group()}'") from None
        raise QMPError(f"JSON parse error, {reason[:1].lower()}{reason[1:]}") from None
    if not isinstance(msg, dict):
        raise QMPError("QMP input must be a JSON object")
    return msg


def check_request(msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(command, arguments) of a request object (qmp_dispatch's checks, in its order)."""
    for key, value in msg.items():
        if key in ("execute", "exec-oob"):
            if not isinstance(value, str):
                raise QMPError(f"QMP input member '{key}' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "exec-oob" in msg:
        raise QMPError("QMP input member 'exec-oob' is unexpected")  # oob was not negotiated
    if "execute" not in msg:
        raise QMPError("QMP input lacks member 'execute'")
    return msg["execute"], msg.get("arguments", {})


# ---------------------------------------------------------------- argument checks

_TYPES: dict[str, tuple[str, Any]] = {
    "str": ("string", lambda v: isinstance(v, str)),
    "int": ("integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "bool": ("boolean", lambda v: isinstance(v, bool)),
    "number": ("number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "dict": ("object", lambda v: isinstance(v, dict)),
    "list": ("array", lambda v: isinstance(v, list)),
    "any": ("any", lambda v: True),
}


def check_args(args: dict[str, Any], spec: dict[str, str]) -> dict[str, Any]:
    """Refuse missing, unexpected and ill-typed members (QAPI's input visitor texts)."""
    members = {k.lstrip("*"): (k.startswith("*"), t) for k, t in spec.items()}
    for key, value in args.items():
        if key not in members:
            raise QMPError(f"Parameter '{key}' is unexpected")
        _, typ = members[key]
        expected, ok = _TYPES[typ]
        if not ok(value):
            raise QMPError(f"Invalid parameter type for '{key}', expected: {expected}")
    for key, (optional, _) in members.items():
        if not optional and key not in args:
            raise QMPError(f"Parameter '{key}' is missing")
    return args
