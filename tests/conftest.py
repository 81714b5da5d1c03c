"""Core tests: make ``tests/helpers_*.py`` importable and give a session with the in-test drivers.

The general fixtures (bg_runner, bg_plugins, bg_new_session, bg_tmp_image, ...) come from the
``blockgraph.testing.plugin`` pytest plugin.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def tsession(bg_plugins: Any, bg_new_session: Any) -> Any:
    """A Session with the installed plugins plus the in-test drivers of ``helpers_drivers``."""
    from helpers_drivers import drivers_plugin

    return bg_new_session(bg_plugins(drivers_plugin()))
