"""A writer killed with SIGKILL at random points leaves no corruption (leaks allowed) and keeps flushed writes."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from blockgraph_qcow2.testing import HAVE_QEMU, bg_create, kill_after, qemu_img, qemu_io

pytestmark = [pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed"), pytest.mark.slow]

SIZE = 8 << 20
SLOT = 32 << 10
NSLOTS = SIZE // SLOT

WRITER = textwrap.dedent('''
    import random, sys
    from blockgraph import sync
    path, seed, nslots, slot = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    order = list(range(nslots))
    rng.shuffle(order)
    with sync.open(path, "qcow2", options={"discard": "unmap"}) as img:
        for i, s in enumerate(order):
            start, n = rng.randrange(0, slot // 4), rng.randrange(1, slot // 2)
            if i % 7 == 3:
                img.write_zeroes(s * slot + start, n)
            else:
                img.write(s * slot + start, bytes([i % 250 + 1]) * n)
            if i % 5 == 4:
                img.flush()
                print("F", i, flush=True)
        print("DONE", flush=True)
''')


def expected_ops(seed: int) -> list[tuple[int, int, int | None]]:
    """(offset, length, byte or None for zeroes) of each op, in the writer's order."""
    rng = random.Random(seed)
    order = list(range(NSLOTS))
    rng.shuffle(order)
    ops = []
    for i, s in enumerate(order):
        start, n = rng.randrange(0, SLOT // 4), rng.randrange(1, SLOT // 2)
        ops.append((s * SLOT + start, n, None if i % 7 == 3 else i % 250 + 1))
    return ops


def crash_once(path: Path, seed: int, tmp_path: Path, lazy: bool = False) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(seed), str(NSLOTS), str(SLOT)],
                            stdout=subprocess.PIPE, text=True)
    flushed = kill_after(proc, "F", random.Random(seed * 31).randrange(1, 40), 0.02)
    acked = max(flushed, default=-1)  # every op up to the last acknowledged flush must be there
    if lazy:
        # Dirty with lazy refcounts: a read-write open repairs the refcounts first, as QEMU does.
        from blockgraph import sync

        assert "cleanly shut down: no" in qemu_img("info", str(path)).stdout
        with sync.open(str(path), "qcow2") as img:
            img.read(0, 512)
        assert "cleanly shut down: no" not in qemu_img("info", str(path)).stdout
    r = qemu_img("check", str(path), check=False)
    assert r.returncode in (0, 3), f"seed {seed}: qemu-img check rc {r.returncode}\n{r.stdout}{r.stderr}"
    assert "ERROR" not in r.stdout + r.stderr
    raw = tmp_path / "after.raw"
    qemu_img("convert", "-O", "raw", str(path), str(raw))
    data = raw.read_bytes()
    base = bytes(range(256)) * (SIZE // 256)
    for i, (off, n, byte) in enumerate(expected_ops(seed)[:acked + 1]):
        want = bytes(n) if byte is None else bytes([byte]) * n
        assert data[off:off + n] == want, f"seed {seed}: op {i} (flushed) lost at {off}"
    # The last quarter of every slot is never written: it still shows the backing file.
    for s in range(0, SIZE, SLOT):
        lo = s + SLOT // 2 + SLOT // 4
        assert data[lo:s + SLOT] == base[lo:s + SLOT], f"seed {seed}: backing data changed at {lo}"


@pytest.mark.parametrize("seed,cluster", [(1, "64k"), (2, "4k"), (3, "64k"), (4, "512")])
def test_sigkill_leaves_no_corruption(seed: int, cluster: str, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (SIZE // 256))
    path = bg_create(tmp_path / "top.qcow2", SIZE, cluster_size=cluster, backing_file=str(base), backing_fmt="raw")
    crash_once(path, seed, tmp_path)
    qemu_io(path, "read 0 4k")


def test_sigkill_with_lazy_refcounts_then_repair_on_open(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (SIZE // 256))
    path = bg_create(tmp_path / "top.qcow2", SIZE, lazy_refcounts="on", backing_file=str(base), backing_fmt="raw")
    crash_once(path, 5, tmp_path, lazy=True)
