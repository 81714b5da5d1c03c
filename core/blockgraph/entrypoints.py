"""Find the entry points of one group without importing importlib.metadata.

``importlib.metadata`` costs ~18 ms to import (email, zipfile, csv...), more than
scanning the ``*.dist-info`` folders on ``sys.path`` ourselves. Anything this
scanner cannot read (a zip or egg on ``sys.path``) falls back to the stdlib.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import attrs


@attrs.frozen
class EntryPoint:
    name: str
    value: str
    dist: str
    version: str

    def load(self) -> object:
        import importlib

        module, _, attr = self.value.partition(":")
        obj = importlib.import_module(module.strip())
        for part in attr.strip().split(".") if attr else ():
            obj = getattr(obj, part)
        return obj


def _parse(text: str, group: str) -> list[tuple[str, str]]:
    out, current = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == group and "=" in line:
            name, _, value = line.partition("=")
            out.append((name.strip(), value.strip()))
    return out


def _dist_name(info_dir: str, fallback: str) -> str:
    try:
        with open(os.path.join(info_dir, "METADATA"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("Name:"):
                    return line[5:].strip()
                if not line.strip():
                    break
    except OSError:
        pass
    return fallback


def _scan(group: str) -> Iterator[EntryPoint] | None:
    seen: set[str] = set()
    found: list[EntryPoint] = []
    for entry in sys.path:
        path = entry or "."
        if not os.path.isdir(path):
            if os.path.exists(path):
                return None  # a zip or egg: leave it to importlib.metadata
            continue
        try:
            names = os.listdir(path)
        except OSError:
            continue
        for name in names:
            if not name.endswith(".dist-info"):
                continue
            stem = name[: -len(".dist-info")]
            dist_key, _, version = stem.partition("-")
            key = dist_key.lower().replace("-", "_").replace(".", "_")
            if key in seen:
                continue  # an earlier sys.path entry shadows this distribution
            seen.add(key)
            info_dir = os.path.join(path, name)
            try:
                with open(os.path.join(info_dir, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            if f"[{group}]" not in text:
                continue
            dist = _dist_name(info_dir, dist_key)
            found.extend(EntryPoint(n, v, dist, version) for n, v in _parse(text, group))
        if path.endswith(".egg") or any(n.endswith(".egg-info") for n in names):
            return None
    return iter(found)


def entry_points(group: str) -> list[EntryPoint]:
    """The entry points of ``group`` from every installed distribution."""
    scanned = _scan(group)
    if scanned is not None:
        return list(scanned)
    from importlib.metadata import entry_points as stdlib_entry_points

    return [EntryPoint(ep.name, ep.value, ep.dist.name if ep.dist else "?", ep.dist.version if ep.dist else "?")
            for ep in stdlib_entry_points(group=group)]
