"""A file name no file can have (a NUL byte, as a corrupt image's backing name may hold) is an OpenError."""

from __future__ import annotations

from pathlib import Path

import blockgraph
import pytest
from blockgraph.errors import OpenError


def test_a_name_with_a_nul_byte_is_an_open_error(tmp_path: Path) -> None:
    name = f"{tmp_path}/a\\u0000b"
    with pytest.raises(OpenError, match="No such file or directory"):
        blockgraph.open(f'json:{{"driver":"file","filename":"{name}"}}')
