"""``blockgraph plugins``: what is installed and what each distribution provides."""

from __future__ import annotations

import argparse
import json

from ..driver import Capabilities, Concurrency
from ..errors import BlockGraphError
from ..plugins import PluginHost


def main(argv: list[str], host: PluginHost) -> int:
    parser = argparse.ArgumentParser(prog="blockgraph plugins")
    parser.add_argument("--output", choices=("human", "json"), default="human")
    parser.add_argument("--dump", metavar="DRIVER", help="print a driver's API version, limits and capabilities")
    args = parser.parse_args(argv)
    if args.dump:
        return _dump(host, args.dump)
    rows = []
    for info in host.plugins:
        provides = {
            "drivers": sorted(n for n, e in host.drivers.items() if e.plugin == info.name),
            **{kind: sorted(n for n, e in table.items() if e.plugin == info.name)
               for kind, table in host.tables.items()},
        }
        rows.append({"name": info.name, "dist": info.dist, "version": info.version, "module": info.module,
                     "error": info.error, **{k: v for k, v in provides.items() if v}})
    if args.output == "json":
        print(json.dumps(rows, indent=4))
        return 0
    for row in rows:
        head = f"{row['dist']} {row['version']}".strip()
        print(f"{head} (entry point '{row['name']}', {row['module']})")
        if row["error"]:
            print(f"    FAILED TO LOAD: {row['error']}")
        for kind in ("drivers", "jobs", "devices", "exports", "object_types", "qmp_commands", "cli"):
            if row.get(kind):
                print(f"    {kind.replace('_', ' ')}: {', '.join(row[kind])}")
    return 0


def _dump(host: PluginHost, name: str) -> int:
    try:
        cls = host.driver(name)
    except BlockGraphError as e:
        print(f"blockgraph plugins: {e}")
        return 1
    entry = host.driver_entry(name)
    print(f"name={cls.name}")
    print(f"dist={entry.dist}")
    print(f"kind={cls.kind.value}")
    print(f"api_version={cls.api_version}")
    concurrency = getattr(cls, "concurrency", Concurrency.SERIALIZE_REQUESTS)
    print(f"concurrency={concurrency.value}")
    for line in Capabilities.of(cls).lines():
        print(line)
    return 0
