"""``-drive`` I/O throttling: the legacy spellings, the ``throttling.*`` options and QEMU's checks.

QEMU keeps ``-drive`` limits on the BlockBackend (a throttle group member),
not on a node; the expansion shows them on the backend in the same way.
"""

from __future__ import annotations

from typing import Any

from ..errors import OptionError
from .qemuopts import get_number

# Legacy -drive spellings and what QEMU renames them to (blockdev.c, drive_new); the
# *_max_length forms were never -drive spellings, so QEMU 7.2 refuses them and so do we.
RENAMES: tuple[tuple[str, str], ...] = (
    ("iops", "throttling.iops-total"), ("iops_rd", "throttling.iops-read"),
    ("iops_wr", "throttling.iops-write"), ("bps", "throttling.bps-total"),
    ("bps_rd", "throttling.bps-read"), ("bps_wr", "throttling.bps-write"),
    ("iops_max", "throttling.iops-total-max"), ("iops_rd_max", "throttling.iops-read-max"),
    ("iops_wr_max", "throttling.iops-write-max"), ("bps_max", "throttling.bps-total-max"),
    ("bps_rd_max", "throttling.bps-read-max"), ("bps_wr_max", "throttling.bps-write-max"),
    ("iops_size", "throttling.iops-size"), ("group", "throttling.group"),
    ("readonly", "read-only"),
)

BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
VALUE_MAX = 1_000_000_000_000_000  # THROTTLE_VALUE_MAX

# query-block's names for the limits (BlockDeviceInfo), by bucket.
QUERY_NAMES = {"bps-total": "bps", "bps-read": "bps_rd", "bps-write": "bps_wr",
               "iops-total": "iops", "iops-read": "iops_rd", "iops-write": "iops_wr"}


def rename_legacy(opts: dict[str, str]) -> None:
    """Rewrite legacy keys in place; an alias together with its target is an error, as in QEMU."""
    for old, new in RENAMES:
        if old not in opts:
            continue
        if new in opts:
            raise OptionError(f"'{new}' and its alias '{old}' can't be used at the same time")
        value = opts.pop(old)
        opts[new] = value


def extract(opts: dict[str, Any]) -> tuple[dict[str, int], str | None]:
    """Take the ``throttling.*`` options out of ``opts``: (limits with non-default values, group)."""
    limits: dict[str, int] = {}
    for bucket in BUCKETS:
        for suffix, default in (("", 0), ("-max", 0), ("-max-length", 1)):
            key = f"{bucket}{suffix}"
            value = get_number(opts, f"throttling.{key}", default)
            if value != default:
                limits[key] = value
    size = get_number(opts, "throttling.iops-size", 0)
    if size:
        limits["iops-size"] = size
    group = opts.pop("throttling.group", None)
    validate(limits)
    return limits, group


def validate(limits: dict[str, int]) -> None:
    """QEMU's throttle_is_valid, with its messages."""
    def get(key: str, default: int = 0) -> int:
        return limits.get(key, default)

    for suffix in ("", "-max"):
        for kind in ("bps", "iops"):
            if get(f"{kind}-total{suffix}") and (get(f"{kind}-read{suffix}") or get(f"{kind}-write{suffix}")):
                raise OptionError("bps/iops/max total values and read/write values cannot be used at the same time")
    if get("iops-size") and not (get("iops-total") or get("iops-read") or get("iops-write")):
        raise OptionError("iops size requires an iops value to be set")
    for bucket in BUCKETS:
        avg, peak, length = get(bucket), get(f"{bucket}-max"), get(f"{bucket}-max-length", 1)
        if avg > VALUE_MAX or peak > VALUE_MAX or avg < 0 or peak < 0:
            raise OptionError(f"bps/iops/max values must be within [0, {VALUE_MAX}]")
        if not length:
            raise OptionError("the burst length cannot be 0")
        if length > 1 and not peak:
            raise OptionError("burst length set without burst rate")
        if peak and length > VALUE_MAX // peak:
            raise OptionError("burst length too high for this burst rate")
        if peak and not avg:
            raise OptionError("bps_max/iops_max require corresponding bps/iops values")
        if peak and peak < avg:
            raise OptionError("bps_max/iops_max cannot be lower than bps/iops")


def enabled(limits: dict[str, int]) -> bool:
    return any(limits.get(b) or limits.get(f"{b}-max") for b in BUCKETS)


def query_fields(limits: dict[str, int] | None, group: str | None) -> dict[str, Any]:
    """The throttle fields of query-block's ``inserted`` as QEMU fills them."""
    out: dict[str, Any] = {QUERY_NAMES[b]: (limits or {}).get(b, 0) for b in BUCKETS}
    if not limits or not enabled(limits):
        return out
    for b in BUCKETS:
        if limits.get(f"{b}-max"):
            out[f"{QUERY_NAMES[b]}_max"] = limits[f"{b}-max"]
            out[f"{QUERY_NAMES[b]}_max_length"] = limits.get(f"{b}-max-length", 1)
    if limits.get("iops-size"):
        out["iops_size"] = limits["iops-size"]
    out["group"] = group
    return out
