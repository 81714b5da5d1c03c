"""The bounded thread pool for blocking calls (``aio=threads``), with batched completions.

``loop.run_in_executor`` wakes the event loop once per finished call (a write
to its self-pipe, one loop iteration, a chained future). Here a worker that
finishes appends its result to a list and wakes the loop only if no wake-up
is pending yet, so completions that land close together are delivered in one
loop iteration.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class _LoopInbox:
    """Finished calls waiting to be delivered to one event loop."""

    __slots__ = ("done", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.done: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        self.pending = False


class BlockingPool:
    """At most ``workers`` threads, started on demand, running blocking calls for coroutines."""

    def __init__(self, workers: int, name: str = "blockgraph-io") -> None:
        self._workers, self._name = workers, name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._inboxes: dict[asyncio.AbstractEventLoop, _LoopInbox] = {}
        self._closed = False

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` on a worker; the returned future resolves on the calling loop."""
        if self._closed:
            raise RuntimeError("the blocking pool is shut down")
        loop = asyncio.get_running_loop()
        inbox = self._inboxes.get(loop)
        if inbox is None:
            inbox = self._inboxes.setdefault(loop, _LoopInbox(loop))
        fut = loop.create_future()
        self._jobs.put((inbox, fut, fn, args))
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._workers:
                t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        return fut

    def _work(self) -> None:
        jobs, lock = self._jobs, self._lock
        while True:
            item = jobs.get()
            if item is _STOP:
                return
            inbox, fut, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as e:  # delivered to the awaiting coroutine
                result, error = None, e
            with lock:
                inbox.done.append((fut, result, error))
                wake = not inbox.pending
                inbox.pending = True
                self._idle += 1
            if wake:
                try:
                    inbox.loop.call_soon_threadsafe(self._deliver, inbox)
                except RuntimeError:  # the loop is closed; nobody is waiting any more
                    pass

    def _deliver(self, inbox: _LoopInbox) -> None:
        with self._lock:
            done, inbox.done = inbox.done, []
            inbox.pending = False
        for fut, result, error in done:
            if fut.cancelled():
                continue
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

    def shutdown(self) -> None:
        """Stop the workers after the calls already queued."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(_STOP)
        for t in self._threads:
            t.join()
        self._threads.clear()
