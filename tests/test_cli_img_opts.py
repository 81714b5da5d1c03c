"""The qemu-img conventions shared by every ``blockgraph img`` subcommand.

getopt_long behaviour (permutation, bundles, qemu's error texts), qemu_strtosz sizes, QEMU's
JSON key order and size_to_str, the progress meter, and the subcommand dispatcher.
"""

from __future__ import annotations

import pytest
from blockgraph.cli.img_opts import Getopt, ImgExit, cvtnum, strtosz, strtoul
from blockgraph.cli.img_qjson import dump_human, dumps, qdict_order
from blockgraph.cli.img_util import Progress, size_to_str
from helpers_img import img

USAGE_TAIL = "Try 'qemu-img --help' for more information\n"


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("1M", 1 << 20), ("1m", 1 << 20), ("1.5k", 1536), ("0x10", 16), ("1b", 1),
    ("1K", 1024), (" 1M", 1 << 20), ("2G", 2 << 30), ("1E", 1 << 60), (".5M", 1 << 19),
])
def test_strtosz_accepts_qemu_sizes(text: str, value: int) -> None:
    assert strtosz(text) == value


@pytest.mark.parametrize("text", ["1KiB", "1.7", "-5", "1e3", "", "k", "1MB", "1 M x", "0x1.8"])
def test_strtosz_refuses_malformed_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        strtosz(text)


def test_strtosz_overflow_and_cvtnum_messages() -> None:
    with pytest.raises(OverflowError):
        strtosz("16E")
    with pytest.raises(ImgExit) as e:
        cvtnum("image size", "9E")
    assert e.value.lines == ["Invalid image size specified. Must be between 0 and 9223372036854775807."]
    with pytest.raises(ImgExit) as e:
        cvtnum("bs", "foo", 1, 10)
    assert e.value.lines == ["Invalid bs specified. You may use k, M, G, T, P or E suffixes for",
                             "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."]
    with pytest.raises(ImgExit):
        cvtnum("bs", "0", 1, 10)
    assert cvtnum("bs", "10", 1, 10) == 10


def test_strtoul_bases() -> None:
    assert (strtoul("10"), strtoul("0x10"), strtoul("010"), strtoul("0")) == (10, 16, 8, 0)
    for bad in ("x", "-1", "1k", ""):
        with pytest.raises(ValueError):
            strtoul(bad)


def test_getopt_permutes_and_bundles() -> None:
    g = Getopt("f:hqU", {"output": (True, "output"), "force-share": (False, "U")})
    opts, rest = g.parse(["info", "a.img", "-qU", "--output", "json", "-fraw", "--force", "--", "-x"])
    assert opts == [("q", None), ("U", None), ("output", "json"), ("f", "raw"), ("U", None)]
    assert rest == ["a.img", "-x"]


@pytest.mark.parametrize(("argv", "message"), [
    (["info", "-Z"], "unrecognized option '-Z'"),
    (["info", "-Zq"], "unrecognized option 'info'"),  # getopt names argv[optind - 1]
    (["info", "-qZ"], "unrecognized option '-qZ'"),
    (["info", "-f"], "missing argument for option '-f'"),
    (["info", "--output"], "missing argument for option '--output'"),
    (["info", "--bogus"], "unrecognized option '--bogus'"),
    (["info", "--force-share=1"], "unrecognized option '--force-share=1'"),
])
def test_getopt_errors_are_qemus(argv: list[str], message: str) -> None:
    g = Getopt("f:hq", {"output": (True, "output"), "force-share": (False, "U")})
    opts, _ = g.parse(argv)  # the error waits for the loop over the options to reach it
    with pytest.raises(ImgExit) as e:
        list(opts)
    assert e.value.lines == [message] and e.value.usage and e.value.code == 1


def test_getopt_ambiguous_long_prefix_is_refused() -> None:
    g = Getopt("", {"start-offset": (True, "s"), "start-x": (True, "x")})
    with pytest.raises(ImgExit):
        list(g.parse(["map", "--start=1"])[0])
    assert g.parse(["map", "--start-o=1"])[0] == [("s", "1")]


def test_qdict_order_matches_qemu_info_output() -> None:
    # Order of qemu-img info --output=json for a qcow2 with a backing file (QEMU 7.2).
    keys = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
            "backing-filename", "full-backing-filename", "backing-filename-format", "format-specific"]
    assert qdict_order(dict.fromkeys(keys)) == [
        "backing-filename-format", "virtual-size", "filename", "cluster-size", "format", "actual-size",
        "format-specific", "full-backing-filename", "backing-filename", "dirty-flag"]
    data = ["compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"]
    assert qdict_order(dict.fromkeys(reversed(data))) == data


def test_json_writer_formats() -> None:
    assert dumps({"format": "raw", "virtual-size": 1}) == '{\n    "virtual-size": 1,\n    "format": "raw"\n}'
    assert dumps({}) == "{\n}"
    assert dumps([]) == "[\n]"
    assert dumps({"driver": "raw", "offset": 1024}, pretty=False) == '{"offset": 1024, "driver": "raw"}'
    assert dumps({"s": 'a"b\\\n\u00e9'}, pretty=False) == '{"s": "a\\"b\\\\\\n\\u00E9"}'
    assert dumps({"t": True, "f": False, "n": None}, pretty=False) in (
        '{"t": true, "f": false, "n": null}', '{"f": false, "t": true, "n": null}',
        '{"n": null, "t": true, "f": false}', '{"t": true, "n": null, "f": false}',
        '{"f": false, "n": null, "t": true}', '{"n": null, "f": false, "t": true}')


def test_human_dump_of_nested_data() -> None:
    lines = dump_human({"lazy-refcounts": False, "bitmaps": [{"name": "b"}], "n": 3}, 1)
    assert "    lazy refcounts: false" in lines
    assert "    n: 3" in lines
    i = lines.index("    bitmaps:")
    assert lines[i + 1:i + 3] == ["        [0]:", "            name: b"]


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (980, "980 B"), (999, "999 B"), (1000, "0.977 KiB"), (4096, "4 KiB"),
    (2166784, "2.07 MiB"), (67108864, "64 MiB"), (1 << 30, "1 GiB"), (1610612736, "1.5 GiB"),
])
def test_size_to_str_is_qemus(n: int, text: str) -> None:
    assert size_to_str(n) == text


def test_progress_meter_prints_qemus_lines(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress(True, 2.0)
    p.print(0, 100)
    for _ in range(4):
        p.print(25.0, 100)
    p.end()
    assert capsys.readouterr().out == ("    (0.00/100%)\r    (25.00/100%)\r    (50.00/100%)\r"
                                       "    (75.00/100%)\r    (100.00/100%)\r\n")


def test_progress_meter_skips_small_steps(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress(True, 1.0)
    for pct in (0.0, 0.5, 0.9, 1.5, 2.0, 100.0):
        p.print(pct, 0)
    p.end()
    assert capsys.readouterr().out == "    (0.00/100%)\r    (1.50/100%)\r    (100.00/100%)\r\n"


def test_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress(False, 1.0)
    p.print(50.0, 0)
    p.end()
    assert capsys.readouterr() == ("", "")


def test_dispatcher_errors_and_help() -> None:
    r = img()
    assert (r.rc, r.err) == (1, "qemu-img: Not enough arguments\n" + USAGE_TAIL)
    r = img("bogus")
    assert (r.rc, r.err) == (1, "qemu-img: Command not found: bogus\n" + USAGE_TAIL)
    r = img("--help")
    assert r.rc == 0 and "convert [" in r.out and "Supported formats:" in r.out and "raw" in r.out
    r = img("info", "-h")
    assert r.rc == 0 and "info [" in r.out


def test_disabled_progress_answers_sigusr1(capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import signal

    p = Progress(False, 1.0)
    try:
        p.print(10.0, 0)
        os.kill(os.getpid(), signal.SIGUSR1)
        p.print(42.0, 0)
    finally:
        p.end()
    assert capsys.readouterr() == ("", "    (42.00/100%)\n")
    assert signal.getsignal(signal.SIGUSR1) is not p._on_signal
