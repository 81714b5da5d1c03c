"""The server side of the fixed newstyle handshake (proto.md "Option haggling").

:func:`negotiate` answers options until the client picks an export with
NBD_OPT_GO or NBD_OPT_EXPORT_NAME (and returns what was agreed) or leaves.
Malformed options get NBD_REP_ERR_INVALID; anything that leaves the stream out
of step (bad magic, unknown client flags, oversized option) raises
:class:`~blockgraph_nbd.protocol.ProtocolError` so that the caller drops the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from . import protocol as P
from .server_export import NbdExport

if TYPE_CHECKING:
    from .server_io import Channel

Opt, Rep, Info = P.Opt, P.Rep, P.Info


@attrs.define
class Agreed:
    """What the handshake settled: the export, structured replies, the selected meta contexts."""

    export: NbdExport
    structured: bool = False
    contexts: list[tuple[int, str]] = attrs.Factory(list)


class _OptionRefused(Exception):
    def __init__(self, rep: Rep, message: str) -> None:
        super().__init__(message)
        self.rep, self.message = rep, message


def _name(option: int) -> str:
    try:
        return "NBD_OPT_" + Opt(option).name
    except ValueError:
        return "unknown"


class Negotiation:
    def __init__(self, ch: Channel, find: Callable[[str], NbdExport | None],
                 exports: Callable[[], list[NbdExport]]) -> None:
        self.ch, self.find, self.exports = ch, find, exports
        self.fixed = False
        self.no_zeroes = False
        self.structured = False
        self.meta_export: str | None = None
        self.meta: list[tuple[int, str]] = []

    async def _reply(self, option: int, rep: int, data: bytes = b"") -> None:
        await self.ch.send([P.encode_option_reply(option, rep, data)])

    async def run(self) -> Agreed | None:
        await self.ch.send([P.HELLO.pack(P.NBDMAGIC, P.IHAVEOPT)
                            + P.HANDSHAKE_FLAGS.pack(P.HandshakeFlag.FIXED_NEWSTYLE | P.HandshakeFlag.NO_ZEROES)])
        (cflags,) = P.CLIENT_FLAGS.unpack(await self.ch.recv_exactly(P.CLIENT_FLAGS.size))
        if cflags & ~int(P.ClientFlag.FIXED_NEWSTYLE | P.ClientFlag.NO_ZEROES):  # int: ~IntFlag keeps known bits only
            raise P.ProtocolError(f"Unsupported client flags 0x{cflags:x}")
        self.fixed = bool(cflags & P.ClientFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(cflags & P.ClientFlag.NO_ZEROES)
        while True:
            option, length = P.decode_option_header(await self.ch.recv_exactly(P.OPTION_REQUEST.size))
            if length > P.MAX_OPTION_LENGTH:
                raise P.ProtocolError(f"option {_name(option)} of {length} bytes is too long")
            data = await self.ch.recv_exactly(length) if length else b""
            if option == Opt.EXPORT_NAME:
                return await self._export_name(data)
            if not self.fixed and option not in (Opt.LIST, Opt.ABORT):
                raise P.ProtocolError(f"Unsupported option {option} ({_name(option)}) without fixed newstyle")
            try:
                done = await self._option(option, data)
            except _OptionRefused as e:
                await self._reply(option, e.rep, e.message.encode())
                continue
            except P.ProtocolError as e:  # a malformed payload, fully read: the stream is still in step
                await self._reply(option, Rep.ERR_INVALID, str(e).encode())
                continue
            if done is not None:
                return done if isinstance(done, Agreed) else None

    async def _option(self, option: int, data: bytes) -> Agreed | bool | None:
        if option == Opt.ABORT:
            await self._reply(option, Rep.ACK)
            return False
        if option == Opt.LIST:
            if data:
                raise _OptionRefused(Rep.ERR_INVALID, "no argument expected")
            for exp in self.exports():
                await self._reply(option, Rep.SERVER, P.encode_server_reply(exp.name, exp.description))
            await self._reply(option, Rep.ACK)
            return None
        if option == Opt.STARTTLS:
            raise _OptionRefused(Rep.ERR_POLICY, "TLS not configured")
        if option in (Opt.INFO, Opt.GO):
            return await self._info(option, data)
        if option == Opt.STRUCTURED_REPLY:
            if data:
                raise _OptionRefused(Rep.ERR_INVALID, "no argument expected")
            if self.structured:
                raise _OptionRefused(Rep.ERR_INVALID, "structured reply already negotiated")
            self.structured = True
            await self._reply(option, Rep.ACK)
            return None
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            await self._meta(option, data)
            return None
        raise _OptionRefused(Rep.ERR_UNSUP, f"Unsupported option {option} ({_name(option)})")

    def _export(self, name: str) -> NbdExport:
        exp = self.find(name)
        if exp is None:
            raise _OptionRefused(Rep.ERR_UNKNOWN, f"export '{name}' not present")
        return exp

    async def _info(self, option: int, data: bytes) -> Agreed | None:
        name, requests = P.decode_info_go(data)
        exp = self._export(name)
        if Info.NAME in requests:
            await self._reply(option, Rep.INFO, P.encode_info_name(exp.name))
        if Info.DESCRIPTION in requests and exp.description:
            await self._reply(option, Rep.INFO, P.encode_info_description(exp.description))
        minimum, preferred, maximum = exp.block_sizes()
        asked = Info.BLOCK_SIZE in requests
        # Sent always, as QEMU does; a GO client that did not ask may ignore it, so it is told 1 (the
        # generic layer takes unaligned requests anyway).
        shown = minimum if asked or option == Opt.INFO else 1
        await self._reply(option, Rep.INFO, P.encode_info_block_size(shown, preferred, maximum))
        await self._reply(option, Rep.INFO, P.encode_info_export(exp.size(), exp.flags(self.structured)))
        if option == Opt.INFO and not asked and minimum > 1:
            raise _OptionRefused(Rep.ERR_BLOCK_SIZE_REQD,
                                 "request NBD_INFO_BLOCK_SIZE to use this export")
        await self._reply(option, Rep.ACK)
        if option == Opt.INFO:
            return None
        return self._agreed(exp)

    def _agreed(self, exp: NbdExport) -> Agreed:
        contexts = self.meta if self.meta_export == exp.name else []
        return Agreed(exp, self.structured, list(contexts))

    async def _export_name(self, data: bytes) -> Agreed:
        name = data.decode(errors="replace")
        exp = self.find(name)
        if exp is None:  # EXPORT_NAME has no error reply: the server just hangs up
            raise P.ProtocolError(f"export '{name}' not present")
        tail = b"" if self.no_zeroes else bytes(P.EXPORT_NAME_PAD)
        await self.ch.send([P.EXPORT_NAME_REPLY.pack(exp.size(), exp.flags(self.structured)) + tail])
        return self._agreed(exp)

    async def _meta(self, option: int, data: bytes) -> None:
        if not self.structured:
            raise _OptionRefused(Rep.ERR_INVALID, f"request option '{_name(option)}' when structured reply "
                                 "is not negotiated")
        name, queries = P.decode_meta_context_request(data)
        exp = self._export(name)
        listing = option == Opt.LIST_META_CONTEXT
        chosen = exp.match_contexts(queries, listing)
        for cid, cname in chosen:
            await self._reply(option, Rep.META_CONTEXT, P.encode_meta_context_reply(cid, cname))
        if not listing:
            self.meta_export, self.meta = exp.name, chosen
        await self._reply(option, Rep.ACK)
