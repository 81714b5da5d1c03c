"""qcow2 runtime and create options, with QEMU's names, defaults and error texts (qcow2.c read_cache_sizes)."""

from __future__ import annotations

import attrs
from blockgraph.errors import OptionError
from blockgraph.options import one_of, opt, optional, parse_bool, parse_int, parse_size, parse_str

from .constants import (
    DEFAULT_CACHE_CLEAN_INTERVAL,
    DEFAULT_L2_CACHE_MAX,
    MIN_L2_CACHE_ENTRIES,
    MIN_REFCOUNT_CACHE_CLUSTERS,
)


@attrs.frozen(kw_only=True)
class Qcow2Options:
    lazy_refcounts: bool | None = opt(None, key="lazy-refcounts", converter=optional(parse_bool),
                                      help="Postpone refcount updates")
    pass_discard_request: bool | None = opt(None, key="pass-discard-request", converter=optional(parse_bool),
                                            help="Pass guest discard requests to the layer below")
    pass_discard_snapshot: bool = opt(True, key="pass-discard-snapshot", converter=parse_bool,
                                      help="Generate discard requests when snapshot related space is freed")
    pass_discard_other: bool = opt(False, key="pass-discard-other", converter=parse_bool,
                                   help="Generate discard requests when other clusters are freed")
    discard_no_unref: bool = opt(False, key="discard-no-unref", converter=parse_bool,
                                 help="Do not unreference discarded clusters")
    overlap_check: str | None = opt(None, key="overlap-check",
                                    converter=optional(one_of("none", "constant", "cached", "all")),
                                    help="Selects which overlap checks to perform from a range of templates")
    l2_cache_size: int | None = opt(None, key="l2-cache-size", converter=optional(parse_size),
                                    help="Maximum L2 table cache size")
    l2_cache_entry_size: int | None = opt(None, key="l2-cache-entry-size", converter=optional(parse_size),
                                          help="Size of each entry in the L2 cache")
    refcount_cache_size: int | None = opt(None, key="refcount-cache-size", converter=optional(parse_size),
                                          help="Maximum refcount block cache size")
    cache_size: int | None = opt(None, key="cache-size", converter=optional(parse_size),
                                 help="Maximum combined metadata (L2 tables and refcount blocks) cache size")
    cache_clean_interval: int = opt(DEFAULT_CACHE_CLEAN_INTERVAL, key="cache-clean-interval", converter=parse_int,
                                    help="Clean unused cache entries after this time (in seconds)")


def cache_sizes(o: Qcow2Options, cluster_size: int, virtual_size: int, l2_entry_size: int) -> tuple[int, int, int]:
    """(l2 cache bytes, l2 cache entry size, refcount cache bytes), validated as QEMU's read_cache_sizes."""
    min_refcount = MIN_REFCOUNT_CACHE_CLUSTERS * cluster_size
    max_l2_entries = -(-virtual_size // cluster_size)
    max_l2_cache = -(-(max_l2_entries * l2_entry_size) // cluster_size) * cluster_size
    l2, rc, combined = o.l2_cache_size, o.refcount_cache_size, o.cache_size
    if combined is not None:
        if l2 is not None and rc is not None:
            raise OptionError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
        if l2 is not None and l2 > combined:
            raise OptionError("l2-cache-size may not exceed cache-size")
        if rc is not None and rc > combined:
            raise OptionError("refcount-cache-size may not exceed cache-size")
        if l2 is not None:
            rc = combined - l2
        elif rc is not None:
            l2 = combined - rc
        else:
            l2 = min(max_l2_cache, max(combined - min_refcount, 0))
            rc = combined - l2
    else:
        if l2 is None:
            l2 = min(max_l2_cache, DEFAULT_L2_CACHE_MAX)
        if rc is None:
            rc = min_refcount
    entry = o.l2_cache_entry_size if o.l2_cache_entry_size is not None else min(cluster_size, 4096)
    if entry < 512 or entry > cluster_size or entry & (entry - 1):
        raise OptionError(f"L2 cache entry size must be a power of two between 512 and the cluster size "
                          f"({cluster_size})")
    if l2 // entry > 0x7FFFFFFF:
        raise OptionError("L2 cache size too big")
    if rc // cluster_size > 0x7FFFFFFF:
        raise OptionError("Refcount cache size too big")
    if o.cache_clean_interval < 0 or o.cache_clean_interval > 0xFFFFFFFF:
        raise OptionError("Cache clean interval too big")
    return l2, entry, rc


def cache_entries(l2_bytes: int, l2_entry_size: int, rc_bytes: int, cluster_size: int) -> tuple[int, int]:
    """Cache capacities in entries (L2 slices, refcount blocks), with QEMU's minimums."""
    return (max(MIN_L2_CACHE_ENTRIES, l2_bytes // l2_entry_size),
            max(MIN_REFCOUNT_CACHE_CLUSTERS, rc_bytes // cluster_size))


@attrs.frozen(kw_only=True)
class Qcow2CreateOptions:
    """Declared in the order qemu-img prints them on its ``Formatting`` line."""

    encryption: bool = opt(False, converter=parse_bool,
                           help="Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)")
    encrypt_format: str | None = opt(None, key="encrypt.format", converter=optional(parse_str),
                                     help="Encrypt the image, format choices: 'aes', 'luks'")
    encrypt_cipher_alg: str | None = opt(None, key="encrypt.cipher-alg", converter=optional(parse_str),
                                         help="Name of encryption cipher algorithm")
    encrypt_cipher_mode: str | None = opt(None, key="encrypt.cipher-mode", converter=optional(parse_str),
                                          help="Name of encryption cipher mode")
    encrypt_hash_alg: str | None = opt(None, key="encrypt.hash-alg", converter=optional(parse_str),
                                       help="Name of encryption hash algorithm")
    encrypt_iter_time: int | None = opt(None, key="encrypt.iter-time", converter=optional(parse_int),
                                        help="Time to spend in PBKDF in milliseconds")
    encrypt_ivgen_alg: str | None = opt(None, key="encrypt.ivgen-alg", converter=optional(parse_str),
                                        help="Name of IV generator algorithm")
    encrypt_ivgen_hash_alg: str | None = opt(None, key="encrypt.ivgen-hash-alg", converter=optional(parse_str),
                                             help="Name of IV generator hash algorithm")
    encrypt_key_secret: str | None = opt(None, key="encrypt.key-secret", converter=optional(parse_str),
                                         help="ID of secret providing qcow AES key or LUKS passphrase")
    cluster_size: int = opt(65536, converter=parse_size, help="qcow2 cluster size")
    extended_l2: bool = opt(False, converter=parse_bool, help="Extended L2 tables")
    preallocation: str = opt("off", converter=one_of("off", "metadata", "falloc", "full"),
                             help="Preallocation mode (allowed values: off, metadata, falloc, full)")
    compression_type: str = opt("zlib", converter=one_of("zlib", "zstd"),
                                help="Compression method used for image cluster compression")
    size: int = opt(converter=parse_size, help="Virtual disk size")
    compat: str | None = opt(None, converter=optional(parse_str), help="Compatibility level (v2 [0.10] or v3 [1.1])")
    backing_file: str | None = opt(None, converter=optional(parse_str), help="File name of a base image")
    backing_fmt: str | None = opt(None, converter=optional(parse_str), help="Image format of the base image")
    data_file: str | None = opt(None, converter=optional(parse_str), help="File name of an external data file")
    data_file_raw: bool = opt(False, converter=parse_bool,
                              help="The external data file must stay valid as a raw image")
    lazy_refcounts: bool = opt(False, converter=parse_bool, help="Postpone refcount updates")
    refcount_bits: int = opt(16, converter=parse_int, help="Width of a reference count entry in bits")


CREATE_SHOWN_DEFAULTS = {"cluster_size": "65536", "extended_l2": "off", "compression_type": "zlib",
                         "lazy_refcounts": "off", "refcount_bits": "16"}


def compat_version(value: str | None) -> int:
    """The header version for a ``compat`` value (QEMU's error text names the QAPI member 'version')."""
    if value is None or value in ("1.1", "v3"):
        return 3
    if value in ("0.10", "v2"):
        return 2
    raise OptionError(f"Parameter 'version' does not accept value '{value}'")
