"""Every installed driver against the driver contract (nbdkit's foreach_plugin, QEMU's iotests matrix).

One DriverContract (or FilterContract) class per installed driver for which
:mod:`blockgraph.testing.defaults` knows a default option set; every other driver must be listed in
``COVERED_ELSEWHERE`` with the place that runs the kit on it. A plugin's own
``tests/test_contract.py`` goes further (windows, cache.direct, declared guarantees); this file
makes sure nothing installed escapes the kit.
"""

from __future__ import annotations

import pytest
from blockgraph.plugins import PluginHost
from blockgraph.testing.defaults import contract_class

HOST = PluginHost()
INSTALLED = sorted(HOST.drivers)
KNOWN: dict[str, type] = {}
UNKNOWN: dict[str, str] = {}
for _name in INSTALLED:
    _found = contract_class(_name, HOST)
    if isinstance(_found, str):
        UNKNOWN[_name] = _found
    else:
        KNOWN[_name] = _found
        globals()[_found.__name__] = _found  # collected by pytest like any Test* class


def test_every_first_party_driver_is_covered() -> None:
    for name in ("file", "null-co", "null-aio", "raw"):
        if name in INSTALLED:
            assert name in KNOWN, UNKNOWN.get(name)


# Drivers the kit cannot open with defaults, and where their conformance run lives instead.
COVERED_ELSEWHERE = {
    "host_device": "plugins/protocols/file/tests/test_contract.py (on a loop device)",
    "nbd": "plugins/protocols/nbd/tests/test_client_contract.py (against qemu-nbd)",
}


@pytest.mark.parametrize("driver", sorted(UNKNOWN))
def test_drivers_without_defaults_are_covered_elsewhere(driver: str) -> None:
    assert driver in COVERED_ELSEWHERE, f"{UNKNOWN[driver]}: give it defaults or a conformance run of its own"
