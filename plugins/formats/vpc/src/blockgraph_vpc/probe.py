"""vpc's probe, importable without the driver (probing runs on every image opened without -f)."""

COOKIE = b"conectix"


def probe(header: bytes, filename: str) -> int:
    """QEMU's vpc_probe: the footer copy at the start of a dynamic disk begins with the "conectix" cookie."""
    return 100 if header[:8] == COOKIE else 0
