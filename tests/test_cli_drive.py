"""``blockgraph drive``: human and JSON output, QEMU-shaped errors, the opening check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blockgraph.cli.main import main


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    rc = main(["drive", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_human_tree(capsys: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image()
    rc, out, err = run(capsys, "-drive", f"file={path},format=raw,if=virtio,cache=none,id=d0")
    assert rc == 0, err
    assert out.splitlines() == [
        "drive d0: if=virtio bus=0 unit=0 media=disk",
        "  device: virtio-blk-pci,drive=d0",
        "  backend d0: read-only=off write-cache=on rerror=report werror=enospc removable=off",
        "  root: raw [d0-format, generated] read-only=off auto-read-only=on cache.direct=on cache.no-flush=off "
        "discard=ignore detect-zeroes=off",
        f"    file: file [d0-file, generated] filename={path} cache.direct=on cache.no-flush=off read-only=off "
        "auto-read-only=on discard=unmap",
    ]


def test_json_blockdev_form(capsys: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image()
    rc, out, _ = run(capsys, "--output=json", "-hda", str(path), "-drive", "if=none,id=empty")
    assert rc == 0
    doc = json.loads(out)
    hda, empty = doc["drives"]
    assert hda["id"] == "ide0-hd0" and hda["probe"] and hda["index"] == 0
    assert [bd["driver"] for bd in hda["blockdevs"]] == ["file", "raw"]  # probed from the file
    assert hda["device"] == {"driver": "ide-hd", "drive": "ide0-hd0", "bus": "ide.0", "unit": 0}
    assert empty["blockdevs"] == [] and empty["backend"]["root"] is None and empty["device"] is None


def test_probe_warning_for_raw(capsys: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image()
    rc, _, err = run(capsys, "-drive", f"file={path},if=none")
    assert rc == 0
    assert err.startswith(f"WARNING: Image format was not specified for '{path}' and probing guessed raw.")


def test_error_shape(capsys: Any) -> None:
    rc, out, err = run(capsys, "-drive", "file=a.img,format=raw,unit=2")
    assert rc == 1 and out == ""
    assert err == "blockgraph drive: -drive file=a.img,format=raw,unit=2: unit 2 too big (max is 1)\n"


def test_open_check_and_no_open(capsys: Any, tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    rc, _, err = run(capsys, "-drive", f"file={missing},format=raw,if=none")
    assert rc == 1 and err.endswith(f": Could not open '{missing}': No such file or directory\n")
    rc, out, _ = run(capsys, "--no-open", "-drive", f"file={missing},format=raw,if=none")
    assert rc == 0 and f"filename={missing}" in out


def test_missing_plugin_named_when_opening(capsys: Any, bg_tmp_image: Any) -> None:
    from blockgraph.plugins import PluginHost

    rc, out, err = run(capsys, "-drive", f"file={bg_tmp_image()},format=raw,if=none,bps=100")
    if "throttle" in PluginHost().drivers:
        assert rc == 0 and "needs:" not in out
        return
    assert rc == 1
    assert "needs: blockgraph-throttle (not installed)" in out
    assert "provided by blockgraph-throttle, which is not installed" in err


def test_listed_in_help(capsys: Any) -> None:
    main(["--help"])
    assert "drive " in capsys.readouterr().out


def test_bad_output_option(capsys: Any) -> None:
    rc, _, err = run(capsys, "--output=xml", "-drive", "if=none")
    assert rc == 1 and "--output must be" in err
