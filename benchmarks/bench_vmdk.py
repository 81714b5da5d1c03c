"""vmdk(streamOptimized) -> qcow2 convert of a 1 GiB half-allocated image: blockgraph img convert vs qemu-img convert.

The streamOptimized VMDK (compressed grains, as inside OVA exports) is made by qemu-img from a raw image with data
in every other 8 MiB extent: random bytes by default, or with --compressible text-like data that deflate shrinks
about 3x (decompression then dominates). The target is qcow2 when blockgraph has the qcow2 driver, else raw (said
in the output). Before every run the output is deleted, dirty pages are synced and the source is read once into
the page cache. Prints both times and the ratio.

    .venv/bin/python benchmarks/bench_vmdk.py [--runs N] [--size GiB] [--compressible] [--target raw|qcow2]

Target (issue 4): blockgraph at most 1.5x qemu-img's wall time, start-up included.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess

from _common import blockgraph_cmd, machine, need, print_convert_ratio, scratch_dir, time_commands
from bench_convert import EXTENT, build_image


def build_compressible(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    rnd = random.Random(1)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9))) for _ in range(4096)]
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * EXTENT):
            chunk = bytearray()
            while len(chunk) < EXTENT:
                chunk += b" ".join(rnd.choices(words, k=512)) + b"\n"
            f.seek(off)
            f.write(chunk[:EXTENT])
    subprocess.run(["sync"], check=True)


def has_qcow2() -> bool:
    res = subprocess.run([*blockgraph_cmd(), "plugins"], capture_output=True, text=True)
    return "qcow2" in res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=1, help="image size in GiB")
    ap.add_argument("--compressible", action="store_true", help="text-like data instead of random bytes")
    ap.add_argument("--target", choices=("qcow2", "raw"), default=None)
    args = ap.parse_args()
    qemu_img = need("qemu-img")
    work = scratch_dir()
    kind = "text" if args.compressible else "random"
    raw, src = str(work / f"half{args.size}-{kind}.img"), str(work / f"half{args.size}-{kind}.stream.vmdk")
    (build_compressible if args.compressible else build_image)(raw, args.size << 30)
    if not os.path.exists(src):
        subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, src],
                       check=True)
    target = args.target or ("qcow2" if has_qcow2() else "raw")
    out = str(work / f"out.{target}")
    prepare = f"rm -f {out}; sync; cat {src} > /dev/null"
    commands = {"qemu-img": [qemu_img, "convert", "-f", "vmdk", "-O", target, src, out],
                "blockgraph": [*blockgraph_cmd(), "img", "convert", "-f", "vmdk", "-O", target, src, out]}
    times = time_commands(commands, prepare, args.runs)
    check = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", target, raw, out], capture_output=True,
                           text=True)
    print(f"machine: {machine()}")
    print(f"image: {args.size} GiB streamOptimized vmdk ({os.path.getsize(src) >> 20} MiB), {kind} data in every "
          f"other 8 MiB extent; output {target}"
          + ("" if target == "qcow2" else " (blockgraph-qcow2 is not installed: raw instead)"))
    print_convert_ratio(times)
    print(f"qemu-img compare against the raw source: {check.stdout.strip() or check.stderr.strip()}")
    os.unlink(out)


if __name__ == "__main__":
    main()
