"""Units of the VHD structures: sector bitmaps, checksums, geometry, locator decoding."""

from __future__ import annotations

from blockgraph_vpc import format as fmt
from blockgraph_vpc.driver import _bits, _set_bits
from hypothesis import given
from hypothesis import strategies as st


def _ref_bits(bm: bytes, first: int, count: int) -> list[bool]:
    return [bool(bm[s >> 3] & (0x80 >> (s & 7))) for s in range(first, first + count)]


@given(st.binary(min_size=1, max_size=64), st.data())
def test_bitmap_runs_and_marking(raw: bytes, data: st.DataObject) -> None:
    n = len(raw) * 8
    first = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(1, n - first))
    bits = _ref_bits(raw, first, count)
    state, run = _bits(raw, first, count)
    want = 1
    while want < count and bits[want] == bits[0]:
        want += 1
    assert (state, run) == (bits[0], want)
    bm = bytearray(raw)
    changed = _set_bits(bm, first, count)
    assert changed == (not all(bits))
    assert all(_ref_bits(bm, first, count))
    outside = [i for i in range(n) if not first <= i < first + count]
    assert [_ref_bits(bm, i, 1) for i in outside] == [_ref_bits(raw, i, 1) for i in outside]


def test_footer_round_trip_and_checksum() -> None:
    footer = fmt.new_footer(fmt.TYPE_DYNAMIC, 10 << 20, fmt.geometry(20480), False, 512)
    raw = footer.pack()
    assert raw[:8] == fmt.COOKIE and len(raw) == 512
    back = fmt.Footer.parse(raw)
    footer.checksum = back.checksum  # pack() computes it
    assert back == footer and back.stored_checksum_ok(raw)
    assert not back.stored_checksum_ok(raw[:100] + b"\x01" + raw[101:])


def test_geometry_spec_examples() -> None:
    assert fmt.geometry(20480) == (301, 4, 17)
    assert fmt.rounded_geometry(10 << 20, False) == ((302, 4, 17), 20536)  # qemu-img's 10M image
    assert fmt.rounded_geometry(200 << 30, False)[1] == (200 << 30) // 512  # past CHS: the exact size
    assert fmt.rounded_geometry(1000 * 512, True) == ((65535, 16, 255), 1000)


def test_locator_decoding() -> None:
    assert fmt.decode_locator(fmt.PLAT_W2RU, ".\\dir\\p.vhd".encode("utf-16-le") + b"\0\0") == "dir/p.vhd"
    assert fmt.decode_locator(fmt.PLAT_W2KU, "C:\\x\\p.vhd".encode("utf-16-le")) == "C:/x/p.vhd"
    assert fmt.decode_locator(fmt.PLAT_MACX, b"file://localhost/srv/p.vhd") == "/srv/p.vhd"
    assert fmt.decode_locator(fmt.PLAT_MACX, b"file:///srv/p.vhd") == "/srv/p.vhd"
    assert fmt.decode_locator(b"Wi2r", b"whatever") is None
    assert fmt.decode_parent_name("p.vhd".encode("utf-16-be").ljust(512, b"\0")) == "p.vhd"
