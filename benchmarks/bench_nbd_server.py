"""NBD server throughput: ``blockgraph nbd`` vs ``qemu-nbd`` serving the same file, real clients on both.

* sequential read: ``nbdcopy nbd+unix://... null:`` (read-only export, ``-e 0`` so nbdcopy opens its
  four multi-conn connections on both servers);
* sequential write: ``nbdcopy image.raw nbd+unix://...`` into a writable export of an empty file;
* 4 KiB random reads at depth 16: fio's ``nbd`` engine (libnbd), or ``qemu-img bench`` without fio
  (sequential 4 KiB reads at depth 16, the closest it has).

Servers run on unix sockets with ``-t``; the image is page-cached before every run. Whole commands are
timed, so nbdcopy's own start-up is in both figures, and runs alternate between the two servers so that
the load of a shared machine falls on both alike (hyperfine would run one command's runs together). Targets (issue 6):
read and write at least 50% of qemu-nbd's throughput, random reads at least 25% of its rate.

    .venv/bin/python benchmarks/bench_nbd_server.py [--size-mib 256] [--runs 7] [--fio-seconds 5]
    .venv/bin/python benchmarks/bench_nbd_server.py --size-mib 1024        # the issue's 1 GiB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

from _common import blockgraph_cmd, machine, need, scratch_dir, summary


def build_image(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        for _ in range(size // (8 << 20)):
            f.write(os.urandom(8 << 20))


class Server:
    def __init__(self, cmd: list[str], sock: Path) -> None:
        if sock.exists():
            sock.unlink()
        self.sock = sock
        self.proc = subprocess.Popen([*cmd[:1], *cmd[1:]], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {cmd}")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def start_pair(bg: list[str], work: Path, tag: str, image: Path, target: Path | None, extra: list[str]) -> dict:
    servers = {}
    for name, prog in (("blockgraph", [*bg, "nbd"]), ("qemu-nbd", ["qemu-nbd"])):
        file = target.with_suffix(f".{name}.raw") if target is not None else image
        sock = work / f"{tag}-{name}.sock"
        servers[name] = Server([*prog, "-t", "-e", "0", "-f", "raw", "-k", str(sock), *extra, str(file)], sock)
    return servers


def alternate(commands: dict[str, list[str]], prepare: str, runs: int) -> dict[str, list[float]]:
    """Wall times, one run of each command in turn, ``prepare`` before each; a first round warms up."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs + 1):
        for name, cmd in commands.items():
            subprocess.run(prepare, shell=True, check=True)
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t)
    return {name: ts[1:] for name, ts in times.items()}


def ratios(times: dict[str, list[float]]) -> str:
    q, b = times["qemu-nbd"], times["blockgraph"]
    return f"{statistics.median(q) / statistics.median(b):.2f} (medians), {min(q) / min(b):.2f} (best runs)"


def mib_s(size: int, ts: list[float]) -> float:
    return size / (1 << 20) / statistics.median(ts)


def fio_iops(uri: str, seconds: int, size: int) -> float:
    out = subprocess.run(["fio", "--name=randread", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
                          "--iodepth=16", f"--size={size}", "--time_based", f"--runtime={seconds}",
                          "--output-format=json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])


def qemu_img_bench_iops(uri: str, count: int) -> float:
    out = subprocess.run(["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "16", "-s", "4k", uri],
                         check=True, capture_output=True, text=True).stdout
    secs = float(out.rsplit("Run completed in ", 1)[1].split()[0])
    return count / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="image size (the issue asks for 1024)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--fio-seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternating random-read rounds per server")
    args = ap.parse_args()
    for tool in ("qemu-nbd", "nbdcopy"):
        need(tool)
    bg = blockgraph_cmd()
    work = scratch_dir()
    size = args.size_mib << 20
    image = work / f"nbd-{args.size_mib}m.raw"
    build_image(image, size)
    print(machine())
    print(f"image: {image} ({args.size_mib} MiB of random data)\n")
    warm = f"cat {image} > /dev/null"

    servers = start_pair(bg, work, "ro", image, None, ["-r"])
    try:
        reads = alternate({n: ["nbdcopy", s.uri, "null:"] for n, s in servers.items()}, warm, args.runs)
        print("sequential read, nbdcopy URI null:")
        for name, ts in reads.items():
            print(f"  {name:<11} {summary(ts)}  = {mib_s(size, ts):.0f} MiB/s")
        print(f"  ratio (blockgraph / qemu-nbd throughput): {ratios(reads)}\n")

        iops: dict[str, list[float]] = {n: [] for n in servers}
        use_fio = shutil.which("fio") is not None
        for _ in range(args.rounds):
            for name, s in servers.items():
                subprocess.run(warm, shell=True, check=True)
                iops[name].append(fio_iops(s.uri, args.fio_seconds, size) if use_fio
                                  else qemu_img_bench_iops(s.uri, 50000))
        what = "fio nbd engine, randread bs=4k iodepth=16" if use_fio else "qemu-img bench -d 16 -s 4k"
        print(f"4 KiB reads at depth 16 ({what}), {args.rounds} rounds:")
        for name, xs in iops.items():
            print(f"  {name:<11} median {statistics.median(xs):.0f} IOPS [{min(xs):.0f} .. {max(xs):.0f}]")
        print(f"  ratio (blockgraph / qemu-nbd): "
              f"{statistics.median(iops['blockgraph']) / statistics.median(iops['qemu-nbd']):.2f}\n")
    finally:
        for s in servers.values():
            s.stop()

    target = work / "nbd-target"
    for name in ("blockgraph", "qemu-nbd"):
        with open(target.with_suffix(f".{name}.raw"), "wb") as f:
            f.truncate(size)
    servers = start_pair(bg, work, "rw", image, target, [])
    try:
        writes = alternate({n: ["nbdcopy", str(image), s.uri] for n, s in servers.items()}, warm + "; sync",
                               args.runs)
        print("sequential write, nbdcopy image.raw URI (into the page cache, flushed at the end by nbdcopy):")
        for name, ts in writes.items():
            print(f"  {name:<11} {summary(ts)}  = {mib_s(size, ts):.0f} MiB/s")
        print(f"  ratio (blockgraph / qemu-nbd throughput): {ratios(writes)}")
    finally:
        for s in servers.values():
            s.stop()
        for name in ("blockgraph", "qemu-nbd"):
            target.with_suffix(f".{name}.raw").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
