"""Run a mirror agent with test seams (``daemon.mirror.consumer.Faults``) injected through its constructor.

    python -m tests.seams --drop OP:PATH --stall-file F [--stall-volume V] [--fail-sync-file F] -- mirror --config C [--log-format json ...]

The production entry point (``volmirror``) has no way to set these; tests use this one instead of
environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from daemon import logsetup
from daemon.config import load
from daemon.mirror.agent import MirrorAgent
from daemon.mirror.consumer import Faults


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--drop", help="OP:PATH — lose this op of this path (a lost change)")
    p.add_argument("--stall-file", help="every apply fails like a full disk while this file exists")
    p.add_argument("--stall-volume", help="with --stall-file: only the applies of this volume fail")
    p.add_argument("--fail-sync-file", help="every durability point fails like a failed fsync while this file exists")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    rest = [x for x in a.rest if x != "--"]
    q = argparse.ArgumentParser()
    q.add_argument("kind", choices=["mirror"])
    q.add_argument("--config", required=True)
    q.add_argument("--log-format", default="json")
    q.add_argument("--log-level", default="debug")
    b = q.parse_args(rest)
    cfg = load(b.config)
    logsetup.setup(b.log_format, b.log_level)
    faults = Faults(drop=tuple(a.drop.split(":", 1)) if a.drop else None, stall_file=a.stall_file, stall_volume=a.stall_volume,
                    sync_file=a.fail_sync_file)  # type: ignore[arg-type]
    try:
        asyncio.run(MirrorAgent(cfg, faults=faults).run())
    except asyncio.CancelledError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
