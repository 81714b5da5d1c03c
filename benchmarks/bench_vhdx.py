"""vhdx -> raw convert of a 1 GiB half-allocated VHDX: blockgraph img convert vs qemu-img convert.

The VHDX (made by qemu-img from a raw image with random data in every other 8 MiB extent) has its payload
blocks allocated only where the data is. Before every run the output is deleted, dirty pages are synced and
the source is read once into the page cache. Prints both times and the ratio.

    .venv/bin/python benchmarks/bench_vhdx.py [--runs N] [--size GiB]

Target (issue 4): blockgraph at most 1.5x qemu-img's wall time, start-up included.
"""

from __future__ import annotations

import argparse
import os
import subprocess

from _common import blockgraph_cmd, machine, need, print_convert_ratio, scratch_dir, time_commands
from bench_convert import build_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=1, help="image size in GiB")
    args = ap.parse_args()
    qemu_img = need("qemu-img")
    work = scratch_dir()
    raw, src, out = str(work / f"half{args.size}.img"), str(work / f"half{args.size}.vhdx"), str(work / "out.raw")
    build_image(raw, args.size << 30)
    if not os.path.exists(src):
        subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "vhdx", raw, src], check=True)
    prepare = f"rm -f {out}; sync; cat {src} > /dev/null"
    commands = {"qemu-img": [qemu_img, "convert", "-f", "vhdx", "-O", "raw", src, out],
                "blockgraph": [*blockgraph_cmd(), "img", "convert", "-f", "vhdx", "-O", "raw", src, out]}
    times = time_commands(commands, prepare, args.runs)
    check = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", raw, out], capture_output=True, text=True)
    print(f"machine: {machine()}")
    print(f"image: {args.size} GiB vhdx, random data in every other 8 MiB extent")
    print_convert_ratio(times)
    print(f"qemu-img compare against the raw source: {check.stdout.strip() or check.stderr.strip()}")
    os.unlink(out)


if __name__ == "__main__":
    main()
