"""Option syntaxes: QEMU keyval, JSON, ``json:`` filenames, sizes and booleans, typed driver options.

Expected keyval errors were taken from qemu-img 7.2 (``qemu-img info --object '<keyval>' x``
reports keyval syntax errors before it looks at the object).
"""

from __future__ import annotations

import string
from typing import Any

import pytest
from blockgraph.errors import OptionError
from blockgraph.options import (
    flatten,
    parse_blockdev,
    parse_bool,
    parse_json,
    parse_keyval,
    parse_size,
    split_keyval,
    unflatten,
)
from hypothesis import given
from hypothesis import strategies as st

# ---------------------------------------------------------------- keyval


def test_dotted_keys_nest() -> None:
    assert parse_keyval("driver=qcow2,file.driver=file,file.filename=a.qcow2") == {
        "driver": "qcow2", "file": {"driver": "file", "filename": "a.qcow2"}}


def test_double_comma_is_a_literal_comma() -> None:
    assert parse_keyval("filename=a,,b,,,c=1") == {"filename": "a,b,", "c": "1"}
    assert split_keyval("a=x,,y,b=2") == ["a=x,y", "b=2"]


def test_implied_key_only_for_the_first_element() -> None:
    assert parse_blockdev("qcow2,node-name=n0,file=f0") == {"driver": "qcow2", "node-name": "n0", "file": "f0"}
    assert parse_keyval("driver=raw", implied_key="driver") == {"driver": "raw"}
    with pytest.raises(OptionError, match=r"^Expected '=' after parameter 'foo'$"):
        parse_keyval("qcow2,foo", implied_key="driver")
    with pytest.raises(OptionError, match=r"^Expected '=' after parameter 'qcow2'$"):
        parse_keyval("qcow2")


def test_implied_value_cannot_contain_a_comma() -> None:
    # QEMU's grammar: val-no-key = [^=,]+, so ",," ends the implied value and leaves an empty key.
    with pytest.raises(OptionError, match=r"^Invalid parameter ''$"):
        parse_keyval("secret,,x,id=s0", implied_key="qom-type")


def test_numbered_keys_build_lists() -> None:
    tree = parse_keyval("driver=quorum,children.0.file.filename=a,children.1.file.filename=b,children.1.driver=raw")
    assert tree["children"] == [{"file": {"filename": "a"}}, {"file": {"filename": "b"}, "driver": "raw"}]
    assert parse_keyval("a.1=y,a.0=x,a.2=") == {"a": ["x", "y", ""]}


@pytest.mark.parametrize(("text", "missing"), [
    ("a.1=x", "a.0"),
    ("a.0=x,a.2=y", "a.1"),
    ("a.1=y,a.3=z,a.0=q", "a.2"),
    ("b.c.1=x", "b.c.0"),
])
def test_list_gaps_are_refused(text: str, missing: str) -> None:
    with pytest.raises(OptionError, match=rf"^Parameter '{missing}' missing$"):
        parse_keyval(text)


@pytest.mark.parametrize(("text", "prefix"), [
    ("a=1,a.b=2", "a"),
    ("a.b=2,a=1", "a"),
    ("a.0=1,a.b=2", "a"),
    ("a.0=1,a.0.b=2", "a.0"),
    ("a.b=1,a.b.c=1", "a.b"),
])
def test_scalar_and_object_mixed_is_refused(text: str, prefix: str) -> None:
    with pytest.raises(OptionError, match=rf"^Parameters '{prefix}\.\*' used inconsistently$"):
        parse_keyval(text)


def test_later_duplicate_wins() -> None:
    assert parse_keyval("a=1,b=x,a=2") == {"a": "2", "b": "x"}
    assert parse_keyval("f.x=1,f.x=3") == {"f": {"x": "3"}}


def test_trailing_comma_and_empty_input() -> None:
    assert parse_keyval("a=1,") == {"a": "1"}
    assert parse_keyval("a=1,,,") == {"a": "1,"}
    assert parse_keyval("") == {}
    assert parse_keyval("a=") == {"a": ""}
    assert parse_keyval("a=1=2") == {"a": "1=2"}


@pytest.mark.parametrize("key", ["", "a..b", ".a", "a.", "_a", "a._b", "a.-b", "1a", "a.1x", "a%", "0", "a.-1"])
def test_invalid_keys_are_refused(key: str) -> None:
    with pytest.raises(OptionError, match=rf"^Invalid parameter '{__import__('re').escape(key)}'$"):
        parse_keyval(f"x=1,{key}=1")


def test_valid_key_characters() -> None:
    assert parse_keyval("a.B-c_d=1,x9=2") == {"a": {"B-c_d": "1"}, "x9": "2"}


def test_key_fragment_length_limit() -> None:
    ok = "a" + "b" * 126
    assert parse_keyval(f"{ok}=1") == {ok: "1"}
    long = "a" + "b" * 127
    with pytest.raises(OptionError, match=rf"^Parameter '{long}' is too long$"):
        parse_keyval(f"{long}=1")
    with pytest.raises(OptionError, match=rf"^Parameter fragment '{'b' * 128}' is too long$"):
        parse_keyval(f"a.{'b' * 128}.c=1")


def test_unflatten_flatten_inverse_on_example() -> None:
    tree = {"driver": "qcow2", "file": {"driver": "file", "filename": "x"}, "c": [{"d": "1"}, "2"]}
    flat = flatten(tree)
    assert flat == {"driver": "qcow2", "file.driver": "file", "file.filename": "x", "c.0.d": "1", "c.1": "2"}
    assert unflatten(flat) == tree


# ---------------------------------------------------------------- JSON


def test_json_keeps_types_and_accepts_flattened_keys() -> None:
    tree = parse_json('{"driver": "raw", "file.filename": "x.img", "file": {"driver": "file"}, '
                      '"read-only": true, "size": 4096}')
    assert tree == {"driver": "raw", "file": {"filename": "x.img", "driver": "file"}, "read-only": True,
                    "size": 4096}


def test_json_errors() -> None:
    with pytest.raises(OptionError, match="Invalid JSON"):
        parse_json('{"driver": ')
    with pytest.raises(OptionError, match="must be an object"):
        parse_json("[1, 2]")


def test_parse_blockdev_json_versus_keyval() -> None:
    assert parse_blockdev('{"driver": "raw", "read-only": true, "file": {"driver": "file", "filename": "a"}}') == {
        "driver": "raw", "read-only": True, "file": {"driver": "file", "filename": "a"}}
    assert parse_blockdev("  {\"driver\": \"raw\"}") == {"driver": "raw"}
    assert parse_blockdev("raw,read-only=on,file.filename=a") == {
        "driver": "raw", "read-only": "on", "file": {"filename": "a"}}


def test_json_filename_is_opened_with_flattened_keys(tsession: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=4096, data=b"\x5a" * 4096)
    spec = f'json:{{"driver": "raw", "offset": 512, "size": 1024, "file.filename": "{path}"}}'
    node = bg_runner.run(tsession.open_image(spec))
    assert (node.driver_name, node.length) == ("raw", 1024)
    assert node.file.node.driver_name == "file"


# ---------------------------------------------------------------- sizes and booleans


@pytest.mark.parametrize(("text", "value"), [
    ("512", 512), ("0", 0), ("1b", 1), ("1B", 1), ("1.5k", 1536), ("0.5K", 512), ("1.5G", 1610612736),
    ("5.", 5), ("1.0", 1), ("1.0b", 1), ("5.k", 5120), (" 5k", 5120), ("010", 10), ("0x10", 16), ("0X10", 16),
    ("1.5e", 1729382256910270464), ("1.5E", 1729382256910270464), ("7E", 8070450532247928832),
    ("8191P", 9222246136947933184), ("1.2345678m", 1294538), ("0.0000000001k", 0),
    ("9223372036854775807", 9223372036854775807), (4096, 4096),
])
def test_parse_size_accepts_what_qemu_accepts(text: Any, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "1.5", "0.1", ".5", ".5k", "5.5b", "5 k", "5k ", "1x", "1e3", "1kb", "-1", "", "k", "0x1.8k",
    "8E", "16E", "9223372036854775808", "18446744073709551615", True, None, 1.5, -5,
])
def test_parse_size_refuses_what_qemu_refuses(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_default_suffix() -> None:
    assert parse_size("2", default_suffix="M") == 2 << 20
    assert parse_size("2k", default_suffix="M") == 2048


@pytest.mark.parametrize(("text", "value"), [
    ("on", True), ("yes", True), ("true", True), ("y", True), (True, True),
    ("off", False), ("no", False), ("false", False), ("n", False), (False, False),
])
def test_parse_bool(text: Any, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["ON", "Y", "True", "1", "0", "", 1, None])
def test_parse_bool_refuses_other_spellings(text: Any) -> None:
    # QEMU: "Parameter 'read-only' expects 'on' or 'off'" for ON, Y, True, 1.
    with pytest.raises(ValueError, match="'on' or 'off'"):
        parse_bool(text)


# ---------------------------------------------------------------- properties

NAME = st.text(string.ascii_lowercase, min_size=1, max_size=4).flatmap(
    lambda head: st.text(string.ascii_letters + string.digits + "-_", max_size=6).map(lambda tail: head + tail))
VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


def _trees(depth: int) -> st.SearchStrategy[Any]:
    leaf = VALUE
    if depth == 0:
        return leaf
    sub = _trees(depth - 1)
    return st.one_of(
        leaf,
        st.dictionaries(NAME, sub, min_size=1, max_size=3),
        st.lists(sub, min_size=1, max_size=3),
    )


TREES = st.dictionaries(NAME, _trees(3), min_size=1, max_size=4)


@given(TREES)
def test_flatten_unflatten_round_trip(tree: dict[str, Any]) -> None:
    assert unflatten(flatten(tree)) == tree


def _keyval_text(tree: dict[str, Any]) -> str:
    return ",".join(f"{k}={str(v).replace(',', ',,')}" for k, v in flatten(tree).items())


@given(TREES)
def test_keyval_round_trip_with_escaped_commas(tree: dict[str, Any]) -> None:
    assert parse_keyval(_keyval_text(tree)) == tree


@given(st.lists(st.text(alphabet=",ab=", max_size=8), min_size=1, max_size=4))
def test_comma_escaping_round_trips_any_value(values: list[str]) -> None:
    text = ",".join(f"k{i}={v.replace(',', ',,')}" for i, v in enumerate(values))
    assert parse_keyval(text) == {f"k{i}": v for i, v in enumerate(values)}


@given(st.text(max_size=30))
def test_keyval_never_crashes(text: str) -> None:
    try:
        tree = parse_keyval(text, implied_key="driver")
    except OptionError:
        return
    assert isinstance(tree, dict)


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_parse_size_of_plain_integers(n: int) -> None:
    assert parse_size(str(n)) == n
    assert parse_size(n) == n


# ---------------------------------------------------------------- typed driver options through Session


def _file_spec(path: Any, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path), **extra}


@pytest.mark.parametrize(("spec", "driver", "option"), [
    ({"bogus": "1"}, "raw", "bogus"),
    ({"offset": "abc"}, "raw", "offset"),
    ({"size": [1, 2]}, "raw", "size"),
    ({"read-only": "maybe"}, "raw", "read-only"),
    ({"detect-zeroes": "sometimes"}, "raw", "detect-zeroes"),
    ({"cache": {"direct": "perhaps"}}, "raw", "cache.direct"),
    ({"file": _file_spec("{path}", aio="bogus")}, "file", "aio"),
    ({"file": _file_spec("{path}", bogus=1)}, "file", "bogus"),
    ({"file": _file_spec("{path}", locking="maybe")}, "file", "locking"),
])
def test_bad_options_name_node_driver_and_option(tsession: Any, bg_runner: Any, bg_tmp_image: Any,
                                                 spec: dict[str, Any], driver: str, option: str) -> None:
    path = bg_tmp_image()
    tree = {"driver": "raw", "node-name": "top", "file": _file_spec(path)}
    for key, value in spec.items():
        if key == "file":
            value = {k: (str(path) if v == "{path}" else v) for k, v in value.items()}
        tree[key] = value
    with pytest.raises(OptionError) as info:
        bg_runner.run(tsession.open_node(tree))
    err = info.value
    assert (err.driver, err.option) == (driver, option)
    assert err.node == ("top" if driver == "raw" else err.node)
    assert err.node and err.node.startswith("top" if driver == "raw" else "#block")
    # The message is QEMU's where QEMU has one: it names the option, never a generated node.
    assert f"'{option}'" in str(err) and "#block" not in str(err)
    assert tsession.nodes == {}  # nothing stays open


def test_bad_option_of_a_protocol_driver_opened_alone(tsession: Any, bg_runner: Any) -> None:
    with pytest.raises(OptionError) as info:
        bg_runner.run(tsession.open_node({"driver": "null-co", "node-name": "n", "size": "1x"}))
    assert (info.value.node, info.value.driver, info.value.option) == ("n", "null-co", "size")
    with pytest.raises(OptionError) as info:
        bg_runner.run(tsession.open_node({"driver": "null-co", "node-name": "n", "latency-ns": -1}))
    assert info.value.option == "latency-ns"


def test_missing_required_option(tsession: Any, bg_runner: Any) -> None:
    with pytest.raises(OptionError) as info:
        bg_runner.run(tsession.open_node({"driver": "file", "node-name": "f"}))
    assert (info.value.node, info.value.driver, info.value.option) == ("f", "file", "filename")
    with pytest.raises(OptionError, match="Parameter 'driver' is missing"):
        bg_runner.run(tsession.open_node({"node-name": "x"}))


def test_keyval_strings_and_json_values_give_the_same_options(tsession: Any, bg_runner: Any,
                                                              bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=8192)
    a = bg_runner.run(tsession.open_node(parse_blockdev(
        f"raw,node-name=a,offset=1k,size=2k,read-only=on,file.driver=file,file.filename={path}")))
    b = bg_runner.run(tsession.open_node(parse_blockdev(
        f'{{"driver": "raw", "node-name": "b", "offset": 1024, "size": 2048, "read-only": true,'
        f' "file": {{"driver": "file", "filename": "{path}"}}}}')))
    assert a.options == b.options
    assert (a.length, a.read_only) == (b.length, b.read_only) == (2048, True)
