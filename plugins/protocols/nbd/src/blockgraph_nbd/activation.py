"""systemd socket activation for ``blockgraph nbd``, as qemu-nbd does it (libnbd's captive mode uses it).

``LISTEN_PID`` naming this process and ``LISTEN_FDS`` = N hand over N listening sockets at fds 3, 4, ...
The variables are read with C ``strtoul``'s rules (leading blanks and a sign allowed, nothing after the
digits); a variable that does not parse, or a pid that is not ours, means no activation.
"""

from __future__ import annotations

import fcntl
import os

FIRST_FD = 3
ULONG_MAX = (1 << 64) - 1


def _strtoul(text: str) -> int | None:
    """C ``strtoul(text, &end, 10)`` that must consume everything; None where qemu_strtoul reports an error."""
    s = text.lstrip(" \t\n\v\f\r")
    negative = s[:1] == "-"
    if s[:1] in "+-" and s:
        s = s[1:]
    if not s or not (s.isascii() and s.isdigit()):
        return None
    value = int(s)
    if value > ULONG_MAX:
        return None  # ERANGE
    return (-value) & ULONG_MAX if negative else value


def socket_activation() -> tuple[int, str | None]:
    """How many sockets we were handed (0: none), and the error to stop with, if any.

    As qemu: the variables are removed so that children do not see them, and the handed fds are made
    close-on-exec; one that is not open is an error at once."""
    pid = _strtoul(os.environ.get("LISTEN_PID", "x"))
    if pid != os.getpid():
        return 0, None
    count = _strtoul(os.environ.get("LISTEN_FDS", "x"))
    if count is None:
        return 0, None
    os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_PID", None)
    for fd in range(FIRST_FD, FIRST_FD + count):  # stops at the first closed fd however large count is
        try:
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        except OSError as e:
            return count, f"Socket activation failed: invalid file descriptor fd = {fd}: {os.strerror(e.errno)}"
    return count, None


def conflicting_option(*, device: bool, socket: bool, bind: bool, port: bool, selinux: bool,
                       list_mode: bool) -> str | None:
    """qemu-nbd's refusal of an option that names where to listen when systemd already did."""
    checks = (
        (device, "NBD device can't be set when using socket activation"),
        (socket, "Unix socket can't be set when using socket activation"),
        (bind, "The interface can't be set when using socket activation"),
        (port, "TCP port number can't be set when using socket activation"),
        (selinux, "SELinux label can't be set when using socket activation"),
        (list_mode, "List mode is incompatible with socket activation"),
    )
    return next((text for given, text in checks if given), None)


TOO_MANY = "qemu-nbd does not support socket activation with LISTEN_FDS > 1"
