"""qemu-img's command-line conventions: GNU getopt_long parsing, size syntax, error exits.

Options may follow file names (GNU permutation), ``--`` ends options, long
options take ``--name=value`` or ``--name value`` and unique prefixes, and the
error texts and exit status are qemu-img's (``unrecognized option '-Z'``,
``missing argument for option '-f'``, then ``Try 'qemu-img --help' ...``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import attrs

PROG = "qemu-img"
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1
SIZE_SUFFIX_HINT = ("Invalid {0} specified. You may use k, M, G, T, P or E suffixes for",
                    "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")


class ImgExit(Exception):
    """Stop the command: print ``qemu-img: LINE`` for each line (if any) and exit with ``code``.

    ``usage`` adds qemu-img's ``Try 'qemu-img --help' for more information`` line.
    """

    def __init__(self, lines: str | Sequence[str] = (), code: int = 1, usage: bool = False) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        self.code, self.usage = code, usage
        super().__init__("\n".join(self.lines))

    @classmethod
    def no_object(cls, code: int = 1) -> ImgExit:
        """``--object``: secrets, TLS credentials and throttle groups have no plugin yet."""
        return cls("--object is not supported by blockgraph img", code)


# getopt_long entries of the shared switches; a subcommand lists those qemu-img gives it (see shared_long).
SHARED_LONG: dict[str, tuple[bool, str]] = {
    "object": (True, "object"), "image-opts": (False, "image-opts"), "force-share": (False, "U"),
}


def shared_long(*names: str) -> dict[str, tuple[bool, str]]:
    """The getopt_long entries of the shared switches ``names``; ``|`` the subcommand's own onto them."""
    return {name: SHARED_LONG[name] for name in names}


@attrs.define
class CommonFlags:
    """The switches most qemu-img subcommands share: ``-q``, ``-U``, ``--image-opts``, ``--object``.

    A subcommand gets only those its getopt tables list (info has no ``-q``, amend no ``-U``);
    ``object_code`` is the exit status for ``--object`` (compare exits 2 on every error).
    """

    quiet: bool = False
    force_share: bool = False
    image_opts: bool = False
    object_code: int = 1

    def take(self, key: str, value: str | None) -> bool:
        """Handle one parsed option if it is a shared switch; False leaves it to the subcommand."""
        if key == "q":
            self.quiet = True
        elif key == "U":
            self.force_share = True
        elif key == "image-opts":
            self.image_opts = True
        elif key == "object":
            raise ImgExit.no_object(self.object_code)
        else:
            return False
        return True

    def own(self, opts: Iterable[tuple[str, str | None]]) -> Iterator[tuple[str, str | None]]:
        """The subcommand's own options, in order; shared ones are taken as they come, so that the
        first bad option on the command line is the one reported, as in qemu-img's option loop."""
        for key, value in opts:
            if not self.take(key, value):
                yield key, value


def usage_error(msg: str) -> ImgExit:
    return ImgExit(msg, 1, usage=True)


class ParsedOptions(list):
    """``(key, value)`` pairs in command-line order. A bad option met while parsing is raised when iteration
    reaches it: qemu-img checks each option's value inside its getopt loop, so an error about an earlier
    option's value comes before "unrecognized option" for a later one."""

    error: ImgExit | None = None

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        yield from super().__iter__()
        if self.error is not None:
            raise self.error


class Getopt:
    """GNU ``getopt_long`` with permutation.

    ``short`` is a getopt string (``"f:hU"``); ``long`` maps a long name to
    ``(takes_argument, key)``, ``key`` being what :meth:`parse` reports
    (a short letter or the long name).
    """

    def __init__(self, short: str, long: dict[str, tuple[bool, str]] | None = None) -> None:
        self.short: dict[str, bool] = {}
        i = 0
        while i < len(short):
            ch = short[i]
            takes = i + 1 < len(short) and short[i + 1] == ":"
            self.short[ch] = takes
            i += 2 if takes else 1
        self.long = dict(long or {})
        self.long.setdefault("help", (False, "h"))

    def parse(self, argv: Sequence[str]) -> tuple[ParsedOptions, list[str]]:
        """``argv[0]`` is the subcommand name; returns ``([(key, value)], positional)``. A bad option ends
        the parse; iterating the options raises it after the good ones before it."""
        opts = ParsedOptions()
        rest: list[str] = []
        i = 1
        try:
            while i < len(argv):
                arg = argv[i]
                if arg == "--":
                    rest.extend(argv[i + 1:])
                    break
                if arg.startswith("--"):
                    i = self._long(argv, i, opts)
                elif arg.startswith("-") and len(arg) > 1:
                    i = self._short(argv, i, opts)
                else:
                    rest.append(arg)
                    i += 1
        except ImgExit as e:
            opts.error = e
        return opts, rest

    def _long(self, argv: Sequence[str], i: int, opts: list[tuple[str, str | None]]) -> int:
        arg = argv[i]
        name, eq, value = arg[2:].partition("=")
        if name in self.long:
            match = name
        else:
            cands = [n for n in self.long if n.startswith(name)]
            if len(cands) != 1 or not name:
                raise usage_error(f"unrecognized option '{arg}'")
            match = cands[0]
        takes, key = self.long[match]
        if takes:
            if not eq:
                if i + 1 >= len(argv):
                    raise usage_error(f"missing argument for option '{arg}'")
                value = argv[i + 1]
                i += 1
            opts.append((key, value))
        else:
            if eq:
                raise usage_error(f"unrecognized option '{arg}'")
            opts.append((key, None))
        return i + 1

    def _short(self, argv: Sequence[str], i: int, opts: list[tuple[str, str | None]]) -> int:
        arg = argv[i]
        j = 1
        while j < len(arg):
            ch = arg[j]
            last = j == len(arg) - 1
            if ch not in self.short:
                # getopt reports argv[optind - 1]: optind moves on only after an element's last letter.
                raise usage_error(f"unrecognized option '{arg if last else argv[i - 1]}'")
            if self.short[ch]:
                if not last:
                    opts.append((ch, arg[j + 1:]))
                elif i + 1 < len(argv):
                    opts.append((ch, argv[i + 1]))
                    i += 1
                else:
                    raise usage_error(f"missing argument for option '-{ch}'")
                return i + 1
            opts.append((ch, None))
            j += 1
        return i + 1


# ---------------------------------------------------------------- sizes

_SUFFIX = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_STRTOSZ = re.compile(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zA-Z]?)$")


def strtosz(text: str, default_suffix: str = "b") -> int:
    """QEMU's ``qemu_strtosz``: decimal or hex, an optional fraction with a unit, binary suffixes.

    Raises ValueError for a malformed value and OverflowError above 2^64.
    """
    m = _STRTOSZ.match(text)
    if not m:
        raise ValueError(text)
    num, suffix = m.group(1), m.group(2).lower()
    if suffix not in _SUFFIX:
        raise ValueError(text)
    shift = _SUFFIX[suffix or default_suffix]
    if num[:2].lower() == "0x":
        value = int(num, 16) << shift
    elif "." in num:
        if not shift:
            raise ValueError(text)  # a fraction needs a unit
        whole, _, frac = num.partition(".")
        value = (int(whole or "0") << shift) + int(float("0." + (frac or "0")) * (1 << shift))
    else:
        value = int(num) << shift
    if value >= 1 << 64:
        raise OverflowError(text)
    return value


def cvtnum(name: str, value: str, lo: int = 0, hi: int = INT64_MAX) -> int:
    """qemu-img's ``cvtnum_full``: a size within ``[lo, hi]`` or an ImgExit with its two messages."""
    try:
        n = strtosz(value)
    except OverflowError:
        n = None
    except ValueError:
        raise ImgExit([SIZE_SUFFIX_HINT[0].format(name), SIZE_SUFFIX_HINT[1]]) from None
    if n is None or n < lo or n > hi:
        raise ImgExit(f"Invalid {name} specified. Must be between {lo} and {hi}.")
    return n


def strtoul(text: str) -> int:
    """``qemu_strtoul(text, NULL, 0, ...)``: decimal, ``0x`` hex or ``0`` octal, the whole string."""
    m = re.fullmatch(r"\s*\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        raise ValueError(text)
    return int(m.group(1), 0) if not re.fullmatch(r"0[0-7]+", m.group(1)) else int(m.group(1), 8)


def one_of_output(value: str | None) -> str:
    """``--output``: human (default) or json."""
    if value is None or value == "human":
        return "human"
    if value == "json":
        return "json"
    raise ImgExit("--output must be used with human or json as argument.")


def is_valid_option_list(text: str) -> bool:
    """Whether ``-o`` lists can be joined with ``,`` (no leading comma, no odd trailing commas)."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def accumulate(options: str | None, text: str) -> str:
    if not is_valid_option_list(text):
        raise ImgExit(f"Invalid option list: {text}")
    return text if options is None else f"{options},{text}"


def has_help_option(options: str | None) -> bool:
    if not options:
        return False
    from ..options import split_keyval

    return any(p in ("help", "?") for p in split_keyval(options))


def expect(rest: list[str], count: int, msg: str) -> None:
    if len(rest) != count:
        raise usage_error(msg)

