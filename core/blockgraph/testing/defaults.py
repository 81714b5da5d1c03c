"""Default ways to run the contract on an installed driver (nbdkit's ``foreach_plugin``).

:func:`contract_class` builds a ``DriverContract`` (or ``FilterContract``) subclass for a driver
name, or returns the reason none is known:

* ``file``: a sparse image file in ``tmp_path``; persistent, discard reads zeros (hole punching).
* ``null-co`` / ``null-aio``: ``read-zeroes=on``; stores no data.
* a format whose ``create`` needs nothing but ``size``: the image is created by the driver
  itself over ``file``; persistent.
* a filter whose options all have defaults: ``FilterContract`` over ``testing-memdisk``.

Anything else (``host_device`` needs a device, protocols need servers) has no default; its own
``tests/test_contract.py`` covers it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import attrs

from ..driver import DriverKind
from ..errors import BlockGraphError
from ..options import option_fields, structure
from ..plugins import PluginHost
from ..session import Session
from .suite import DriverContract, FilterContract


def _required(options_cls: Any) -> set[str]:
    return {key for key, f in option_fields(options_cls).items() if f.default is attrs.NOTHING}


class _FileImage(DriverContract):
    persistent = True
    discard_reads_zero = True

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = tmp_path / "image.raw"
        with open(path, "wb") as f:
            f.truncate(size)
        return {"filename": str(path)}


class _Null(DriverContract):
    stores_data = False

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        return {"size": size, "read-zeroes": "on"}


class _CreatedFormat(DriverContract):
    persistent = True

    def make_options(self, tmp_path: Path, size: int) -> dict[str, Any]:
        path = tmp_path / f"image.{self.driver}"
        host = self.make_plugins()
        cls = host.driver(self.driver)

        async def create() -> None:
            session = Session(plugins=host)
            try:
                await cls.create(session, str(path), structure(cls.CreateOptions, {"size": size}, driver=self.driver))
                # A format may round the size up (vpc: to a CHS geometry); the kit tests the size the image got
                # (make_harness reads self.size after calling make_options).
                node = await session.open_node({"driver": self.driver, "read-only": True,
                                                "file": {"driver": "file", "filename": str(path)}})
                self.size = node.length
            finally:
                await session.close()

        asyncio.run(create())
        return {"file": {"driver": "file", "filename": str(path)}}


def contract_class(name: str, host: PluginHost | None = None) -> type[DriverContract] | str:
    """A conformance class for driver ``name``, or why there is no default option set for it."""
    host = host or PluginHost()
    try:
        cls = host.driver(name)
    except BlockGraphError as e:
        return f"driver '{name}' cannot be loaded: {e}"
    title = "TestConform_" + "".join(c if c.isalnum() else "_" for c in name)
    if name == "file":
        return type(title, (_FileImage,), {"driver": name})
    if name in ("null-co", "null-aio"):
        return type(title, (_Null,), {"driver": name})
    kind = DriverKind(cls.kind)
    if kind is DriverKind.FORMAT:
        create_opts = getattr(cls, "CreateOptions", None)
        if not callable(getattr(cls, "create", None)) or create_opts is None or not attrs.has(create_opts):
            return f"format '{name}' cannot create images, so there is no default image to test"
        if _required(create_opts) - {"size"}:
            return f"creating a '{name}' image needs {sorted(_required(create_opts) - {'size'})}, not only a size"
        if "file" not in host.drivers:
            return f"testing format '{name}' needs the file protocol (blockgraph-file)"
        return type(title, (_CreatedFormat,), {"driver": name})
    if kind is DriverKind.FILTER:
        if _required(cls.Options):
            return f"filter '{name}' needs options {sorted(_required(cls.Options))}"
        return type(title, (FilterContract,), {"driver": name})
    return f"no default option set known for protocol '{name}'"
