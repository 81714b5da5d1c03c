"""The whole conformance suite for the ramdisk driver: blockgraph's kit does the work."""

from blockgraph.testing import DriverContract


class TestRamdisk(DriverContract):
    driver = "ramdisk"
    options = {"size": "1M"}  # the kit's default image size (DriverContract.size)
    invalid_options = {"size": "-1"}
