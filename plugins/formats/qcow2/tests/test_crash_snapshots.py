"""A process killed with SIGKILL while it writes, creates and deletes internal snapshots (and discards what
they free) leaves leaks at most (and QEMU's repairable COPIED-flag window), and every snapshot it reported
made is intact."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from blockgraph_qcow2.testing import HAVE_QEMU, bg_create, kill_after, qemu_img

pytestmark = [pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed"), pytest.mark.slow]

SIZE = 4 << 20
ROUNDS = 12

WORKER = textwrap.dedent('''
    import asyncio, random, sys
    from blockgraph.driver import SnapshotInfo
    from blockgraph.session import Session

    path, seed, rounds, opts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    options = dict(kv.split("=") for kv in opts.split(",")) if opts else {}

    async def main() -> None:
        rng = random.Random(seed)
        s = Session()
        node = await s.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": path}, **options})
        drv = node.driver
        size = node.length
        for r in range(rounds):
            for _ in range(8):
                off, n = rng.randrange(0, size - 1), rng.choice([512, 4096, 65536, 200000])
                n = min(n, size - off)
                await drv.pwritev(off, memoryview(bytes([r + 1]) * n), 0)
            await drv.flush()
            await drv.snapshot_create(SnapshotInfo(name=f"s{r}"))
            print("S", r, flush=True)
            if r >= 2:
                await drv.snapshot_delete(None, f"s{r - 2}")
        print("DONE", flush=True)

    asyncio.run(main())
''')


def model_after(seed: int, rounds: int) -> bytes:
    """The guest content after ``rounds`` rounds of the worker's writes."""
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for r in range(rounds):
        for _ in range(8):
            off, n = rng.randrange(0, SIZE - 1), rng.choice([512, 4096, 65536, 200000])
            n = min(n, SIZE - off)
            data[off:off + n] = bytes([r + 1]) * n
    return bytes(data)


CONFIGS = {
    "v3": ({}, ""),
    "tiny-slices": ({"cluster_size": "4k"}, "l2-cache-entry-size=512,l2-cache-size=1k"),
    "extl2": ({"extended_l2": "on", "cluster_size": "32k"}, ""),
    "v2-no-discard": ({"compat": "0.10"}, "pass-discard-snapshot=off"),
}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_sigkill_during_snapshots(config: str, seed: int, tmp_path: Path) -> None:
    create, opts = CONFIGS[config]
    seed += 10 * sorted(CONFIGS).index(config)
    path = bg_create(tmp_path / "img.qcow2", SIZE, **create)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(seed), str(ROUNDS), opts],
                            stdout=subprocess.PIPE, text=True)
    made = kill_after(proc, "S", random.Random(seed * 17).randrange(1, ROUNDS), 0.05)

    # A refcount and the COPIED flags that mirror it cannot change in one write: killed between the two, an
    # image shows "OFLAG_COPIED" errors, in QEMU as here, which `check -r all` repairs. They are harmless
    # because a second reference (snapshot table, L1) is written only after the flags are cleared, and the
    # flags are set again only after it is gone. Anything else would be corruption.
    r = qemu_img("check", str(path), check=False)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "ERROR" in line]
    assert all(" OFLAG_COPIED " in line for line in errors), r.stdout + r.stderr
    if errors:
        qemu_img("check", "-q", "-r", "all", str(path), check=False)
        r = qemu_img("check", str(path), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    listed = {line.split()[1] for line in qemu_img("snapshot", "-l", str(path)).stdout.splitlines()[2:]}
    # Reported made, and not up for deletion (s{k} is deleted after s{k+2} is reported): must be there.
    assert {f"s{k}" for k in made if k + 2 not in made} <= listed
    for name in listed:
        out = tmp_path / f"{name}.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(path), str(out))
        assert out.read_bytes() == model_after(seed, int(name[1:]) + 1), f"snapshot {name} changed"
