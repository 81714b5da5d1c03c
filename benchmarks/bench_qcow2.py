"""qcow2 against qemu-img: convert qcow2->raw, raw->qcow2, raw->qcow2 -c of a half-allocated image, and
``img bench`` 4 KiB random reads at depth 16 on a fully allocated qcow2.

The raw source holds random data (or, for -c, text-like data) in every other 8 MiB extent and holes between;
the qcow2 source is qemu-img's conversion of it. Before every run the output is deleted, dirty pages are synced
and the source is read once into the page cache. Prints both times and the ratios.

    .venv/bin/python benchmarks/bench_qcow2.py [--runs N] [--size GiB] [--csize MiB] [--bench-count N]

Targets (issue 3): converts at most 1.5x qemu-img's wall time (start-up included); bench at least 25% of
qemu-img bench's requests per second.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess

from _common import blockgraph_cmd, machine, need, print_convert_ratio, scratch_dir, time_commands
from bench_convert import build_image
from bench_vmdk import build_compressible


def convert_case(name: str, qemu_img: str, src: str, out: str, src_fmt: str, out_fmt: str, runs: int,
                 extra: list[str]) -> tuple[float, float]:
    prepare = f"rm -f {out}; sync; cat {src} > /dev/null"
    commands = {"qemu-img": [qemu_img, "convert", *extra, "-f", src_fmt, "-O", out_fmt, src, out],
                "blockgraph": [*blockgraph_cmd(), "img", "convert", *extra, "-f", src_fmt, "-O", out_fmt, src, out]}
    times = time_commands(commands, prepare, runs)
    check = subprocess.run([qemu_img, "compare", "-f", src_fmt, "-F", out_fmt, src, out], capture_output=True,
                           text=True)
    print(f"{name}:")
    q, b = print_convert_ratio(times, "  ")
    print(f"  qemu-img compare: {check.stdout.strip() or check.stderr.strip()}")
    os.unlink(out)
    return q, b


def bench_rate(cmd: list[str]) -> float:
    """Requests per second from a ``bench`` run's 'Run completed in N seconds.' line."""
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", res.stdout)
    if m is None:
        raise SystemExit(f"unexpected bench output: {res.stdout!r} {res.stderr!r}")
    count = int(cmd[cmd.index("-c") + 1])
    return count / float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=2, help="image size in GiB for the plain converts")
    ap.add_argument("--csize", type=int, default=512, help="image size in MiB for the -c convert")
    ap.add_argument("--bench-count", type=int, default=20000)
    args = ap.parse_args()
    qemu_img = need("qemu-img")
    work = scratch_dir()
    raw, qcow = str(work / "half.img"), str(work / f"half{args.size}.qcow2")
    build_image(raw, args.size << 30)
    if not os.path.exists(qcow):
        subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
    print(f"machine: {machine()}")
    print(f"image: {args.size} GiB, random data in every other 8 MiB extent, holes between")
    convert_case("qcow2 -> raw", qemu_img, qcow, str(work / "out.raw"), "qcow2", "raw", args.runs, [])
    convert_case("raw -> qcow2", qemu_img, raw, str(work / "out.qcow2"), "raw", "qcow2", args.runs, [])
    text = str(work / f"half{args.csize}m-text.img")
    build_compressible(text, args.csize << 20)
    convert_case(f"raw -> qcow2 -c ({args.csize} MiB, text-like data)", qemu_img, text, str(work / "out.qcow2"),
                 "raw", "qcow2", args.runs, ["-c"])
    full = str(work / "full1g.qcow2")
    if not os.path.exists(full):
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "preallocation=full", full, "1G"], check=True)
    common = ["-c", str(args.bench_count), "-d", "16", "-s", "4k", "-S", "7919k", "-f", "qcow2"]
    for cache in (["-t", "none"], []):
        q = statistics.median(bench_rate([qemu_img, "bench", *common, *cache, full]) for _ in range(args.runs))
        b = statistics.median(bench_rate([*blockgraph_cmd(), "img", "bench", *common, *cache, full])
                              for _ in range(args.runs))
        label = "O_DIRECT" if cache else "page cache"
        print(f"bench 4 KiB reads, depth 16, scattered (step 7919k), {label}: qemu-img {q:,.0f} req/s, "
              f"blockgraph {b:,.0f} req/s, ratio {b / q:.2f} (target >= 0.25)")


if __name__ == "__main__":
    main()
