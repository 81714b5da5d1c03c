"""Start-up: ``blockgraph img info`` on a small raw image vs ``qemu-img info``.

The whole process is timed (interpreter start, imports, plugin discovery,
opening the image, printing). Target: blockgraph below 150 ms.

    .venv/bin/python benchmarks/bench_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

from _common import blockgraph_cmd, machine, need, scratch_dir, summary, time_commands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    qemu_img = need("qemu-img")
    img = str(scratch_dir() / "small.img")
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", img, "1M"], check=True)
    commands = {"qemu-img": [qemu_img, "info", img], "blockgraph": [*blockgraph_cmd(), "img", "info", img]}
    times = time_commands(commands, "true", args.runs)
    q, b = statistics.median(times["qemu-img"]), statistics.median(times["blockgraph"])
    print(f"machine: {machine()}")
    print(f"qemu-img info:       {summary(times['qemu-img'])}")
    print(f"blockgraph img info: {summary(times['blockgraph'])}")
    print(f"blockgraph median {b * 1000:.0f} ms (target < 150 ms); qemu-img {q * 1000:.0f} ms")


if __name__ == "__main__":
    main()
