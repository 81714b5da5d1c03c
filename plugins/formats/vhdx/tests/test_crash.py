"""SIGKILL a process writing a VHDX at random moments: the image stays consistent and keeps every flushed write.

The writer logs each write to a journal file only after the write and a flush returned; whatever the
journal holds when the writer dies must be in the image. A crash may leave a dirty log behind, which is a
legal state: `qemu-img check -r all` replays it and must then find no errors.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vhdx_helpers import bg, commands, needs_qemu, run

WRITER = r"""
import os, random, sys
import blockgraph
path, journal, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(seed)
with blockgraph.open(path) as img, open(journal, "a") as log:
    for i in range(10_000):
        block = rnd.randrange(0, 32)
        off = block * (1 << 20) + rnd.randrange(0, 256) * 4096
        img.write(off, bytes([i % 251 + 1]) * 4096)
        img.flush()
        log.write(f"{off} {i % 251 + 1}\n")
        log.flush()
        os.fsync(log.fileno())
"""


@needs_qemu
@pytest.mark.slow
@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("VHDX_CRASH_SEEDS", "1,2,3").split(",")])
def test_sigkill_leaves_a_consistent_image_with_every_flushed_write(tmp_path: Path, seed: int) -> None:
    img, journal = tmp_path / "c.vhdx", tmp_path / "journal"
    bg("img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "32M")
    journal.touch()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(img), str(journal), str(seed)])
    deadline = time.monotonic() + 60  # a guard against a writer that never starts, not a timing assertion
    while journal.stat().st_size < 200 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).random() * 0.5)  # where, after the first writes, the kill lands
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run("qemu-img", "check", "-r", "all", "-f", "vhdx", img, ok=False)
    check = run("qemu-img", "check", "-f", "vhdx", img, ok=False)
    assert "No errors were found on the image." in check.stdout, check.stdout + check.stderr
    lines = journal.read_text().splitlines()
    assert lines, "the writer never got a write through before the kill"
    latest: dict[int, int] = {}
    for line in lines:
        off, value = map(int, line.split())
        latest[off] = value
    # The write after the last journaled one may have reached the image before the kill: either value is right.
    in_flight_off, in_flight_value = _writes(seed)[len(lines)]
    reads = [f"read -P {value} {off} 4096" for off, value in latest.items() if off != in_flight_off]
    out = run("qemu-io", "-r", "-f", "vhdx", *commands(reads), img)
    assert out.stdout.count("read 4096/4096") == len(reads)
    assert "Pattern verification failed" not in out.stdout
    values = {latest.get(in_flight_off, 0), in_flight_value}
    out = run("qemu-io", "-r", "-f", "vhdx", *commands([f"read -P {v} {in_flight_off} 4096" for v in values]), img,
              ok=False)
    assert out.stdout.count("Pattern verification failed") == len(values) - 1


def _writes(seed: int, count: int = 10_000) -> list[tuple[int, int]]:
    """The writer's (offset, value) sequence, from the same generator and seed."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        block = rnd.randrange(0, 32)
        out.append((block * (1 << 20) + rnd.randrange(0, 256) * 4096, i % 251 + 1))
    return out
