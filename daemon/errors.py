"""The one error hierarchy of volmirror.

Every error raised on purpose inside the daemon is a :class:`VolmirrorError`. Its class says how the
caller should react (retry, give up, reject one event, fix the config) and carries the process exit
code the CLI uses when the error reaches it. OS errors are wrapped at the I/O boundary with the
operation and the path (:func:`os_error`), so a log line always says what was being done to what.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure, or (for `verify`) drift found
EXIT_CONFIG = 2  # bad config / bad usage / verify could not run


class VolmirrorError(Exception):
    """Base of every deliberate volmirror error."""

    exit_code = EXIT_FAILURE


class ConfigError(VolmirrorError):
    """The configuration is invalid; ``key`` names the offending key (dotted path)."""

    exit_code = EXIT_CONFIG

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


class TransientError(VolmirrorError):
    """Something that may succeed if retried (broker unreachable, file busy)."""


class PublishError(TransientError):
    """Kafka did not take or did not acknowledge records; the batch is retried."""


class StateError(TransientError):
    """The agent's state_dir cannot be written (disk full, I/O error): state rolled back to the last
    durable point; the agent reports it and retries until space returns."""


class DurabilityError(StateError):
    """Applied data could not be made durable (fsync or syncfs failed): everything applied since the
    last durable point is suspect, so the mirror goes back to that point and applies it again."""


class PermanentError(VolmirrorError):
    """Retrying will not help (topic cannot be created, state directory unwritable)."""


class IntegrityError(VolmirrorError):
    """Data does not match what it claims to be (hash mismatch, torn read)."""


class FileChangedError(TransientError):
    """A file changed while it was being read; it must be re-queued, never published torn."""

    def __init__(self, path: str) -> None:
        super().__init__(f"file changed during hashing: {path}")
        self.path = path


class RejectedEvent(VolmirrorError):
    """An event from the stream that must not be applied.

    ``reason`` is a short, bounded label used as the metric label value (``malformed``,
    ``bad_schema``, ``unsafe_path``, ``symlink_escape``, ``hash_mismatch``, ...).
    """

    REASONS = (
        "malformed",
        "bad_schema",
        "unsafe_path",
        "symlink_escape",
        "hash_mismatch",
        "key_mismatch",
        "too_large",
        "conflict",
        "future_seq",
    )

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def os_error(op: str, path: str, err: OSError) -> TransientError | PermanentError:
    """Wrap an OSError with the operation and path that caused it."""
    import errno

    msg = f"{op} {path}: {err.strerror or err}"
    if err.errno in (errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETXTBSY):
        return TransientError(msg)
    return PermanentError(msg)
