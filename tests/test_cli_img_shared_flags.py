"""The switches the ``blockgraph img`` subcommands share: ``-q``, ``-U``/``--force-share``, ``--image-opts``,
``--object`` (img_opts.CommonFlags). Each subcommand takes exactly those qemu-img 7.2 gives it, with
qemu-img's messages and exit codes; ``--object`` is refused, as no object type has a plugin yet.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from blockgraph.cli.img_opts import CommonFlags, ImgExit, shared_long
from helpers_img import Result, img, make_image, pattern

USAGE_TAIL = "Try 'qemu-img --help' for more information\n"
OBJECT = "secret,id=x,data=y"
NO_OBJECT = "qemu-img: --object is not supported by blockgraph img\n"
KEYVAL = "driver=raw,file.filename=a.img"
# subcommand -> (arguments that run it on a.img, the shared switches qemu-img gives it)
TAKES: dict[str, tuple[list[str], set[str]]] = {
    "amend": (["-o", "size=2M", "a.img"], {"-q", "--image-opts", "--object"}),
    "bench": (["-c", "1", "a.img"], {"-q", "-U", "--force-share", "--image-opts"}),
    "check": (["a.img"], {"-q", "-U", "--force-share", "--image-opts", "--object"}),
    "commit": (["a.img"], {"-q", "--image-opts", "--object"}),
    "compare": (["a.img", "b.img"], {"-q", "-U", "--force-share", "--image-opts", "--object"}),
    "convert": (["a.img", "out.img"], {"-q", "-U", "--force-share", "--image-opts", "--object"}),
    "create": (["out.img", "1M"], {"-q", "--object"}),
    "dd": (["if=a.img", "of=out.img"], {"-U", "--force-share", "--image-opts", "--object"}),
    "info": (["a.img"], {"-U", "--force-share", "--image-opts", "--object"}),
    "map": (["a.img"], {"-U", "--force-share", "--image-opts", "--object"}),
    "measure": (["a.img"], {"-U", "--force-share", "--image-opts", "--object"}),
    "rebase": (["-u", "-b", "", "a.img"], {"-q", "-U", "--force-share", "--image-opts", "--object"}),
    "resize": (["a.img", "2M"], {"-q", "--image-opts", "--object"}),
    "snapshot": (["-l", "a.img"], {"-q", "-U", "--force-share", "--image-opts", "--object"}),
}
SWITCHES = ("-q", "-U", "--force-share", "--image-opts", "--object")


@pytest.fixture(autouse=True)
def _images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(Path("a.img"), 1 << 20, {65536: pattern(0x5A, 65536)})
    make_image(Path("b.img"), 1 << 20, {65536: pattern(0x5A, 65536)})


def _argv(switch: str) -> list[str]:
    return [switch, OBJECT] if switch == "--object" else [switch]


@pytest.mark.parametrize(("cmd", "switch"), [(c, s) for c in TAKES for s in SWITCHES if s not in TAKES[c][1]])
def test_a_switch_qemu_img_lacks_is_unrecognized(cmd: str, switch: str) -> None:
    r = img(cmd, *_argv(switch), *TAKES[cmd][0])
    assert r == Result(1, "", f"qemu-img: unrecognized option '{switch}'\n" + USAGE_TAIL)
    assert not Path("out.img").exists()


@pytest.mark.parametrize("cmd", [c for c in TAKES if "--object" in TAKES[c][1]])
def test_object_is_refused_before_anything_is_opened_or_written(cmd: str) -> None:
    code = 2 if cmd == "compare" else 1  # compare exits 2 on every error
    before = Path("a.img").read_bytes()
    assert img(cmd, "--object", OBJECT, *TAKES[cmd][0]) == Result(code, "", NO_OBJECT)
    assert img(cmd, f"--object={OBJECT}", *TAKES[cmd][0]) == Result(code, "", NO_OBJECT)
    if cmd != "resize":  # resize's last argument is always the size, as in qemu-img
        assert img(cmd, *TAKES[cmd][0], "--object") == Result(
            1, "", "qemu-img: missing argument for option '--object'\n" + USAGE_TAIL)
    assert not Path("out.img").exists() and Path("a.img").read_bytes() == before


@pytest.mark.parametrize(("cmd", "bad", "err"), [
    ("commit", ["-r", "x"], "qemu-img: Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n"
                            "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"),
    ("map", ["--start-offset", "x"], "qemu-img: Invalid start offset specified. You may use k, M, G, T, P or E "
                                      "suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, "
                                      "petabytes and exabytes.\n"),
    ("measure", ["--output", "x"], "qemu-img: --output must be used with human or json as argument.\n"),
    ("resize", ["--preallocation", "x"], "qemu-img: Invalid preallocation mode 'x'\n"),
    ("create", ["-o", ",x"], "qemu-img: Invalid option list: ,x\n"),
    ("convert", ["-S", "3"], "qemu-img: Invalid buffer size for sparse output specified. Valid sizes are "
                             "multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully "
                             "allocates output).\n"),
    ("snapshot", ["-l", "-a", "s"], "qemu-img: Cannot mix '-l', '-a', '-c', '-d'\n" + USAGE_TAIL),
])
def test_the_first_bad_option_is_the_one_reported(cmd: str, bad: list[str], err: str) -> None:
    # qemu-img handles options one by one, so whichever of --object and a bad value comes first stops it.
    assert img(cmd, *bad, "--object", OBJECT, *TAKES[cmd][0]) == Result(1, "", err)
    assert img(cmd, "--object", OBJECT, *bad, *TAKES[cmd][0]) == Result(1, "", NO_OBJECT)


@pytest.mark.parametrize(("cmd", "plain", "keyval"), [
    ("info", ["--output=json", "-f", "raw", "a.img"], ["--output=json", KEYVAL]),
    ("map", ["--output=json", "-f", "raw", "a.img"], ["--output=json", KEYVAL]),
    ("measure", ["-O", "raw", "-f", "raw", "a.img"], ["-O", "raw", KEYVAL]),
    ("compare", ["-f", "raw", "-F", "raw", "a.img", "b.img"], [KEYVAL, "driver=raw,file.filename=b.img"]),
])
def test_image_opts_opens_the_same_image(cmd: str, plain: list[str], keyval: list[str]) -> None:
    expected = img(cmd, *plain)
    assert expected.rc == 0 and expected.out
    assert img(cmd, "--image-opts", *keyval) == expected
    assert img(cmd, *keyval[:-1], "--force-sh", "--image-opt", keyval[-1]) == expected  # long-option prefixes


@pytest.mark.parametrize("cmd", [c for c in TAKES if "--image-opts" in TAKES[c][1] and c != "snapshot"])
def test_image_opts_and_format_are_mutually_exclusive(cmd: str) -> None:
    code = 2 if cmd == "compare" else 1
    r = img(cmd, "--image-opts", "-f", "raw", *[KEYVAL if a == "a.img" else a for a in TAKES[cmd][0]])
    assert r == Result(code, "", "qemu-img: --image-opts and --format are mutually exclusive\n")


def test_common_flags_take_shared_switches_in_command_line_order() -> None:
    common = CommonFlags()
    seen = []
    for key, value in common.own([("q", None), ("f", "raw"), ("U", None), ("image-opts", None), ("p", None)]):
        seen.append((key, value))
    assert seen == [("f", "raw"), ("p", None)]
    assert (common.quiet, common.force_share, common.image_opts) == (True, True, True)
    own = CommonFlags(object_code=2).own([("f", "raw"), ("object", OBJECT), ("p", None)])
    assert next(own) == ("f", "raw")  # options before --object reach the subcommand first
    with pytest.raises(ImgExit) as e:
        next(own)
    assert e.value.code == 2 and e.value.lines == [NO_OBJECT.removeprefix("qemu-img: ").rstrip()]


def test_shared_long_lists_only_the_named_switches() -> None:
    assert shared_long("object") == {"object": (True, "object")}
    assert shared_long("image-opts", "force-share") == {"image-opts": (False, "image-opts"),
                                                        "force-share": (False, "U")}


@pytest.mark.parametrize("cmd", sorted(TAKES))
@pytest.mark.parametrize("flag", ["--he", "--hel", "-h"])
def test_an_abbreviated_help_prints_help_and_runs_nothing(cmd: str, flag: str, tmp_path: Path) -> None:
    """getopt_long takes any unambiguous prefix of --help: qemu-img prints its help and writes no file."""
    before = sorted(p.name for p in tmp_path.iterdir())
    r = img(cmd, *TAKES[cmd][0][:-1], flag, TAKES[cmd][0][-1])
    assert (r.rc, r.err) == (0, "")
    assert r.lines[1] == "usage: blockgraph img command [command options]"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
@pytest.mark.parametrize("cmd", ["info", "map", "check"])
def test_image_opts_with_a_bare_name_is_a_node_reference(cmd: str) -> None:
    """A bare word after --image-opts names an existing node; there is none, so both tools fail alike."""
    real = subprocess.run(["qemu-img", cmd, "--image-opts", "a.img"], capture_output=True, text=True)
    r = img(cmd, "--image-opts", "a.img")
    assert (r.rc, r.out, r.err) == (real.returncode, real.stdout, real.stderr)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
@pytest.mark.parametrize("args", [["commit", "-r", "x", "-Z", "a.img"], ["bench", "-c", "x", "--bogus", "a.img"],
                                  ["convert", "-S", "x", "-Z", "a.img", "b.img"], ["info", "-Z", "-f"],
                                  ["map", "--output=x", "--nope", "a.img"], ["check", "-r", "x", "-Z", "a.img"]])
def test_the_first_bad_option_is_reported_first(args: list[str]) -> None:
    """qemu-img checks each value inside its getopt loop: a bad value beats a later unknown option."""
    real = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    r = img(*args)
    assert (r.rc, r.out, r.err) == (real.returncode, real.stdout, real.stderr)
