"""vmdk's probe, importable without the driver (probing runs on every image opened without -f)."""


def probe(header: bytes, filename: str) -> int:
    from .format import probe as probe_header  # small; the driver module is not

    return probe_header(header)
