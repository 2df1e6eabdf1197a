"""Per-volume commands run around a restore point (``point_pre_command``, ``point_post_command``).

A restore point is crash-consistent by itself: every file was read at a quiescent moment, so the
mirror can roll back to a state the volume really had. An application may need more than that to
open its files cleanly, or faster: a database checkpointing its WAL into the main file, a file
system frozen (``fsfreeze``), a backup-mode switch. The pre-command runs before a point is taken;
the point then waits for the volume to be quiet again (the command's own writes are replicated
first) and the post-command runs after the point was acknowledged, or when no point followed within
``point_hook_timeout`` (a freeze is never left on).

Commands run through ``/bin/sh -c`` in their own process group, with ``VOLMIRROR_VOLUME``,
``VOLMIRROR_ROOT``, ``VOLMIRROR_PHASE`` (pre|post) and, after a point, ``VOLMIRROR_POINT`` (its id)
in the environment. A command that runs longer than the timeout is killed (its whole group).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class HookResult:
    ok: bool
    why: str  # "" when ok; "exit N", "killed by signal N", "timed out after T s", "could not start: ..."
    seconds: float
    output: str  # the last 2,000 characters of stdout+stderr


async def run_hook(command: str, env: dict[str, str], timeout: float) -> HookResult:
    """Run ``command`` with ``env`` added to the agent's environment; never raises (a hook that
    cannot start is a failed hook, reported like one that exits non-zero)."""
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True,
        )
    except OSError as e:
        return HookResult(False, f"could not start: {e}", time.monotonic() - t0, "")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        _kill_group(proc.pid)
        out = b""
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 5.0)
        except (asyncio.TimeoutError, ValueError):
            pass
        return HookResult(False, f"timed out after {timeout:g} s", time.monotonic() - t0, _tail(out))
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        raise
    rc = proc.returncode
    took = time.monotonic() - t0
    if rc == 0:
        return HookResult(True, "", took, _tail(out))
    why = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit {rc}"
    return HookResult(False, why, took, _tail(out))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(out: bytes | None) -> str:
    return (out or b"")[-2000:].decode("utf-8", "replace").strip()
