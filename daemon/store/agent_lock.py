"""One agent per state directory, and a way for offline commands to know none is running.

An agent holds an exclusive ``flock`` on ``<state_dir>/<role>-agent.lock`` for its whole life (the
kernel drops it when the process dies, even by SIGKILL). A second agent on the same state directory
is refused before it touches anything; commands that must not run beside the agent (an in-place
restore, ``volmirror seed``) take the same lock for as long as they work.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import EXIT_CONFIG, VolmirrorError


class AgentRunning(VolmirrorError):
    """The state directory is in use by a running agent (or a command holding its lock)."""

    exit_code = EXIT_CONFIG


class AgentLock:
    def __init__(self, state_dir: Path, role: str) -> None:
        self.path = state_dir / f"{role}-agent.lock"
        self.role = role
        self.fd: int | None = None

    def acquire(self, what: str) -> "AgentLock":
        """Take the lock or raise AgentRunning naming the holder; ``what``: who wants it (for the message)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise AgentRunning(f"{what}: the {self.role} agent's state directory {self.path.parent} is in use "
                               f"({holder or 'by another process'}; lock {self.path}). "
                               f"Stop it first (systemctl stop volmirror-{self.role})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {what}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
