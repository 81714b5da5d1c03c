"""Logging: structlog, bound per node, imported only when something is logged.

structlog costs ~40 ms to import, a quarter of the start-up budget, so
loggers here are thin proxies: a call below the configured level returns at
once and never imports structlog. CLI entry points call :func:`configure`.
"""

from __future__ import annotations

import sys
from typing import Any

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_state = {"level": 30, "json": False, "pending": True}


def configure(level: str = "warning", json: bool = False) -> None:
    """Set the level and renderer, once, at the edge (CLI, daemon).

    structlog is configured now if something already imported it, otherwise at
    the first event that passes the level filter.
    """
    _state.update(level=LEVELS[level], json=json, pending=True)
    if "structlog" in sys.modules:
        _structlog()


def _structlog() -> Any:
    import structlog

    if _state["pending"]:
        renderer = (structlog.processors.JSONRenderer() if _state["json"]
                    else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
        structlog.configure(
            processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                        structlog.processors.TimeStamper(fmt="iso"), renderer],
            wrapper_class=structlog.make_filtering_bound_logger(_state["level"]),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=False,
        )
        _state["pending"] = False
    return structlog


class Logger:
    """A structlog-compatible bound logger that defers importing structlog."""

    __slots__ = ("_ctx", "_name")

    def __init__(self, name: str, ctx: dict[str, Any] | None = None) -> None:
        self._name, self._ctx = name, ctx or {}

    def bind(self, **kw: Any) -> Logger:
        return Logger(self._name, {**self._ctx, **kw})

    def _emit(self, level: str, event: str, kw: dict[str, Any]) -> None:
        if LEVELS[level] < _state["level"]:
            return
        logger = _structlog().get_logger(self._name).bind(logger=self._name, **self._ctx)
        getattr(logger, level)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        if _state["level"] <= 10:
            self._emit("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        if _state["level"] <= 20:
            self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)


def get_logger(name: str) -> Logger:
    return Logger(name)
