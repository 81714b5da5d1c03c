"""The pytest plugin every blockgraph install publishes (``pytest11`` entry point ``blockgraph``).

It gives plugin authors and blockgraph's own tests the same few fixtures:

``bg_runner``      an :class:`asyncio.Runner`; ``bg_runner.run(coro)`` drives async code from a plain test.
``bg_plugins``     a factory: ``bg_plugins(module, (obj, "name"), autoload=True)`` -> a fresh
                   :class:`~blockgraph.plugins.PluginHost` with those plugins registered in-process.
``bg_new_session`` a factory: ``bg_new_session(host=None)`` -> a :class:`~blockgraph.session.Session`,
                   closed (on ``bg_runner``) when the test ends.
``bg_session``     ``bg_new_session()`` with the installed plugins.
``bg_tmp_image``   a factory: ``bg_tmp_image(size=1 MiB, data=None, name="test.img")`` -> path of a
                   raw image in ``tmp_path``.
``null_node``      a ``null-co`` node (``read-zeroes=on``, 64 MiB) opened in ``bg_session``.

and registers the markers ``interop`` and ``slow``. Temporary plugins are registered on a
per-test host, never on a global manager. Imports stay lazy so that coverage sees blockgraph.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

MARKERS = (
    "interop: needs a real peer (qemu-img, qemu-io, ...); skipped only when the peer is missing",
    "slow: takes more than a few seconds (venv builds, large images)",
)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)


def _as_plugin(item: Any) -> tuple[Any, str]:
    if isinstance(item, tuple):
        obj, name = item
        return obj, name
    name = getattr(item, "__name__", None) or type(item).__name__
    return item, name


@pytest.fixture
def bg_runner() -> Iterator[asyncio.Runner]:
    """A private event loop for the test; async fixtures below are closed on it."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def bg_plugins() -> Callable[..., Any]:
    """Build a PluginHost with extra in-process plugins: modules, objects, or ``(obj, name)`` pairs."""
    from blockgraph.plugins import PluginHost

    def make(*extra: Any, autoload: bool = True, load: Any = None, block: Any = ()) -> PluginHost:
        return PluginHost(autoload=autoload, load=load, block=block, extra=[_as_plugin(e) for e in extra])

    return make


@pytest.fixture
def bg_new_session(bg_runner: asyncio.Runner) -> Iterator[Callable[..., Any]]:
    """Make sessions (optionally over a given PluginHost); each is closed when the test ends."""
    from blockgraph.session import Session

    made: list[Session] = []

    def make(host: Any = None, **kw: Any) -> Session:
        session = Session(plugins=host, **kw)
        made.append(session)
        return session

    yield make
    for session in reversed(made):
        bg_runner.run(session.close())


@pytest.fixture
def bg_session(bg_new_session: Callable[..., Any]) -> Any:
    """A Session with the installed plugins, closed at teardown."""
    return bg_new_session()


@pytest.fixture
def bg_tmp_image(tmp_path: Path) -> Callable[..., Path]:
    """Create raw images in ``tmp_path``: sparse zeros of ``size`` bytes, or ``data`` padded to ``size``."""
    counter = iter(range(1 << 30))

    def make(size: int = 1 << 20, data: bytes | None = None, name: str | None = None) -> Path:
        path = tmp_path / (name or f"test{next(counter) or ''}.img")
        with open(path, "wb") as f:
            if data:
                f.write(data[:size])
            f.truncate(size)
        return path

    return make


@pytest.fixture
def null_node(bg_session: Any, bg_runner: asyncio.Runner) -> Any:
    """A 64 MiB ``null-co`` node with ``read-zeroes=on``; skipped when blockgraph-null is not installed."""
    from blockgraph.errors import DriverNotFound

    try:
        bg_session.registry.driver("null-co")
    except DriverNotFound as e:
        pytest.skip(str(e))
    return bg_runner.run(bg_session.open_node(
        {"driver": "null-co", "node-name": "null0", "size": 64 << 20, "read-zeroes": True}))
