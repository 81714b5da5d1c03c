"""raw -> raw convert of a 2 GiB half-allocated image: blockgraph img convert vs qemu-img convert.

The image holds random data in every other 8 MiB extent and holes between.
Before every run the output is deleted, dirty pages are synced (so no
background writeback of an earlier run lands in the timing) and the source is
read once to be in the page cache. Both tools use their defaults (no flush of
the target). Prints both times, the ratio and blockgraph's peak RSS.

    .venv/bin/python benchmarks/bench_convert.py [--runs N] [--size GiB]

Target: blockgraph at most 1.5x qemu-img's wall time (start-up included),
peak RSS below 150 MiB.
"""

from __future__ import annotations

import argparse
import os
import subprocess

from _common import (
    blockgraph_cmd,
    machine,
    need,
    peak_rss_kib,
    print_convert_ratio,
    scratch_dir,
    time_commands,
)

EXTENT = 8 << 20


def build_image(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off in range(0, size, 2 * EXTENT):
            os.pwrite(fd, os.urandom(min(EXTENT, size - off)), off)
    finally:
        os.close(fd)
    subprocess.run(["sync"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=2, help="image size in GiB")
    args = ap.parse_args()
    qemu_img = need("qemu-img")
    work = scratch_dir()
    src, out = str(work / "half.img"), str(work / "out.img")
    build_image(src, args.size << 30)
    prepare = f"rm -f {out}; sync; cat {src} > /dev/null"
    bg = [*blockgraph_cmd(), "img", "convert", "-f", "raw", "-O", "raw", src, out]
    commands = {"qemu-img": [qemu_img, "convert", "-f", "raw", "-O", "raw", src, out], "blockgraph": bg}
    times = time_commands(commands, prepare, args.runs)
    check = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", src, out], capture_output=True,
                           text=True)
    rss = peak_rss_kib(bg, prepare)
    print(f"machine: {machine()}")
    print(f"image: {args.size} GiB raw, random data in every other 8 MiB extent, holes between")
    print_convert_ratio(times)
    print(f"blockgraph peak RSS: {rss / 1024:.1f} MiB (target < 150 MiB)")
    print(f"qemu-img compare on blockgraph's output: {check.stdout.strip() or check.stderr.strip()}")
    os.unlink(out)


if __name__ == "__main__":
    main()
