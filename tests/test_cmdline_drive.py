"""-drive expansion: options, cache modes, node tree, backend and device, QEMU's refusals and their text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from blockgraph.cmdline import DriveError, DriveTable, expand_drive, parse_drive
from blockgraph.cmdline.drive import PROBE, TEMPORARY, probe_local
from blockgraph.plugins import PluginHost


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost()


def expand(text: str, host: Any = None, table: DriveTable | None = None, **kw: Any) -> Any:
    return expand_drive(text, table or DriveTable(), host=host, **kw)


def test_plain_file_with_format(host: PluginHost) -> None:
    exp = expand("file=disk.img,format=raw", host)
    assert (exp.id, exp.interface, exp.bus, exp.unit, exp.media) == ("ide0-hd0", "ide", 0, 0, "disk")
    proto, fmt = exp.blockdevs
    assert proto == {"driver": "file", "node-name": "ide0-hd0-file", "filename": "disk.img",
                     "cache": {"direct": False, "no-flush": False}, "read-only": False,
                     "auto-read-only": True, "discard": "unmap"}
    assert fmt["driver"] == "raw" and fmt["file"] == "ide0-hd0-file" and fmt["detect-zeroes"] == "off"
    assert exp.generated == {"ide0-hd0-file", "ide0-hd0-format"} and exp.root == "ide0-hd0-format"
    assert exp.backend["write-cache"] and exp.backend["rerror"] == "report" and exp.backend["werror"] == "enospc"
    assert exp.device == {"driver": "ide-hd", "drive": "ide0-hd0", "bus": "ide.0", "unit": 0}
    assert not exp.probe and exp.requires == []


@pytest.mark.parametrize(("mode", "wb", "direct", "no_flush"), [
    ("writeback", True, False, False), ("none", True, True, False), ("off", True, True, False),
    ("writethrough", False, False, False), ("directsync", False, True, False), ("unsafe", True, False, True)])
def test_cache_modes(mode: str, wb: bool, direct: bool, no_flush: bool) -> None:
    exp = expand(f"file=a.img,format=raw,cache={mode}")
    assert exp.backend["write-cache"] is wb
    for bd in exp.blockdevs:  # inherited down to the protocol node
        assert bd["cache"] == {"direct": direct, "no-flush": no_flush}


def test_specific_cache_options_win_over_cache_mode() -> None:
    exp = expand("file=a.img,format=raw,cache=none,cache.writeback=off,cache.direct=off")
    assert exp.backend["write-cache"] is False
    assert exp.node(exp.root)["cache"] == {"direct": False, "no-flush": False}


def test_format_left_to_probing_and_probed_locally(host: PluginHost, tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 4096)
    exp = expand(f"file={img},if=none", host)
    assert exp.probe and exp.node(exp.root)["driver"] == PROBE
    assert probe_local(exp, host) == ("raw", str(img))
    assert exp.node(exp.root)["driver"] == "raw"


def test_protocol_format_gives_a_single_node(host: PluginHost) -> None:
    exp = expand("file=a.img,format=file,if=none", host)
    assert [bd["driver"] for bd in exp.blockdevs] == ["file"] and exp.root == "none0-file"


def test_driver_options_pass_through_to_their_nodes(host: PluginHost) -> None:
    exp = expand("file=a.img,format=raw,file.locking=off,offset=512,if=none,node-name=top,aio=threads", host)
    proto, fmt = exp.blockdevs
    assert proto["locking"] == "off" and proto["aio"] == "threads" and fmt["offset"] == "512"
    assert fmt["node-name"] == "top" and "top" not in exp.generated


def test_readonly_and_cdrom(host: PluginHost) -> None:
    exp = expand("file=a.img,format=raw,readonly=on,if=virtio", host)
    assert exp.backend["read-only"] and all(bd["read-only"] for bd in exp.blockdevs)
    cd = expand("file=a.iso,format=raw,media=cdrom", host)
    assert cd.id == "ide0-cd0" and cd.backend["read-only"] and cd.device["driver"] == "ide-cd"
    assert cd.backend["removable"]


def test_copy_on_read_is_a_filter_on_top(host: PluginHost) -> None:
    exp = expand("file=a.img,format=raw,copy-on-read=on,if=none", host)
    cor = exp.node(exp.root)
    assert cor == {"driver": "copy-on-read", "node-name": "none0-cor", "file": "none0-format"}
    assert exp.requires == ["copy-on-read"]


def test_copy_on_read_dropped_on_read_only_drive_with_warning() -> None:
    warnings: list[str] = []
    exp = expand("file=a.img,format=raw,copy-on-read=on,readonly=on,if=none", warn=warnings.append)
    assert warnings == ["warning: disabling copy-on-read on read-only drive"]
    assert exp.requires == [] and exp.node(exp.root)["driver"] == "raw"


def test_snapshot_adds_a_temporary_overlay(host: PluginHost) -> None:
    exp = expand("file=a.img,format=raw,if=none,detect-zeroes=on,cache=none", host)
    assert not exp.snapshot
    exp = expand("file=a.img,format=raw,if=none,snapshot=on,detect-zeroes=on,cache=none", host)
    overlay = exp.node(exp.root)
    assert overlay["driver"] == "qcow2" and overlay["backing"] == "none0-format"
    assert overlay["cache"] == {"direct": False, "no-flush": True} and overlay["detect-zeroes"] == "on"
    assert exp.node(overlay["file"])["filename"] == TEMPORARY
    original = exp.node("none0-format")
    assert original["read-only"] and not original["auto-read-only"] and "detect-zeroes" not in original
    assert "qcow2" in exp.requires


def test_global_snapshot_flag_unless_set() -> None:
    assert expand("file=a.img,format=raw", snapshot=True).snapshot
    assert not expand("file=a.img,format=raw,snapshot=off", snapshot=True).snapshot


def test_empty_drive_has_a_backend_and_no_nodes() -> None:
    exp = expand("if=none,id=cd")
    assert exp.blockdevs == [] and exp.root is None and exp.backend["name"] == "cd"


def test_throttle_limits_on_the_backend() -> None:
    exp = expand("file=a.img,format=raw,if=none,bps=1000,iops_rd=10,iops_rd_max=20,group=g,iops_size=4096")
    assert exp.backend["throttle"] == {"group": "g", "limits": {
        "bps-total": 1000, "iops-read": 10, "iops-read-max": 20, "iops-size": 4096}}
    assert exp.requires == ["throttle"]
    assert expand("file=a.img,format=raw,if=none,throttling.iops-total=5").backend["throttle"]["group"] == "none0"


def test_error_policies() -> None:
    exp = expand("file=a.img,format=raw,if=virtio,rerror=stop,werror=ignore")
    assert (exp.backend["rerror"], exp.backend["werror"]) == ("stop", "ignore")


def test_detect_zeroes_unmap_is_accepted_as_qemu_does() -> None:
    exp = expand("file=a.img,format=raw,detect-zeroes=unmap,if=none")
    assert exp.node(exp.root)["detect-zeroes"] == "unmap"


def test_json_filename_merges(host: PluginHost) -> None:
    exp = expand('file=json:{"driver": "raw"\\, "file": {"driver": "file"\\, "filename": "x.img"}},if=none'
                 .replace("\\,", ",,"), host)
    assert [bd["driver"] for bd in exp.blockdevs] == ["file", "raw"]
    assert exp.blockdevs[0]["filename"] == "x.img"


def test_short_form_boolean_warns() -> None:
    warnings: list[str] = []
    parsed = parse_drive("file=a.img,format=raw,readonly", warn=warnings.append)
    assert parsed.opts["readonly"] == "on"
    assert warnings == ["warning: short-form boolean option 'readonly' deprecated\nPlease use readonly=on instead"]


def test_double_comma_is_a_literal_comma() -> None:
    exp = expand("file=a,,b.img,format=raw")
    assert exp.blockdevs[0]["filename"] == "a,b.img"


# ------------------------------------------------------------------ refusals, with QEMU's text

REFUSED = [
    ("file=a.img,format=raw,foo=bar", "Block format 'raw' does not support the option 'foo'"),
    ("file=a.img,format=raw,file.foo=1", "Block protocol 'file' doesn't support the option 'foo'"),
    ("file=a.img,format=raw,serial=abc", "Block format 'raw' does not support the option 'serial'"),
    ("file=a.img,format=raw,bps_max_length=5", "Block format 'raw' does not support the option 'bps_max_length'"),
    ("foo=bar", "Must specify either driver or file"),
    ("if=none,cache=none", "Must specify either driver or file"),
    ("if=none,format=raw", 'A block device must be specified for "file"'),
    ("file=a.img,if=bogus", "unsupported bus type 'bogus'"),
    ("file=a.img,unit=2", "unit 2 too big (max is 1)"),
    ("file=a.img,if=scsi,unit=7", "unit 7 too big (max is 6)"),
    ("file=a.img,index=1,unit=0", "index cannot be used with bus and unit"),
    ("file=a.img,media=floppy", "'floppy' invalid media"),
    ("file=a.img,cache=bogus", "invalid cache option"),
    ("file=a.img,aio=bogus", "invalid aio option"),
    ("file=a.img,format=raw,aio=native", "aio=native was specified, but it requires cache.direct=on, "
                                         "which was not specified."),
    ("file=a.img,format=raw,discard=bogus", "Invalid discard option"),
    ("file=a.img,detect-zeroes=bogus", "invalid parameter value: bogus"),
    ("file=a.img,rerror=enospc", "'enospc' invalid read error action"),
    ("file=a.img,werror=bogus", "'bogus' invalid write error action"),
    ("file=a.img,if=floppy,werror=stop", "werror is not supported by this bus type"),
    ("file=a.img,if=pflash,rerror=stop", "rerror is not supported by this bus type"),
    ("file=a.img,format=bogus", "Unknown driver 'bogus'"),
    ("file=a.img,format=raw,driver=raw", "Cannot specify both 'driver' and 'format'"),
    ("file=a.img,bps=100,bps_rd=10", "bps/iops/max total values and read/write values cannot be used at the same time"),
    ("file=a.img,bps=100,throttling.bps-total=10", "'throttling.bps-total' and its alias 'bps' can't be used "
                                                   "at the same time"),
    ("file=a.img,readonly=on,read-only=on", "'read-only' and its alias 'readonly' can't be used at the same time"),
    ("file=a.img,iops_size=4096", "iops size requires an iops value to be set"),
    ("file=a.img,bps_max=10", "bps_max/iops_max require corresponding bps/iops values"),
    ("file=a.img,bps=100,bps_max=10", "bps_max/iops_max cannot be lower than bps/iops"),
    ("file=a.img,bps=100,throttling.bps-total-max-length=5", "burst length set without burst rate"),
    ("file=a.img,bps=10,bps_max=20,throttling.bps-total-max-length=0", "the burst length cannot be 0"),
    ("file=a.img,bps=2000000000000000", "bps/iops/max values must be within [0, 1000000000000000]"),
    ("file=a.img,bps=abc", "Parameter 'throttling.bps-total' expects a number"),
    ("file=a.img,readonly=bogus", "Parameter 'read-only' expects 'on' or 'off'"),
    ("file=a.img,cache.direct=bogus", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("file=a.img,index=abc", "Parameter 'index' expects a number"),
    ("file=a.img,snapshot=bogus", "Parameter 'snapshot' expects 'on' or 'off'"),
    ("file=a.img,format=raw,node-name=1bad", "Invalid node-name: '1bad'"),
    ("file=a.img,format=raw,id=1bad", "Parameter 'id' expects an identifier\nIdentifiers consist of letters, "
                                      "digits, '-', '.', '_', starting with a letter."),
    ("file=a.img,format=raw,id=x,node-name=x,if=none", "Device name 'x' conflicts with an existing node name"),
    ("file=foo:bar,if=none", "Unknown protocol 'foo'"),
    ("file=a.img,format=raw,,foo", "Unknown driver 'raw,foo'"),
]


@pytest.mark.parametrize(("text", "message"), REFUSED, ids=[t for t, _ in REFUSED])
def test_refused_with_qemu_text(host: PluginHost, text: str, message: str) -> None:
    with pytest.raises(DriveError) as info:
        expand(text, host)
    assert info.value.reason == message
    assert info.value.text == text


def test_missing_format_plugin_names_the_distribution(bg_plugins: Any) -> None:
    bare = bg_plugins(block=["vmdk"])
    with pytest.raises(DriveError, match="blockgraph-vmdk"):
        expand("file=a.vmdk,format=vmdk", bare)


# ------------------------------------------------------------------ any input: a DriveError or an expansion

_KEYS = ["file", "format", "if", "bus", "unit", "index", "media", "id", "node-name", "readonly", "snapshot",
         "cache", "aio", "discard", "detect-zeroes", "copy-on-read", "rerror", "werror", "bps", "iops_size",
         "group", "throttling.bps-total-max", "file.locking", "file.filename", "file.driver", "driver",
         "cache.direct", "backing.file", "stats-intervals.0", "stats-intervals.1", "x.0", "file.0"]
_VALUES = ["", "on", "off", "raw", "qcow2", "file", "none", "ide", "virtio", "0", "7", "-1", "abc", "a.img",
           'json:{"driver":"raw"}', "json:[1]", "json:{", "foo:bar", "unmap", "cdrom", "1000", "x,,y", "null-co"]


def test_any_option_mix_gives_a_drive_error_or_an_expansion(host: PluginHost) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    part = st.one_of(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)).map(lambda kv: "=".join(kv)),
                     st.sampled_from(_KEYS), st.text(alphabet="ab=,.:", max_size=6))

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(part, max_size=6))
    def check(parts: list[str]) -> None:
        try:
            exp = expand(",".join(parts), host)
        except DriveError as e:
            assert e.reason
            return
        names = [bd["node-name"] for bd in exp.blockdevs]
        assert len(names) == len(set(names))
        assert exp.root is None or exp.root in names

    check()
