"""-drive throttling: legacy spellings, QEMU's checks and the query-block fields."""

from __future__ import annotations

import pytest
from blockgraph.cmdline import throttle
from blockgraph.errors import OptionError


def test_every_legacy_spelling_is_renamed() -> None:
    opts = {old: "1" for old, _ in throttle.RENAMES}
    throttle.rename_legacy(opts)
    assert set(opts) == {new for _, new in throttle.RENAMES}


def test_extract_keeps_only_set_values_and_removes_the_keys() -> None:
    opts = {"throttling.bps-total": "100", "throttling.bps-total-max": "200",
            "throttling.bps-total-max-length": "3", "throttling.group": "g", "other": "x"}
    limits, group = throttle.extract(opts)
    assert limits == {"bps-total": 100, "bps-total-max": 200, "bps-total-max-length": 3} and group == "g"
    assert opts == {"other": "x"}
    assert throttle.enabled(limits)
    assert not throttle.enabled({})


def test_query_fields_as_qemu_shows_them() -> None:
    assert throttle.query_fields(None, None) == {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0,
                                                 "iops_wr": 0}
    fields = throttle.query_fields({"bps-total": 100, "bps-total-max": 200, "iops-total": 10, "iops-size": 512}, "g")
    assert fields["bps_max"] == 200 and fields["bps_max_length"] == 1 and fields["iops_size"] == 512
    assert fields["group"] == "g" and "iops_max" not in fields


@pytest.mark.parametrize("limits", [{"iops-read-max": 20, "iops-read": 10}, {"bps-write": 10 ** 15}])
def test_valid_limits(limits: dict[str, int]) -> None:
    with pytest.raises(OptionError):
        throttle.validate({**limits, "bps-write-max-length": 2})
    throttle.validate(limits)
