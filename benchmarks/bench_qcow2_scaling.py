"""qcow2 per-request cost against image size and backing-chain length, and peak memory against cache options.

Images: 256 MiB of random data in 4096 clusters of 64 KiB, spread evenly (one cluster every ``size/4096``
bytes) over a 1 GiB and a 64 GiB virtual size (qemu-img's conversion of a sparse raw file). Chains: the
1 GiB image under 3 and 15 empty overlays (``qemu-img create -f qcow2 -b ... -F qcow2``), i.e. lengths
1, 4 and 16 with every byte read from the base.

* ``img bench -c N -d 16 -s 4k -S stride``: the walk visits every allocated cluster in turn (and so every
  L2 table); requests per second for blockgraph and, as a reference, qemu-img (``-S`` walks, it does
  not pick random offsets);
* the Python API (``blockgraph.open``): ``--reads`` random 4 KiB reads inside the allocated clusters,
  CPU microseconds per read;
* peak RSS (``/usr/bin/time -v``) of ``img bench`` and of ``img convert -O raw`` at the default cache options
  and with ``l2-cache-size=1M`` and ``64M`` (``--image-opts``), on both image sizes.

    .venv/bin/python benchmarks/bench_qcow2_scaling.py [--runs N] [--count N] [--reads N]

Targets (issue 3): per-request cost does not grow with image size nor, beyond one lookup per layer, with
chain length; memory bounded by the cache options, independent of image size.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import time
from pathlib import Path

from _common import blockgraph_cmd, machine, need, peak_rss_kib, scratch_dir

MiB, GiB = 1 << 20, 1 << 30
CLUSTER = 65536
NCLUSTERS = 4096  # 256 MiB of data in every image


def spread_image(d: Path, vsize: int) -> Path:
    """A qcow2 of ``vsize`` with NCLUSTERS random clusters at a fixed stride (reused when present)."""
    name = f"spread-{vsize // GiB}g"
    qcow2 = d / f"{name}.qcow2"
    if qcow2.exists():
        return qcow2
    raw = d / f"{name}.raw"
    stride = vsize // NCLUSTERS
    with open(raw, "wb") as f:
        f.truncate(vsize)
        for i in range(NCLUSTERS):
            os.pwrite(f.fileno(), os.urandom(CLUSTER), i * stride)
    subprocess.run([need("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    return qcow2


def chain(base: Path, length: int) -> Path:
    """The top of a chain of ``length`` images: ``base`` under ``length - 1`` empty overlays."""
    top = base
    for i in range(1, length):
        ov = base.with_name(f"{base.stem}-ov{i}.qcow2")
        if not ov.exists():
            subprocess.run([need("qemu-img"), "create", "-q", "-f", "qcow2", "-b", top.name, "-F", "qcow2",
                            str(ov)], check=True)
        top = ov
    return top


def bench_rate(cmd: list[str]) -> float:
    """Requests per second from a ``bench`` run's 'Run completed in N seconds.' line."""
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", res.stdout)
    if m is None:
        raise SystemExit(f"unexpected bench output: {res.stdout!r} {res.stderr!r}")
    return int(cmd[cmd.index("-c") + 1]) / float(m.group(1))


def bench_args(img: Path, vsize: int, count: int) -> list[str]:
    return ["bench", "-c", str(count), "-d", "16", "-s", "4k", "-S", str(vsize // NCLUSTERS), "-f", "qcow2",
            str(img)]


def api_us_per_read(img: Path, vsize: int, reads: int, seed: int) -> float:
    """CPU microseconds per 4 KiB read at random offsets inside the allocated clusters.

    CPU time of this process (cached data: no read waits), so other load on the machine does not count.
    """
    import blockgraph

    rng = random.Random(seed)
    stride = vsize // NCLUSTERS
    offsets = [rng.randrange(NCLUSTERS) * stride + rng.randrange(CLUSTER // 4096) * 4096 for _ in range(reads)]
    with blockgraph.open(str(img), "qcow2", read_only=True) as d:
        buf = bytearray(4096)
        for off in offsets[:NCLUSTERS]:  # warm: the first touch of each L2 table is a cache miss
            d.readinto(off, buf)
        assert any(buf), "a read inside an allocated cluster returned zeros"
        t = time.process_time()
        for off in offsets:
            d.readinto(off, buf)
        return (time.process_time() - t) / reads * 1e6


def image_opts(img: Path, extra: str) -> str:
    return f"driver=qcow2,file.driver=file,file.filename={img}" + (f",{extra}" if extra else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per bench case (median reported)")
    ap.add_argument("--count", type=int, default=100000, help="requests per img bench run")
    ap.add_argument("--reads", type=int, default=20000, help="random reads per API case")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(machine())
    qemu_img, bg = need("qemu-img"), blockgraph_cmd()
    d = scratch_dir() / "scaling"
    d.mkdir(exist_ok=True)
    small, large = spread_image(d, GiB), spread_image(d, 64 * GiB)
    cases = [("1 GiB", small, GiB), ("64 GiB", large, 64 * GiB), ("chain 4", chain(small, 4), GiB),
             ("chain 16", chain(small, 16), GiB)]
    for path in (small, large):
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the page cache

    print(f"\n4 KiB reads, {NCLUSTERS} clusters of 64 KiB allocated; img bench -c {args.count} -d 16 -S size/4096 "
          f"(median of {args.runs}); API: {args.reads} random reads")
    print(f"  {'case':10s} {'blockgraph req/s':>17s} {'qemu-img req/s':>15s} {'bg/qemu':>8s} {'API CPU us/read':>16s}")
    rates: dict[str, tuple[float, float, float]] = {}
    for name, img, vsize in cases:
        b, q = [], []
        for _ in range(args.runs):
            q.append(bench_rate([qemu_img, *bench_args(img, vsize, args.count)]))
            b.append(bench_rate([*bg, "img", *bench_args(img, vsize, args.count)]))
        api = statistics.median(api_us_per_read(img, vsize, args.reads, args.seed + i) for i in range(args.runs))
        rates[name] = (statistics.median(b), statistics.median(q), api)
        print(f"  {name:10s} {rates[name][0]:17,.0f} {rates[name][1]:15,.0f} {rates[name][0] / rates[name][1]:8.2f} "
              f"{api:16.1f}")

    base_b, base_q, base_api = rates["1 GiB"]
    print("\nratios to the 1 GiB image (1.00 = no growth; bench: rate ratio, API: time ratio):")
    for name in ("64 GiB", "chain 4", "chain 16"):
        b, q, api = rates[name]
        print(f"  {name:10s} blockgraph bench {b / base_b:5.2f}  qemu-img bench {q / base_q:5.2f}  "
              f"API time per read {api / base_api:5.2f}")
    per_layer = (rates["chain 16"][2] - base_api) / 15
    print(f"  API cost per extra layer: {per_layer:.1f} us ((chain 16 - chain 1) / 15)")

    print("\npeak RSS (MiB), /usr/bin/time -v:")
    out = d / "out.raw"
    prepare = f"rm -f {out}"
    print(f"  {'command':44s} {'1 GiB':>8s} {'64 GiB':>8s}")
    for label, extra in (("default", ""), ("l2-cache-size=1M", "l2-cache-size=1M"),
                         ("l2-cache-size=64M", "l2-cache-size=64M")):
        row = []
        for img, vsize in ((small, GiB), (large, 64 * GiB)):
            stride = str(vsize // NCLUSTERS)
            row.append(peak_rss_kib([*bg, "img", "bench", "-c", "50000", "-d", "16", "-s", "4k", "-S", stride,
                                     "--image-opts", image_opts(img, extra)], prepare))
        print(f"  {'blockgraph img bench, ' + label:44s} {row[0] / 1024:8.1f} {row[1] / 1024:8.1f}")
    for label, extra in (("default", ""), ("l2-cache-size=1M", "l2-cache-size=1M"),
                         ("l2-cache-size=64M", "l2-cache-size=64M")):
        row = []
        for img in (small, large):
            row.append(peak_rss_kib([*bg, "img", "convert", "--image-opts", image_opts(img, extra), "-O", "raw",
                                     str(out)], prepare))
        print(f"  {'blockgraph img convert -O raw, ' + label:44s} {row[0] / 1024:8.1f} {row[1] / 1024:8.1f}")
    row = [peak_rss_kib([qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(img), str(out)], prepare)
           for img in (small, large)]
    print(f"  {'qemu-img convert -O raw, default':44s} {row[0] / 1024:8.1f} {row[1] / 1024:8.1f}")
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
