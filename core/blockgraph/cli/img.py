"""``blockgraph img SUBCOMMAND ...``: qemu-img's subcommands, options and output.

Each subcommand lives in its own module (``img_<name>.py``) with
``main(argv, host) -> int``, ``argv[0]`` being the subcommand name; modules are
imported only when their subcommand runs, so start-up stays small.
"""

from __future__ import annotations

import importlib
import sys

from ..plugins import PluginHost
from .img_opts import PROG

COMMANDS: dict[str, tuple[str, str]] = {
    "amend": ("img_amend", "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] "
                           "-o options filename"),
    "bench": ("img_bench", "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] "
                           "[-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] "
                           "[-S step_size] [-t cache] [-w] [-U] filename"),
    "bitmap": ("img_bitmap", "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... "
                             "[-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] "
                             "[--image-opts | -f fmt] filename bitmap"),
    "check": ("img_check", "check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] "
                           "[-r [leaks | all]] [-T src_cache] [-U] filename"),
    "commit": ("img_commit", "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] "
                             "[-r rate_limit] [-d] [-p] filename"),
    "compare": ("img_compare", "compare [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] "
                               "filename1 filename2"),
    "convert": ("img_convert", "convert [--image-opts] [--target-image-opts] [--target-is-zero] [-U] [-C] [-p] "
                               "[-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-o options] "
                               "[-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] "
                               "filename [filename2 [...]] output_filename"),
    "create": ("img_create", "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] "
                             "filename [size]"),
    "dd": ("img_dd", "dd [--image-opts] [-U] [-p] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] "
                     "[skip=blocks] if=input of=output"),
    "info": ("img_info", "info [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename"),
    "map": ("img_map", "map [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] "
                       "[--output=ofmt] [-U] filename"),
    "measure": ("img_measure", "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | "
                               "[--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]"),
    "rebase": ("img_rebase", "rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] "
                             "[-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename"),
    "resize": ("img_resize", "resize [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] "
                             "filename [+ | -]size"),
    "snapshot": ("img_snapshot", "snapshot [--object objectdef] [--image-opts] [-U] [-q] "
                                 "[-l | -a snapshot | -c snapshot | -d snapshot] filename"),
}


def usage(host: PluginHost) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("blockgraph")
    except PackageNotFoundError:
        ver = "?"
    lines = [f"blockgraph img {ver} (qemu-img compatible)",
             "usage: blockgraph img command [command options]", "", "Command syntax:"]
    lines += [f"  {syntax}" for _, syntax in COMMANDS.values()]
    lines += ["", "'cache' is one of none, writeback (default, except for convert), writethrough, directsync",
              "and unsafe (default for convert); sizes take k, M, G, T, P or E suffixes (powers of 1024).",
              "", "Supported formats: " + " ".join(host.formats())]
    return "\n".join(lines)


def main(argv: list[str], host: PluginHost) -> int:
    if not argv:
        sys.stderr.write(f"{PROG}: Not enough arguments\nTry '{PROG} --help' for more information\n")
        return 1
    cmd = argv[0]
    if cmd in ("-h", "--help", "help"):
        print(usage(host))
        return 0
    if cmd in ("-V", "--version"):
        print(usage(host).splitlines()[0])
        return 0
    entry = COMMANDS.get(cmd)
    if entry is None:
        sys.stderr.write(f"{PROG}: Command not found: {cmd}\nTry '{PROG} --help' for more information\n")
        return 1
    if any(a == "-h" or (len(a) > 2 and "--help".startswith(a)) for a in argv[1:]):  # getopt takes --he too
        print(usage(host))
        return 0
    module = importlib.import_module(f"{__package__}.{entry[0]}")
    return int(module.main(argv, host))
