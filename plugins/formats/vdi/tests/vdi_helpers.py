"""Helpers of the vdi tests: the shared interop helpers with vdi as the default format."""

from asyncio import run as arun

from blockgraph.testing.peers import QEMU_IMG, QEMU_IO, bg, for_format, needs_qemu, qemu_raw, run

__all__ = ["QEMU_IMG", "QEMU_IO", "arun", "bg", "create", "needs_qemu", "qemu_raw", "read_all", "run", "with_image",
           "write_at"]
_bound = for_format("vdi")
with_image, read_all, write_at, create = _bound["with_image"], _bound["read_all"], _bound["write_at"], _bound["create"]
