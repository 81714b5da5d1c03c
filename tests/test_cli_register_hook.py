"""The ``blockgraph_register_cli`` contract as its hookspec documents it: ``main(argv, host) -> int``."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from blockgraph import hookspecs
from blockgraph.cli.main import main

PLUGIN = '''
import types
from blockgraph import hookimpl

def main(argv, host):
    print("argv=%r host=%s" % (argv, type(host).__name__))
    return 3 if argv == ["fail"] else None

@hookimpl
def blockgraph_register_cli(register):
    register(types.SimpleNamespace(main=main), name="hello", help="say hello")
'''


def test_cli_subcommand_gets_argv_and_host(tmp_path: Path) -> None:
    plugin = tmp_path / "hello_plugin.py"
    plugin.write_text(PLUGIN)
    for args, rc in ((["-x", "--y=1", "z"], 0), (["fail"], 3)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--plugin", str(plugin), "hello", *args]) == rc
        assert out.getvalue() == f"argv={args!r} host=PluginHost\n"
    doc = hookspecs.blockgraph_register_cli.__doc__ or ""
    assert "main(argv: list[str], host: PluginHost) -> int" in doc and "add_arguments" not in doc
