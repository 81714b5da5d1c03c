"""Request rate: ``img bench -c 100000 -d 16 -s 4k`` on a page-cached raw image, blockgraph vs qemu-img.

Both tools report their own "Run completed in N seconds" (start-up excluded,
as qemu-img measures it); the image (1 GiB of random data) is read right
before each run so every request is a page-cache hit. Runs alternate between
the tools. Target: blockgraph's rate at least 25% of qemu-img's.

    .venv/bin/python benchmarks/bench_bench.py [--runs N] [--count N] [--depth N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess

from _common import blockgraph_cmd, machine, need, scratch_dir


def build_image(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path, "wb") as f:
        for _ in range(size // (8 << 20)):
            f.write(os.urandom(8 << 20))


def run_once(cmd: list[str], img: str) -> float:
    with open(img, "rb") as f:
        while f.read(8 << 20):
            pass
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise SystemExit(f"unexpected output from {cmd[0]}: {out!r}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--count", type=int, default=100000)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--size", default="4k")
    args = ap.parse_args()
    qemu_img = need("qemu-img")
    img = str(scratch_dir() / "bench-1g.img")
    build_image(img, 1 << 30)
    opts = ["bench", "-f", "raw", "-c", str(args.count), "-d", str(args.depth), "-s", args.size, img]
    times: dict[str, list[float]] = {"qemu-img": [], "blockgraph": []}
    for _ in range(args.runs):
        times["qemu-img"].append(run_once([qemu_img, *opts], img))
        times["blockgraph"].append(run_once([*blockgraph_cmd(), "img", *opts], img))
    rates = {k: [args.count / t for t in v] for k, v in times.items()}
    q, b = statistics.median(rates["qemu-img"]), statistics.median(rates["blockgraph"])
    print(f"machine: {machine()}")
    print(f"workload: bench -c {args.count} -d {args.depth} -s {args.size}, 1 GiB raw, page cache warm")
    for name in ("qemu-img", "blockgraph"):
        r = rates[name]
        print(f"{name:<11} median {statistics.median(r):,.0f} req/s [min {min(r):,.0f}, max {max(r):,.0f}] "
              f"over {len(r)} runs")
    print(f"ratio blockgraph/qemu-img (median rates): {b / q:.2f} (target >= 0.25)")


if __name__ == "__main__":
    main()
