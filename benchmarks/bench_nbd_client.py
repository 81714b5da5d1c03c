"""NBD client: blockgraph img convert nbd+unix://... out.raw vs qemu-img convert, both reading from one qemu-nbd.

qemu-nbd serves a raw file with random data in every other 8 MiB extent and holes between, over a
unix socket (``--tcp`` for 127.0.0.1). Before every run the output is deleted and dirty pages are
synced; the served file stays in the page cache. Both tools use their defaults. Prints both times
and the ratio.

    .venv/bin/python benchmarks/bench_nbd_client.py [--runs N] [--size MiB] [--tcp]   # --size 1024 for 1 GiB

Target: blockgraph at most 1.5x qemu-img's wall time (start-up included).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time

from _common import blockgraph_cmd, machine, need, print_convert_ratio, scratch_dir, time_commands
from bench_convert import build_image


def serve(qemu_nbd: str, image: str, sock: str, tcp: bool) -> tuple[subprocess.Popen, str]:
    if tcp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv, url, addr = ["-b", "127.0.0.1", "-p", str(port)], f"nbd://127.0.0.1:{port}", ("127.0.0.1", port)
    else:
        if os.path.exists(sock):
            os.unlink(sock)
        argv, url, addr = ["-k", sock], f"nbd+unix:///?socket={sock}", sock
    proc = subprocess.Popen([qemu_nbd, "-t", "-e", "4", "-f", "raw", "--cache=writeback", *argv, image])
    for _ in range(500):
        with socket.socket(socket.AF_INET if tcp else socket.AF_UNIX) as s:
            if s.connect_ex(addr) == 0:
                return proc, url
        time.sleep(0.01)
    proc.kill()
    raise SystemExit("qemu-nbd did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=256, help="image size in MiB (1024 for the 1 GiB figure)")
    ap.add_argument("--tcp", action="store_true", help="serve on 127.0.0.1 instead of a unix socket")
    args = ap.parse_args()
    qemu_img, qemu_nbd = need("qemu-img"), need("qemu-nbd")
    work = scratch_dir()
    src, out, sock = str(work / f"nbd-src-{args.size}.img"), str(work / "nbd-out.img"), str(work / "nbd.sock")
    build_image(src, args.size << 20)
    proc, url = serve(qemu_nbd, src, sock, args.tcp)
    try:
        prepare = f"rm -f {out}; sync; cat {src} > /dev/null"
        commands = {"qemu-img": [qemu_img, "convert", "-f", "raw", "-O", "raw", url, out],
                    "blockgraph": [*blockgraph_cmd(), "img", "convert", "-f", "raw", "-O", "raw", url, out]}
        times = time_commands(commands, prepare, args.runs)
        check = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", src, out], capture_output=True,
                               text=True)
    finally:
        proc.kill()
        proc.wait()
    print(f"machine: {machine()}")
    print(f"image: {args.size} MiB raw served by qemu-nbd over {'TCP 127.0.0.1' if args.tcp else 'a unix socket'}, "
          f"random data in every other 8 MiB extent, holes between")
    print_convert_ratio(times)
    print(f"qemu-img compare on blockgraph's output: {check.stdout.strip() or check.stderr.strip()}")
    os.unlink(out)


if __name__ == "__main__":
    main()
