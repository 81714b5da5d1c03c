"""``blockgraph img bench``: qemu-img's output lines, offsets, writes, flushes, depth and errors."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from blockgraph.cli.img_bench import Bench
from helpers_img import Result, img, make_image, pattern

USAGE_TAIL = "Try 'qemu-img --help' for more information\n"
MiB = 1 << 20
DONE = re.compile(r"Run completed in \d+\.\d{3} seconds\.")


@pytest.fixture(autouse=True)
def _image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(Path("b.img"), 4 * MiB)


def test_read_bench_output() -> None:
    r = img("bench", "-f", "raw", "-c", "1000", "b.img")
    assert r.rc == 0 and r.err == ""
    assert r.lines[0] == ("Sending 1000 read requests, 4096 bytes each, 64 in parallel "
                          "(starting at offset 0, step size 4096)")
    assert DONE.fullmatch(r.lines[1]) and len(r.lines) == 2


def test_write_bench_writes_the_pattern_at_the_walked_offsets() -> None:
    r = img("bench", "-w", "-f", "raw", "-c", "8", "-d", "4", "-s", "4k", "-S", "8k", "-o", "4k",
            "--pattern=0x5a", "b.img")
    assert r.lines[0] == ("Sending 8 write requests, 4096 bytes each, 4 in parallel "
                          "(starting at offset 4096, step size 8192)")
    data = Path("b.img").read_bytes()
    for i in range(8):
        off = 4096 + i * 8192
        assert data[off:off + 4096] == pattern(0x5A, 4096)
        assert data[off + 4096:off + 8192] == bytes(4096)
    assert data[68 * 1024:] == bytes(len(data) - 68 * 1024)


def test_offsets_wrap_at_the_end() -> None:
    r = img("bench", "-w", "-f", "raw", "-c", "6", "-s", "1M", "-o", "2M", "--pattern=7", "b.img")
    assert r.rc == 0
    assert Path("b.img").read_bytes() == pattern(7, 4 * MiB)


def test_flush_interval_line() -> None:
    r = img("bench", "-w", "--flush-interval=10", "-c", "100", "-d", "2", "-f", "raw", "b.img")
    assert r.lines[:2] == ["Sending 100 write requests, 4096 bytes each, 2 in parallel "
                           "(starting at offset 0, step size 4096)", "Sending flush every 10 requests"]
    assert r.rc == 0
    r = img("bench", "-w", "--no-drain", "--flush-interval=10", "-c", "100", "-d", "2", "-f", "raw", "b.img")
    assert r.rc == 0 and DONE.fullmatch(r.lines[2])


def test_request_past_the_end_fails() -> None:
    r = img("bench", "-f", "raw", "-c", "3", "-s", "1M", "-o", "3584k", "b.img")
    assert r.rc == 1 and r.err == "qemu-img: Failed request: Input/output error\n"


@pytest.mark.parametrize(("args", "err"), [
    (["-c", "x"], "qemu-img: Invalid request count specified\n"),
    (["-d", "x"], "qemu-img: Invalid queue depth specified\n"),
    (["-d", "0"], "qemu-img: Invalid queue depth specified\n"),
    (["-s", "x"], "qemu-img: Invalid buffer size specified. You may use k, M, G, T, P or E suffixes for\n"
                  "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"),
    (["-o", "x"], "qemu-img: Invalid offset specified. You may use k, M, G, T, P or E suffixes for\n"
                  "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"),
    (["--pattern=300"], "qemu-img: Invalid pattern byte specified\n"),
    (["-i", "bogus"], "qemu-img: Invalid aio option: bogus\n"),
    (["-t", "bogus"], "qemu-img: Invalid cache mode\n"),
    (["--flush-interval=10"], "qemu-img: --flush-interval is only available in write tests\n"),
    (["-w", "--flush-interval=1", "-d", "2"], "qemu-img: Flush interval can't be smaller than depth\n"),
    (["-w", "-U"], "qemu-img: Could not open 'b.img': force-share=on can only be used with read-only images\n"),
])
def test_errors(args: list[str], err: str) -> None:
    assert img("bench", "-f", "raw", *args, "b.img") == Result(1, "", err)


def test_usage_error() -> None:
    assert img("bench", "-c", "1") == Result(1, "", "qemu-img: Expecting one image file name\n" + USAGE_TAIL)


class SlowBackend:
    """Requests that wait until released, recording how many are in flight at once."""

    def __init__(self) -> None:
        self.in_flight = self.peak = self.done = self.flushes = 0
        self.offsets: list[int] = []

    def getlength(self) -> int:
        return 1 << 20

    async def preadv(self, offset: int, buf: memoryview) -> None:
        self.offsets.append(offset)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self.in_flight -= 1
        self.done += 1

    pwritev = preadv

    async def flush(self) -> None:
        assert self.in_flight == 0  # drained first
        self.flushes += 1


def test_depth_requests_are_in_flight_at_once() -> None:
    blk = SlowBackend()
    asyncio.run(Bench(blk, 100, 16, 4096, 4096, 0, False, 0, 0, True).run())
    assert (blk.done, blk.peak) == (100, 16)
    assert sorted(blk.offsets) == [i * 4096 for i in range(100)]


def test_flush_interval_drains_and_flushes() -> None:
    blk = SlowBackend()
    asyncio.run(Bench(blk, 100, 4, 4096, 4096, 0, True, 0, 10, True).run())
    assert blk.done == 100 and blk.flushes == 10
