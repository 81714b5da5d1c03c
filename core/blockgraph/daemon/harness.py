"""Run ``blockgraph serve`` (or the real qemu-storage-daemon) as a subprocess with a QMP socket, for tests.

    with ServeProcess(tmp_path, ["--blockdev", "null-co,node-name=n0"]) as d:
        ...connect a QMP client to d.socket...
    assert d.returncode == 0
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BLOCKGRAPH = [sys.executable, "-m", "blockgraph.cli.main", "serve"]
QSD = ["qemu-storage-daemon"]


class ServeProcess:
    """A daemon with a QMP monitor on ``socket``; ready once its pid file exists (written after setup)."""

    def __init__(self, workdir: Path | str, args: list[str], *, program: list[str] | None = None,
                 name: str = "qmp", timeout: float = 30.0) -> None:
        workdir = Path(workdir)
        self.socket = str(workdir / f"{name}.sock")
        self.pidfile = str(workdir / f"{name}.pid")
        self.program = program or BLOCKGRAPH
        self.args = [*args, "--chardev", f"socket,id={name},path={self.socket},server=on,wait=off",
                     "--monitor", f"chardev={name}", "--pidfile", self.pidfile]
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.stderr = ""

    def start(self) -> ServeProcess:
        for path in (self.socket, self.pidfile):
            if os.path.exists(path):
                os.unlink(path)
        self.proc = subprocess.Popen([*self.program, *self.args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(self.pidfile) or os.path.getsize(self.pidfile) == 0:
            if self.proc.poll() is not None:
                self.wait()
                raise RuntimeError(f"daemon exited with {self.returncode} during start-up:\n{self.stderr}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"daemon did not start within {self.timeout} s:\n{self.stderr}")
            time.sleep(0.02)
        return self

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout or self.timeout)
        self.stderr += err or ""
        self.stdout = out or ""
        self.returncode = self.proc.returncode
        return self.returncode

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.returncode is None:
            self.stop()
