"""qcow2 on-disk constants (docs/interop/qcow2.txt). Stable names: check/snapshot/amend build on them."""

from __future__ import annotations

MAGIC = b"QFI\xfb"
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104
QEMU_V3_HEADER_LEN = 112  # what qemu-img 7.2 writes: compression_type byte plus 7 bytes of padding

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_NAME = 1023
MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_HOST_OFFSET = 1 << 56

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

# The feature name table QEMU 7.2 writes, in its order: (type, bit, name); type 0 incompat, 1 compat, 2 autoclear.
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"), (0, 3, "compression type"),
    (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
)

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# L1 / L2 entry bits.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

SUBCLUSTERS = 32  # per cluster with extended L2 entries
EXTL2_MIN_CLUSTER = 16384

DEFAULT_CLUSTER_SIZE = 65536
MiB = 1 << 20
DEFAULT_L2_CACHE_MAX = 32 * MiB  # Linux default cap (DEFAULT_L2_CACHE_MAX_SIZE)
MIN_REFCOUNT_CACHE_CLUSTERS = 4
MIN_L2_CACHE_ENTRIES = 2  # slices, as QEMU's MIN_L2_CACHE_SIZE
DEFAULT_CACHE_CLEAN_INTERVAL = 600


class ClusterType:
    """What a guest cluster (or subcluster, with extended L2) maps to (QEMU's QCow2SubclusterType)."""

    UNALLOCATED = 0  # read from the backing file, or zeros
    ZERO_PLAIN = 1  # reads zeros, no host cluster
    ZERO_ALLOC = 2  # reads zeros, host cluster preallocated
    NORMAL = 3  # data at a host offset
    COMPRESSED = 4  # compressed data at a host byte offset
    UNALLOCATED_ALLOC = 5  # extended L2: host cluster exists but this subcluster reads from backing
    # Only from ``Image.lookup(..., for_write=True)``: allocated, but shared (refcount > 1, no COPIED flag).
    NORMAL_SHARED = 6
    ZERO_ALLOC_SHARED = 7
