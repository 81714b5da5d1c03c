"""Wire encoding round trips and the checks that catch a peer breaking the protocol."""

from __future__ import annotations

import errno

import pytest
from blockgraph_nbd import protocol as p


def test_request_round_trip_and_size() -> None:
    data = p.encode_request(p.Cmd.WRITE, 0xDEADBEEF, 4096, 512, p.CmdFlag.FUA)
    assert len(data) == 28
    assert p.decode_request(data) == p.Request(p.CmdFlag.FUA, p.Cmd.WRITE, 0xDEADBEEF, 4096, 512)


def test_bad_magics_are_protocol_errors() -> None:
    with pytest.raises(p.ProtocolError, match="bad request magic"):
        p.decode_request(b"\0" * 28)
    with pytest.raises(p.ProtocolError, match="bad reply magic"):
        p.decode_simple_reply(b"\1" * 16)
    with pytest.raises(p.ProtocolError, match="bad structured reply magic"):
        p.decode_chunk_header(b"\1" * 20)
    with pytest.raises(p.ProtocolError, match="bad option reply magic"):
        p.decode_option_reply(b"\1" * 20)


def test_simple_and_structured_replies() -> None:
    assert p.decode_simple_reply(p.encode_simple_reply(7, p.NBD_ENOSPC)) == p.SimpleReply(p.NBD_ENOSPC, 7)
    data = p.encode_offset_hole(9, 1024, 512, p.ReplyFlag.DONE)
    hdr = p.decode_chunk_header(data[:20])
    assert hdr == p.ChunkHeader(p.ReplyFlag.DONE, p.ReplyType.OFFSET_HOLE, 9, 12)
    assert p.HOLE_CHUNK.unpack(data[20:]) == (1024, 512)


def test_error_chunk_round_trip_and_length_check() -> None:
    data = p.encode_error_chunk(3, p.NBD_EIO, "disk on fire", offset=512)
    hdr = p.decode_chunk_header(data[:20])
    assert hdr.type == p.ReplyType.ERROR_OFFSET and p.reply_type_is_error(hdr.type)
    assert p.decode_error_chunk(hdr.type, data[20:]) == (p.NBD_EIO, "disk on fire", 512)
    with pytest.raises(p.ProtocolError, match="does not match"):
        p.decode_error_chunk(p.ReplyType.ERROR, data[20:])


def test_block_status_round_trip_and_malformed() -> None:
    data = p.encode_block_status(1, 2, [(4096, p.STATE_HOLE | p.STATE_ZERO), (512, 0)])
    ctx, ext = p.decode_block_status(data[20:])
    assert (ctx, ext) == (2, [(4096, 3), (512, 0)])
    with pytest.raises(p.ProtocolError, match="malformed"):
        p.decode_block_status(data[20:-1])


def test_option_payloads_round_trip() -> None:
    assert p.decode_info_go(p.encode_info_go("disk", [p.Info.BLOCK_SIZE])) == ("disk", [p.Info.BLOCK_SIZE])
    req = p.encode_meta_context_request("e", ["base:allocation", "qemu:dirty-bitmap:b0"])
    assert p.decode_meta_context_request(req) == ("e", ["base:allocation", "qemu:dirty-bitmap:b0"])
    assert p.decode_meta_context_reply(p.encode_meta_context_reply(5, "base:allocation")) == (5, "base:allocation")
    assert p.decode_server_reply(p.encode_server_reply("a", "desc")) == ("a", "desc")
    rep = p.encode_option_reply(p.Opt.GO, p.Rep.ERR_UNKNOWN, b"no")
    assert p.decode_option_reply(rep[:20]) == p.OptionReply(p.Opt.GO, p.Rep.ERR_UNKNOWN, 2)
    assert p.rep_is_error(p.Rep.ERR_UNKNOWN) and not p.rep_is_error(p.Rep.ACK)
    with pytest.raises(p.ProtocolError, match="too long"):
        p.decode_string(p.U32.pack(10) + b"abc")


def test_errno_mapping_both_ways() -> None:
    for nbd_err, local in [(p.NBD_EPERM, errno.EPERM), (p.NBD_EIO, errno.EIO), (p.NBD_ENOSPC, errno.ENOSPC),
                           (p.NBD_ENOTSUP, errno.ENOTSUP), (p.NBD_ESHUTDOWN, errno.ESHUTDOWN)]:
        assert p.errno_from_nbd(nbd_err) == local
        assert p.errno_to_nbd(local) == nbd_err
    assert p.errno_from_nbd(12345) == errno.EINVAL
    assert p.errno_to_nbd(errno.EROFS) == p.NBD_EPERM
    assert p.errno_to_nbd(errno.ENOENT) == p.NBD_EINVAL
