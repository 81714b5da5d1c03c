"""The NBD wire protocol (NetworkBlockDevice doc/proto.md), shared by the client and the server.

Only constants and pure encode/decode helpers live here: no I/O. Every integer on the
wire is big-endian. Names follow proto.md without the ``NBD_`` prefix.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Sequence
from typing import NamedTuple

# -- magics -------------------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes from any server
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle server magic, and prefix of every option request
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

DEFAULT_PORT = 10809
MAX_STRING = 4096  # longest export name / description / context name a peer must accept
MAX_BUFFER = 32 * 1024 * 1024  # QEMU's NBD_MAX_BUFFER_SIZE: largest READ/WRITE payload
MAX_OPTION_LENGTH = 64 * 1024  # refuse larger option payloads rather than buffer them
MIN_BLOCK = 512  # default minimum/preferred block size when the server sends no NBD_INFO_BLOCK_SIZE


class HandshakeFlag(enum.IntFlag):
    """Server's 16-bit handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client's 32-bit reply to the handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export transmission flags (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types; the ERR_ ones have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT | 10


def rep_is_error(rep: int) -> bool:
    return bool(rep & REP_ERROR_BIT)


def rep_name(rep: int) -> str:
    try:
        return "NBD_REP_" + Rep(rep).name
    except ValueError:
        return f"NBD_REP_{rep:#x}"


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    NONE = 0
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    NONE = 0
    DONE = 1 << 0


REPLY_TYPE_ERROR_BIT = 1 << 15


class ReplyType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = REPLY_TYPE_ERROR_BIT | 1
    ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2


def reply_type_is_error(t: int) -> bool:
    return bool(t & REPLY_TYPE_ERROR_BIT)


# -- meta contexts ----------------------------------------------------------------------------------

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1  # base:allocation
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME
# qemu:allocation-depth carries the depth itself: 0 unallocated, 1 this image, n the (n-1)th backing file.

# -- errors ---------------------------------------------------------------------------------------

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_NBD_TO_ERRNO = {
    NBD_EPERM: _errno.EPERM, NBD_EIO: _errno.EIO, NBD_ENOMEM: _errno.ENOMEM, NBD_EINVAL: _errno.EINVAL,
    NBD_ENOSPC: _errno.ENOSPC, NBD_EOVERFLOW: _errno.EOVERFLOW, NBD_ENOTSUP: _errno.ENOTSUP,
    NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}
_ERRNO_TO_NBD = {v: k for k, v in _NBD_TO_ERRNO.items()}
_ERRNO_TO_NBD.update({_errno.EROFS: NBD_EPERM, _errno.EFBIG: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC,
                      _errno.EOPNOTSUPP: NBD_ENOTSUP, _errno.ECANCELED: NBD_EIO})


def errno_from_nbd(err: int) -> int:
    """The local errno for an error a server sent; unknown values are EINVAL, as proto.md asks."""
    return _NBD_TO_ERRNO.get(err, _errno.EINVAL)


def errno_to_nbd(err: int) -> int:
    """The wire error for a local errno; anything without a wire value is EINVAL (as qemu-nbd)."""
    if err == 0:
        return 0
    return _ERRNO_TO_NBD.get(err, NBD_EINVAL)


# -- fixed-size headers -------------------------------------------------------------------------------

HELLO = struct.Struct(">QQ")  # NBDMAGIC, IHAVEOPT or OLDSTYLE_MAGIC
HANDSHAKE_FLAGS = struct.Struct(">H")
CLIENT_FLAGS = struct.Struct(">I")
OLDSTYLE_TAIL = struct.Struct(">QI124x")  # size, flags (32-bit: handshake in high, transmission in low)
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (then 124 zero bytes unless NO_ZEROES)
EXPORT_NAME_PAD = 124
OPTION_REQUEST = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # OPTION_REPLY_MAGIC, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
REPLY_MAGIC = struct.Struct(">I")  # to tell simple from structured replies
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # type, minimum, preferred, maximum
OFFSET_CHUNK = struct.Struct(">Q")  # OFFSET_DATA/OFFSET_HOLE start with the offset
HOLE_CHUNK = struct.Struct(">QI")  # offset, length
ERROR_CHUNK = struct.Struct(">IH")  # error, message length (then message; ERROR_OFFSET adds a u64 offset)
BLOCK_DESCRIPTOR = struct.Struct(">II")  # length, status flags
META_CONTEXT_ID = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke the protocol; the message says what was wrong."""


class Request(NamedTuple):
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


class SimpleReply(NamedTuple):
    error: int
    cookie: int


class ChunkHeader(NamedTuple):
    flags: int
    type: int
    cookie: int
    length: int


class OptionReply(NamedTuple):
    option: int
    type: int
    length: int


class BlockSize(NamedTuple):
    minimum: int
    preferred: int
    maximum: int


# -- requests -----------------------------------------------------------------------------------------

def encode_request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def decode_request(data: bytes | memoryview) -> Request:
    magic, flags, cmd, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, cmd, cookie, offset, length)


# -- replies ----------------------------------------------------------------------------------------

def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def decode_simple_reply(data: bytes | memoryview) -> SimpleReply:
    magic, error, cookie = SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError(f"bad reply magic {magic:#x}")
    return SimpleReply(error, cookie)


def encode_chunk_header(cookie: int, rtype: int, length: int, flags: int = 0) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def decode_chunk_header(data: bytes | memoryview) -> ChunkHeader:
    magic, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad structured reply magic {magic:#x}")
    return ChunkHeader(flags, rtype, cookie, length)


def encode_offset_data_header(cookie: int, offset: int, data_length: int, flags: int = 0) -> bytes:
    """Chunk header plus the offset of an OFFSET_DATA chunk; the payload follows."""
    return (encode_chunk_header(cookie, ReplyType.OFFSET_DATA, OFFSET_CHUNK.size + data_length, flags)
            + OFFSET_CHUNK.pack(offset))


def encode_offset_hole(cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return encode_chunk_header(cookie, ReplyType.OFFSET_HOLE, HOLE_CHUNK.size, flags) + HOLE_CHUNK.pack(offset, length)


def encode_error_chunk(cookie: int, error: int, message: str = "", offset: int | None = None,
                       flags: int = ReplyFlag.DONE) -> bytes:
    msg = message.encode()[:MAX_STRING]
    body = ERROR_CHUNK.pack(error, len(msg)) + msg
    rtype = ReplyType.ERROR
    if offset is not None:
        body += U64.pack(offset)
        rtype = ReplyType.ERROR_OFFSET
    return encode_chunk_header(cookie, rtype, len(body), flags) + body


def decode_error_chunk(rtype: int, payload: bytes | memoryview) -> tuple[int, str, int | None]:
    """(nbd error, message, offset or None) of an ERROR / ERROR_OFFSET chunk payload."""
    if len(payload) < ERROR_CHUNK.size:
        raise ProtocolError(f"error chunk of {len(payload)} bytes is too short")
    error, mlen = ERROR_CHUNK.unpack_from(payload)
    end = ERROR_CHUNK.size + mlen
    want = end + (U64.size if rtype == ReplyType.ERROR_OFFSET else 0)
    if len(payload) != want:
        raise ProtocolError(f"error chunk length {len(payload)} does not match its message length {mlen}")
    message = bytes(payload[ERROR_CHUNK.size:end]).decode(errors="replace")
    offset = U64.unpack_from(payload, end)[0] if rtype == ReplyType.ERROR_OFFSET else None
    if error == 0:
        raise ProtocolError("error chunk with error value 0")
    return error, message, offset


def encode_block_status(cookie: int, context_id: int, extents: list[tuple[int, int]],
                        flags: int = 0) -> bytes:
    body = META_CONTEXT_ID.pack(context_id) + b"".join(BLOCK_DESCRIPTOR.pack(n, s) for n, s in extents)
    return encode_chunk_header(cookie, ReplyType.BLOCK_STATUS, len(body), flags) + body


def decode_block_status(payload: bytes | memoryview) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags), ...]) of a BLOCK_STATUS chunk payload."""
    n = len(payload) - META_CONTEXT_ID.size
    if n < BLOCK_DESCRIPTOR.size or n % BLOCK_DESCRIPTOR.size:
        raise ProtocolError(f"block status chunk of {len(payload)} bytes is malformed")
    (ctx,) = META_CONTEXT_ID.unpack_from(payload)
    extents = [BLOCK_DESCRIPTOR.unpack_from(payload, off)
               for off in range(META_CONTEXT_ID.size, len(payload), BLOCK_DESCRIPTOR.size)]
    return ctx, extents


# -- options ----------------------------------------------------------------------------------------

def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_REQUEST.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes | memoryview) -> tuple[int, int]:
    """(option, length) of an option request header."""
    magic, option, length = OPTION_REQUEST.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return option, length


def encode_option_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rtype, len(data)) + data


def decode_option_reply(data: bytes | memoryview) -> OptionReply:
    magic, option, rtype, length = OPTION_REPLY.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return OptionReply(option, rtype, length)


def encode_string(s: str) -> bytes:
    """A u32-length-prefixed UTF-8 string (export names in INFO/GO, context names)."""
    b = s.encode()
    return U32.pack(len(b)) + b


def decode_string(data: bytes | memoryview, offset: int = 0) -> tuple[str, int]:
    """A u32-length-prefixed string at ``offset``; returns it and the offset after it."""
    if len(data) < offset + 4:
        raise ProtocolError("string length runs past the end of the option")
    (n,) = U32.unpack_from(data, offset)
    end = offset + 4 + n
    if n > MAX_STRING or end > len(data):
        raise ProtocolError(f"string of {n} bytes is too long or runs past the end of the option")
    return bytes(data[offset + 4:end]).decode(errors="replace"), end


def encode_info_go(name: str, infos: Sequence[int] = ()) -> bytes:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO: export name then the requested NBD_INFO types."""
    return encode_string(name) + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def decode_info_go(data: bytes | memoryview) -> tuple[str, list[int]]:
    name, off = decode_string(data)
    if len(data) < off + 2:
        raise ProtocolError("NBD_OPT_GO payload lacks the information request count")
    (n,) = U16.unpack_from(data, off)
    off += 2
    if len(data) != off + 2 * n:
        raise ProtocolError("NBD_OPT_GO payload length does not match its information request count")
    return name, [U16.unpack_from(data, off + 2 * i)[0] for i in range(n)]


def encode_info_export(size: int, tflags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, tflags)


def encode_info_name(name: str) -> bytes:
    return U16.pack(Info.NAME) + name.encode()


def encode_info_description(desc: str) -> bytes:
    return U16.pack(Info.DESCRIPTION) + desc.encode()


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_server_reply(name: str, description: str = "") -> bytes:
    """Payload of one NBD_REP_SERVER reply to NBD_OPT_LIST."""
    return encode_string(name) + description.encode()


def decode_server_reply(data: bytes | memoryview) -> tuple[str, str]:
    name, off = decode_string(data)
    return name, bytes(data[off:]).decode(errors="replace")


def encode_meta_context_request(export: str, queries: list[str]) -> bytes:
    """Payload of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT."""
    return encode_string(export) + U32.pack(len(queries)) + b"".join(encode_string(q) for q in queries)


def decode_meta_context_request(data: bytes | memoryview) -> tuple[str, list[str]]:
    export, off = decode_string(data)
    if len(data) < off + 4:
        raise ProtocolError("meta context request lacks the query count")
    (n,) = U32.unpack_from(data, off)
    off += 4
    queries = []
    for _ in range(n):
        q, off = decode_string(data, off)
        queries.append(q)
    if off != len(data):
        raise ProtocolError("meta context request has trailing bytes")
    return export, queries


def encode_meta_context_reply(context_id: int, name: str) -> bytes:
    return META_CONTEXT_ID.pack(context_id) + name.encode()


def decode_meta_context_reply(data: bytes | memoryview) -> tuple[int, str]:
    if len(data) < META_CONTEXT_ID.size:
        raise ProtocolError("NBD_REP_META_CONTEXT reply is too short")
    (ctx,) = META_CONTEXT_ID.unpack_from(data)
    return ctx, bytes(data[META_CONTEXT_ID.size:]).decode(errors="replace")
