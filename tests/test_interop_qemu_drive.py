"""-drive against the real QEMU: the same command lines given to qemu-system-x86_64 and to blockgraph.

Accepted lines run in batches (one QEMU per batch, so numbering across drives is compared too);
QEMU's view is read over QMP (query-block, query-named-block-nodes, x-debug-query-block-graph,
qom-get of each device's type) and compared with blockgraph's expansion: node drivers, filenames,
read-only, cache flags, detect-zeroes, throttle settings, drive ids, removable media and devices.
Refused lines run one QEMU each: both must refuse, mostly with the same words.

QEMU 7.2 implements -drive copy-on-read=on as a flag on the top node; blockgraph expands it to the
copy-on-read filter node that QEMU documents as its -blockdev equivalent, so that filter is skipped
when comparing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from blockgraph.cli.main import main
from blockgraph.cmdline import throttle
from blockgraph.cmdline.commandline import parse_command_line
from blockgraph.cmdline.drive import TEMPORARY, DriveExpansion, probe_local
from blockgraph.plugins import PluginHost

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
BASE = ["-S", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg"]

# Accepted: one batch per command line. {raw}/{qcow2} become a fresh image each.
BATCHES: list[list[str]] = [
    ["-drive file={raw},format=raw",
     "-drive file={qcow2}",
     "-drive file={raw},format=raw,media=cdrom",
     "-drive file={raw},format=raw,cache=unsafe,detect-zeroes=on",
     "-drive file={raw},format=raw,if=virtio,cache=none,aio=threads",
     "-drive file={qcow2},format=qcow2,if=virtio,cache=directsync,node-name=vq",
     "-drive file={raw},format=raw,if=none,cache=writethrough,id=wt",
     "-drive file={raw},format=raw,if=floppy",
     "-drive file={raw},format=raw,if=pflash,readonly=on"],
    ["-drive file={raw},format=raw,if=none,bps=1000000",
     "-drive file={raw},format=raw,if=none,iops_rd=100,iops_wr=50,iops_size=4096,group=g1",
     "-drive file={raw},format=raw,if=none,bps_max=2000,bps=1000,throttling.bps-total-max-length=4",
     "-drive file={raw},format=raw,if=none,throttling.iops-total=10,throttling.iops-total-max=30",
     "-drive file={raw},format=raw,if=none,bps_rd=300,bps_wr=400,bps_rd_max=600",
     "-drive if=none,id=empty",
     "-drive if=none",
     "-drive file={raw},format=raw,if=none,readonly=on,copy-on-read=on",
     "-drive file={raw},format=raw,if=none,copy-on-read=on",
     "-drive file={raw},format=raw,if=none,detect-zeroes=unmap",
     "-drive file={raw},format=raw,if=none,discard=unmap,detect-zeroes=unmap",
     "-drive file={raw},format=raw,if=none,cache=none,aio=native",
     "-drive file={raw},format=raw,if=none,aio=io_uring",
     "-drive file={raw},format=raw,if=none,id=dv",
     "-device virtio-blk-pci,drive=dv"],
    ["-drive file={raw},format=raw,if=none,snapshot=on,id=s1",
     "-drive file={qcow2},if=virtio,snapshot=on,detect-zeroes=on",
     "-drive file={raw},format=raw,if=none,cache.direct=on,cache.no-flush=on",
     "-drive file={raw},format=raw,if=none,cache=none,cache.writeback=off",
     "-drive file={qcow2},format=qcow2,if=none,file.locking=off",
     "-drive file={raw},format=raw,if=none,offset=512,size=4096",
     "-drive file={raw},format=file,if=none",
     "-drive file={raw},if=none,readonly=on",
     "-drive file={raw},format=raw,if=none,rerror=stop,werror=report",
     "-drive driver=raw,file={raw},if=none,index=20",
     "-drive file={raw},format=raw,if=virtio,index=4,werror=ignore"],
    ["-hda {raw}", "-hdb {qcow2}", "-cdrom {raw}", "-drive file={raw},format=raw,index=3", "-fda {raw}"],
    ["-hdd {raw}", "-drive file={qcow2},format=qcow2,if=none", "-snapshot"],
]

# Refused: (command line, whether blockgraph's message is QEMU's word for word).
REFUSED: list[tuple[str, bool]] = [
    ("-drive file={raw},format=raw,foo=bar", True),
    ("-drive foo=bar", True),
    ("-drive file={raw},format=raw,serial=abc", True),
    ("-drive file={raw},format=raw,if=bogus", True),
    ("-drive file={raw},format=raw,unit=2", True),
    ("-drive file={raw},format=raw,index=0 -drive file={raw},format=raw,index=0", True),
    ("-drive file={raw},format=raw,media=floppy", True),
    ("-drive file={raw},format=raw,cache=bogus", True),
    ("-drive file={raw},format=raw,aio=native", True),
    ("-drive file={raw},format=raw,discard=bogus", True),
    ("-drive file={raw},format=raw,detect-zeroes=bogus", True),
    ("-drive file={raw},format=raw,rerror=enospc", True),
    ("-drive file={raw},format=raw,werror=bogus", True),
    ("-drive file={raw},format=raw,if=floppy,werror=stop", True),
    ("-drive file={raw},format=bogus", True),
    ("-drive file={raw},format=raw,bps=100,bps_rd=10", True),
    ("-drive file={raw},format=raw,bps=100,throttling.bps-total=10", True),
    ("-drive file={raw},format=raw,iops_size=4096", True),
    ("-drive file={raw},format=raw,bps=100,bps_max=10", True),
    ("-drive file={raw},format=raw,bps_max=10", True),
    ("-drive file={raw},format=raw,bps=100,bps_max_length=5", True),
    ("-drive file={raw},format=raw,bps=100,throttling.bps-total-max-length=5", True),
    ("-drive file={raw},format=raw,if=none,bps=2000000000000000", True),
    ("-drive file={raw},format=raw,readonly=on,read-only=on", True),
    ("-drive file={raw},format=raw,readonly=bogus", True),
    ("-drive file={raw},format=raw,index=abc", True),
    ("-drive file={missing},format=raw", True),
    ("-hda {missing}", True),
    ("-drive file={raw},format=raw,driver=raw", True),
    ("-drive file={raw},if=scsi,format=raw", True),
    ("-drive file={raw},format=raw,if=sd", True),
    ("-drive file={raw},format=raw,bus=2", True),
    ("-drive file={raw},format=raw,node-name=1bad", True),
    ("-drive file={raw},format=raw,id=1bad", True),
    ("-drive file={raw},format=raw,id=a -drive file={raw},id=a,if=none", True),
    ("-drive file={raw},format=raw,if=none,node-name=x,id=x", True),
    ("-drive file={raw},format=raw,readonly=on", True),
    ("-drive if=none,format=raw", True),
    ("-drive if=none,cache=none", True),
    ("-drive file={raw},format=raw,if=pflash,index=2,readonly=on", True),
    ("-drive file={raw},format=raw,if=floppy,unit=2", True),
    ("-drive file={raw},format=raw,if=none,snapshot=bogus", True),
    ("-drive file=foo:bar,if=none", True),
    ("-drive file={raw},format=raw,if=none,id=a -device virtio-blk-pci,drive=a -device virtio-blk-pci,drive=a", True),
    ("-drive file={raw},format=raw,id=a -device virtio-blk-pci,drive=a", True),
    ("-device virtio-blk-pci,drive=nope", True),
    ("-hdc {raw} -cdrom {raw}", True),
    ("-drive file={raw},format=raw,if=none,file.locking=bogus", False),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: Any) -> Any:
    """A source raw and qcow2 image made by qemu-img, copied for every drive that names one."""
    d = tmp_path_factory.mktemp("drive-oracle")
    raw, qcow2 = d / "src.raw", d / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "1M"], check=True)
    counter = iter(range(1 << 20))

    def argv(lines: list[str]) -> list[str]:
        out: list[str] = []
        for line in lines:
            for token in line.split(" "):
                while "{raw}" in token or "{qcow2}" in token:
                    kind = "raw" if "{raw}" in token else "qcow2"
                    copy = d / f"img{next(counter)}.{kind}"
                    shutil.copy(raw if kind == "raw" else qcow2, copy)
                    token = token.replace("{" + kind + "}", str(copy), 1)
                out.append(token.replace("{missing}", str(d / "missing.img")))
        return out

    return argv


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost()


# ------------------------------------------------------------------ a minimal QMP client


class Qmp:
    def __init__(self, path: Path, proc: subprocess.Popen) -> None:
        for _ in range(400):
            if proc.poll() is not None:
                raise AssertionError(f"QEMU refused the command line: {proc.stderr.read()}")
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                time.sleep(0.05)
        else:
            raise AssertionError("no QMP socket")
        self.f = self.sock.makefile("rw")
        assert "QMP" in json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" not in reply:
                assert "return" in reply, reply
                return reply["return"]


def qemu_view(argv: list[str], tmp: Path) -> dict[str, Any]:
    sock = tmp / "qmp.sock"
    proc = subprocess.Popen([QEMU, *BASE, "-qmp", f"unix:{sock},server=on,wait=off", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        qmp = Qmp(sock, proc)
        blocks = qmp.cmd("query-block")
        nodes = qmp.cmd("query-named-block-nodes", flat=True)
        graph = qmp.cmd("x-debug-query-block-graph")
        types = {b["device"]: qmp.cmd("qom-get", path=b["qdev"], property="type") for b in blocks if "qdev" in b}
        qmp.cmd("quit")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"blocks": {b["device"]: b for b in blocks}, "nodes": {n["node-name"]: n for n in nodes},
            "graph": graph, "types": types}


def qemu_tree(view: dict[str, Any], device: str) -> dict[str, str]:
    """path ("root", "root/file", "root/backing/file" ...) -> node-name, from QEMU's graph."""
    graph = view["graph"]
    by_id = {n["id"]: n for n in graph["nodes"]}
    bb = next(n["id"] for n in graph["nodes"] if n["type"] == "block-backend" and n["name"] == device)
    out: dict[str, str] = {}

    def walk(node_id: int, path: str) -> None:
        out[path] = by_id[node_id]["name"]
        for e in graph["edges"]:
            if e["parent"] == node_id and e["name"] in ("file", "backing"):
                walk(e["child"], f"{path}/{e['name']}")

    for e in graph["edges"]:
        if e["parent"] == bb and e["name"] == "root":
            walk(e["child"], "root")
    return out


def our_tree(exp: DriveExpansion) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def walk(name: str, path: str) -> None:
        node = exp.node(name)
        if node["driver"] == "copy-on-read":  # a flag on the top node in QEMU 7.2, see above
            walk(node["file"], path)
            return
        out[path] = node
        for child in ("file", "backing"):
            if isinstance(node.get(child), str):
                walk(node[child], f"{path}/{child}")

    if exp.root is not None:
        walk(exp.root, "root")
    return out


DEVICE_TYPES = {"virtio-blk-pci": "virtio-blk-device"}  # query-block names the virtio backend


@pytest.mark.parametrize("batch", range(len(BATCHES)))
def test_accepted_lines_match_qemu(batch: int, images: Any, host: PluginHost, tmp_path: Path) -> None:
    argv = images(BATCHES[batch])
    cl = parse_command_line(argv, host)
    for exp in cl.drives:
        probe_local(exp, host)
    view = qemu_view(argv, tmp_path)
    assert sorted(view["blocks"]) == sorted(e.id for e in cl.drives)
    ours_total = 0
    for exp in cl.drives:
        block, be = view["blocks"][exp.id], exp.backend
        where = f"{exp.id} ({exp.text})"
        assert block["removable"] == be["removable"], where
        expected_type = None if exp.device is None else DEVICE_TYPES.get(exp.device["driver"], exp.device["driver"])
        assert view["types"].get(exp.id) == expected_type, where
        if exp.root is None:
            assert "inserted" not in block, where
            continue
        ins = block["inserted"]
        assert ins["ro"] == be["read-only"], where
        assert ins["cache"]["writeback"] == be["write-cache"], where
        limits = be["throttle"]["limits"] if be["throttle"] else None
        group = be["throttle"]["group"] if be["throttle"] else None
        got = {k: v for k, v in ins.items() if k in throttle.query_fields(limits, group) or k.startswith(
            ("bps", "iops")) or k == "group"}
        assert got == throttle.query_fields(limits, group), where
        assert ins["backing_file_depth"] == (1 if exp.snapshot else 0), where
        ours, theirs = our_tree(exp), qemu_tree(view, exp.id)
        assert sorted(ours) == sorted(theirs), where
        ours_total += len(ours)
        for path, node in ours.items():
            q = view["nodes"][theirs[path]]
            at = f"{where} {path}"
            assert q["drv"] == node["driver"], at
            assert q["ro"] == node["read-only"], at
            assert q["cache"]["direct"] == node["cache"]["direct"], at
            assert q["cache"]["no-flush"] == node["cache"]["no-flush"], at
            assert q["detect_zeroes"] == node.get("detect-zeroes", "off"), at
            if node["node-name"] not in exp.generated:
                assert q["node-name"] == node["node-name"], at
            if node["driver"] == "file":
                if node["filename"] == TEMPORARY:
                    assert os.path.basename(q["file"]).startswith("vl."), at
                else:
                    assert q["file"] == node["filename"], at
    assert len(view["nodes"]) == ours_total


def qemu_refusal(argv: list[str]) -> tuple[int, str]:
    proc = subprocess.run([QEMU, *BASE, "-qmp", "stdio", *argv], capture_output=True, text=True, timeout=60,
                          input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n')
    return proc.returncode, _message(proc.stderr, "qemu-system-x86_64: ")


def _message(stderr: str, prefix: str) -> str:
    """The error: from its first prefixed line to the end, prefix removed (warnings before it dropped)."""
    lines = stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith(prefix) and "warning:" not in line]
    if not errors:
        return ""
    return "\n".join([lines[errors[-1]][len(prefix):], *lines[errors[-1] + 1:]])


@pytest.mark.parametrize(("line", "exact"), REFUSED, ids=[line for line, _ in REFUSED])
def test_refused_lines_refused_by_both(line: str, exact: bool, images: Any, capsys: Any) -> None:
    argv = images([line])
    rc, theirs = qemu_refusal(argv)
    assert rc != 0 and theirs, "QEMU accepted it"
    assert main(["drive", *argv]) == 1
    ours = _message(capsys.readouterr().err, "blockgraph drive: ")
    if exact:
        assert ours == theirs
    else:
        assert ours


def test_table_size() -> None:
    accepted = sum(1 for b in BATCHES for line in b if not line.startswith("-snapshot"))
    assert accepted + len(REFUSED) >= 40
