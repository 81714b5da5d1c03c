"""Helpers shared by the benchmark scripts: finding the tools, timing with hyperfine or a loop."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def blockgraph_cmd() -> list[str]:
    """``blockgraph`` from the project's venv when there is one, else from PATH.

    The workspace's sources are byte-compiled first, as ``pip install`` does for a wheel: with
    PYTHONDONTWRITEBYTECODE set (as in this sandbox) every run would otherwise compile them anew.
    """
    venv = ROOT / ".venv" / "bin" / "blockgraph"
    if venv.exists():
        import compileall

        for src in [ROOT / "core" / "blockgraph", *sorted((ROOT / "plugins").glob("*/*/src"))]:
            compileall.compile_dir(str(src), quiet=2)
        return [str(venv)]
    found = shutil.which("blockgraph")
    if not found:
        sys.exit("blockgraph is not installed (run from the project venv)")
    return [found]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        sys.exit(f"{tool} is not installed; this benchmark compares against it")
    return path


def scratch_dir() -> Path:
    base = os.environ.get("BENCH_DIR")
    path = Path(base) if base else Path(tempfile.gettempdir()) / "blockgraph-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def quote(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


def time_commands(commands: dict[str, list[str]], prepare: str, runs: int) -> dict[str, list[float]]:
    """Wall times of each command, ``prepare`` (a shell line) run before every run.

    Uses hyperfine when installed (one ``--prepare``, ``--warmup 1``); otherwise
    a loop that alternates the commands, so slow drifts of a noisy machine hit
    both alike.
    """
    if shutil.which("hyperfine") and not os.environ.get("BENCH_NO_HYPERFINE"):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            args = ["hyperfine", "-N", "--warmup", "1", "--runs", str(runs), "--prepare", quote(["sh", "-c", prepare]),
                    "--export-json", out.name, "--style", "basic"]
            for name, cmd in commands.items():
                args += ["-n", name, quote(cmd)]
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
            data = json.loads(Path(out.name).read_text())
        return {r["command"]: r["times"] for r in data["results"]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs + 1):
        for name, cmd in commands.items():
            subprocess.run(prepare, shell=True, check=True)
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t)
    return {name: ts[1:] for name, ts in times.items()}  # the first round warms up


def summary(ts: list[float]) -> str:
    return f"median {statistics.median(ts):.3f} s [min {min(ts):.3f}, max {max(ts):.3f}] over {len(ts)} runs"


def print_convert_ratio(times: dict[str, list[float]], indent: str = "") -> tuple[float, float]:
    """Print the two convert timings and their ratio (medians and best runs; the issues' target is <= 1.5x);
    returns the medians (qemu-img, blockgraph)."""
    q, b = statistics.median(times["qemu-img"]), statistics.median(times["blockgraph"])
    print(f"{indent}qemu-img convert:       {summary(times['qemu-img'])}")
    print(f"{indent}blockgraph img convert: {summary(times['blockgraph'])}")
    print(f"{indent}ratio blockgraph/qemu-img (medians): {b / q:.2f}x (target <= 1.5x); "
          f"best runs: {min(times['blockgraph']) / min(times['qemu-img']):.2f}x")
    return q, b


def peak_rss_kib(cmd: list[str], prepare: str) -> int:
    """Peak RSS of one run of ``cmd`` (KiB), from ``/usr/bin/time -v`` or getrusage of the child."""
    subprocess.run(prepare, shell=True, check=True)
    if Path("/usr/bin/time").exists():
        res = subprocess.run(["/usr/bin/time", "-v", *cmd], check=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        for line in res.stderr.splitlines():
            if "Maximum resident set size" in line:
                return int(line.rsplit(":", 1)[1])
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()
    return f"{os.cpu_count()} CPUs ({cpu}), {qemu[0] if qemu else 'qemu-img ?'}, Python {sys.version.split()[0]}"
