"""What both agents share at run time: signals → orderly stop, systemd notify, retries, snapshots.

* :class:`StopSignal` turns SIGTERM/SIGINT into an asyncio event (a second signal exits at once).
* :func:`sd_notify` speaks the systemd notify protocol (``READY=1``, ``STOPPING=1``, ``STATUS=``)
  when ``NOTIFY_SOCKET`` is set, so units can use ``Type=notify``.
* :func:`retry_transient` keeps retrying start-up steps that fail with a TransientError (broker
  not up yet) with capped backoff and a log line per attempt; permanent errors pass straight through.
* :func:`write_snapshot` writes the JSON status atomically into the state directory, so
  ``volmirror status`` can still say something (marked stale) when the agent is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from .errors import TransientError

log = logging.getLogger("volmirror")
T = TypeVar("T")


def sd_notify(msg: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(msg.encode())
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


class StopSignal:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._count = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._fire, sig)

    def _fire(self, sig: int) -> None:
        self._count += 1
        if self._count > 1:
            log.warning("second %s: exiting immediately", signal.Signals(sig).name)
            os._exit(130)
        log.info("received %s, stopping", signal.Signals(sig).name)
        sd_notify("STOPPING=1")
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


class _Stop(Exception):
    pass


async def supervise(stop: StopSignal, *coros: Awaitable[Any]) -> None:
    """Run long-lived coroutines in one TaskGroup until ``stop`` fires (or one of them fails).

    A stop cancels every task and waits for them; a failure in any task cancels the others and
    propagates, so nothing is fire-and-forget. Failures propagate as an :class:`ExceptionGroup` (one
    member per failed task, the stop sentinel removed); the CLI maps it to the exit code of its first
    :class:`~daemon.errors.VolmirrorError` (``daemon.cli.exit_code_for``).
    """

    async def stopper() -> None:
        await stop.wait()
        raise _Stop

    try:
        async with asyncio.TaskGroup() as tg:
            for c in coros:
                tg.create_task(c)  # type: ignore[arg-type]
            tg.create_task(stopper())
    except* _Stop:
        pass


async def retry_transient(what: str, fn: Callable[[], Awaitable[T]], stop: asyncio.Event, *, max_backoff: float = 30.0) -> T:
    delay = 1.0
    while True:
        try:
            return await fn()
        except TransientError as e:
            log.warning("%s failed: %s; retrying in %.0f s", what, e, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
        if stop.is_set():
            raise asyncio.CancelledError
        delay = min(delay * 2, max_backoff)


def write_snapshot(state_dir: Path, data: dict[str, Any]) -> None:
    path = state_dir / "status.json"
    tmp = state_dir / ".status.json.tmp"
    try:
        tmp.write_text(json.dumps({**data, "written_at": time.time()}, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot write status snapshot: %s", e)


async def periodic(interval: float, fn: Callable[[], Awaitable[None] | None], *, name: str) -> None:
    """Call ``fn`` every ``interval`` seconds until cancelled; an exception is logged, not fatal."""
    while True:
        try:
            r = fn()
            if asyncio.iscoroutine(r):
                await r
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", name)
        await asyncio.sleep(interval)
