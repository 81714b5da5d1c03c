"""Logs are structlog events bound with the node's name and driver, and cost nothing when filtered."""

from __future__ import annotations

import sys
from pathlib import Path

import blockgraph
import structlog
from blockgraph import log as bglog


def test_node_events_carry_node_name_and_driver(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(65536))
    bglog.configure("debug")
    try:
        with structlog.testing.capture_logs() as events:
            with blockgraph.open(f'json:{{"driver":"raw","node-name":"fmt0","file":{{"driver":"file",'
                                 f'"filename":"{img}","node-name":"proto0"}}}}'):
                pass
    finally:
        bglog.configure("warning")
    opened = {(e["node_name"], e["driver"]) for e in events if e["event"] == "node_opened"}
    assert opened == {("fmt0", "raw"), ("proto0", "file")}
    assert all(e["log_level"] == "debug" for e in events if e["event"] == "node_opened")


def test_filtered_levels_do_not_import_structlog() -> None:
    import subprocess

    code = ("import sys; from blockgraph.log import get_logger; get_logger('x').bind(a=1).debug('e'); "
            "get_logger('x').info('e'); print('structlog' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
