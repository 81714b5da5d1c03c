"""QEMU's older option parser (QemuOpts), which ``-drive`` and ``-device`` still use.

It differs from keyval (``-blockdev``): any key is accepted here and checked
later by whoever consumes it, a bare ``name`` is a deprecated short form of
``name=on`` (``noname`` of ``name=off``), ``id`` is special, and a later
duplicate key wins. ``,,`` is a literal comma in both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import OptionError
from ..options import parse_bool, split_keyval

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."


def parse_opts(text: str, *, implied_key: str | None = None,
               warn: Callable[[str], None] | None = None) -> tuple[str | None, dict[str, str]]:
    """Split one ``-drive``/``-device`` argument into its ``id`` and the other options, in order."""
    opts: dict[str, str] = {}
    ident: str | None = None
    parts = split_keyval(text) if text else []
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if i == 0 and implied_key:
                key, value = implied_key, part
            else:
                # QEMU still accepts the short boolean form, with a warning.
                value = "on"
                if key.startswith("no"):
                    key, value = key[2:], "off"
                if warn is not None:
                    warn(f"warning: short-form boolean option '{part}' deprecated\n"
                         f"Please use {key}={value} instead")
        if key == "id":
            if not _ID.match(value):
                raise OptionError(f"Parameter 'id' expects an identifier\n{ID_HINT}")
            ident = value
            continue
        opts.pop(key, None)  # a later duplicate wins, and takes the later position
        opts[key] = value
    return ident, opts


def get_number(opts: dict[str, Any], key: str, default: int) -> int:
    """A QEMU_OPT_NUMBER value (C ``strtoull`` with base 0), removed from ``opts``."""
    if key not in opts:
        return default
    value = opts.pop(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        if text.lower().startswith(("0x", "-0x")):
            return int(text, 16)
        if len(text.lstrip("-")) > 1 and text.lstrip("-").startswith("0"):
            return int(text, 8)
        return int(text, 10)
    except ValueError:
        raise OptionError(f"Parameter '{key}' expects a number") from None


def get_bool(opts: dict[str, Any], key: str, default: bool) -> bool:
    """A QEMU_OPT_BOOL value, removed from ``opts``."""
    if key not in opts:
        return default
    try:
        return parse_bool(opts.pop(key))
    except ValueError:
        raise OptionError(f"Parameter '{key}' expects 'on' or 'off'") from None


def id_wellformed(name: str) -> bool:
    return bool(_ID.match(name))
