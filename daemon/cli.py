"""``volmirror <subcommand>``: argument parsing, logging set-up, exit codes. Nothing else.

Exit codes: 0 success; 1 runtime failure (``status``: a volume not protected, or the agent not
reachable; ``verify``: drift); 2 bad configuration or usage (the message names the key; ``verify``:
could not run). An agent's failure keeps its class's exit code (daemon/errors.py) even when it comes
out of the supervisor's TaskGroup wrapped in an ExceptionGroup; an unexpected exception is logged with
its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from .config import Config, load
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, VolmirrorError

log = logging.getLogger("volmirror")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volmirror", description="Near-live, verified mirroring of volumes over Apache Kafka.")
    p.add_argument("--version", action="version", version=f"volmirror {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", required=True, metavar="FILE", help="TOML configuration file")
        sp.add_argument("--log-format", choices=("auto", "text", "json"), help="log format on stderr (default: config, else auto)")
        sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="log level (default: config, else info)")

    common(sub.add_parser("source", help="run the source agent in the foreground"))
    common(sub.add_parser("mirror", help="run the mirror agent in the foreground"))
    st = sub.add_parser("status", help="per-volume protection, lag, drift (exit 0 all protected, 1 not, or agent unreachable)")
    common(st)
    st.add_argument("--json", action="store_true", help="print the raw JSON status")
    st.add_argument("--watch", action="store_true", help="redraw a one-line summary every second until Ctrl-C")
    st.add_argument("--source-config", metavar="FILE", help="with --watch: also show the source agent of this config")
    common(sub.add_parser("check-config", help="validate the configuration (exit 0, or 2 naming the bad key)"))
    vf = sub.add_parser("verify", help="full check of the mirror now (exit 0 identical, 1 drift, 2 error)")
    common(vf)
    vf.add_argument("--volume", metavar="V", help="only this volume")
    vf.add_argument("--json", action="store_true", help="print the report as JSON (schema: docs/verify.md)")
    vf.add_argument("--repair", action="store_true", help="repair the drift found (default: report only)")
    vf.add_argument("--timeout", type=float, default=60.0, metavar="S", help="how long to wait for the source's checkpoint (default 60)")
    rz = sub.add_parser("resume", help="apply a volume again that the mass-change guard paused, or that was rolled back in place "
                                       "(exit 0; 1 not held; 2 agent not reachable or refused)")
    common(rz)
    rz.add_argument("--volume", required=True, metavar="V", help="the volume")
    rz.add_argument("--failback-done", action="store_true",
                    help="the volume was rolled back in place for a failover, and failback has made the source identical to it: "
                         "mirror the source again (its restore points before are dropped)")
    pt = sub.add_parser("points", help="list a volume's restore points (time, stream position, verification)")
    common(pt)
    pt.add_argument("--volume", required=True, metavar="V", help="the volume")
    pt.add_argument("--json", action="store_true", help="print JSON")
    rs = sub.add_parser("restore", help="write a volume as it was at a restore point into a directory (exit 0, 1 if a part is not "
                                        "proven, 2 on error)")
    common(rs)
    rs.add_argument("--volume", required=True, metavar="V", help="the volume")
    rs.add_argument("--to", required=True, metavar="DIR", help="an empty or new directory to write the volume into; or, with "
                                                               "--in-place, the mirror's own tree (mirror.root or mirror.root/VOLUME), "
                                                               "with the mirror agent stopped")
    rs.add_argument("--in-place", action="store_true", help="--to is the mirror's own tree: roll it back (cannot be undone; the volume "
                                                            "is held until failback, docs/restore.md)")
    when = rs.add_mutually_exclusive_group()
    when.add_argument("--at", metavar="TIME", help="the newest point at or before TIME (unix seconds or ISO 8601; default: the latest)")
    when.add_argument("--point", type=int, metavar="ID", help="this point (see `volmirror points`)")
    rs.add_argument("--json", action="store_true", help="print the report as JSON")
    sd = sub.add_parser("seed", help="start a new source index from the volume's tree as it is, so that a mirror which has most of it "
                                     "gets only what differs (failback: docs/restore.md); the source agent must be stopped")
    common(sd)
    sd.add_argument("--volume", required=True, metavar="V", help="the volume (in [source])")
    sd.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"volmirror: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from . import logsetup

    logsetup.setup(args.log_format or cfg.logging.format, args.log_level or cfg.logging.level)
    try:
        if args.cmd == "check-config":
            return _check_config(cfg)
        if args.cmd == "source":
            from .source.agent import SourceAgent

            return _run(SourceAgent(cfg).run())
        if args.cmd == "mirror":
            from .mirror.agent import MirrorAgent

            return _run(MirrorAgent(cfg).run())
        if args.cmd == "verify":
            from .verify_cmd import run_verify

            return run_verify(cfg, volume=args.volume, as_json=args.json, repair=args.repair, wait=args.timeout)
        if args.cmd == "resume":
            from .verify_cmd import run_resume

            return run_resume(cfg, args.volume, failback_done=args.failback_done)
        if args.cmd in ("points", "restore"):
            from pathlib import Path

            from .mirror import restore

            mc = cfg.require_mirror()
            if args.cmd == "points":
                return restore.run_points(mc, args.volume, as_json=args.json)
            return restore.run_restore(mc, args.volume, Path(args.to).absolute(), at=args.at, point=args.point, as_json=args.json,
                                       in_place=args.in_place)
        if args.cmd == "seed":
            return _seed(cfg, args.volume, as_json=args.json)
        if args.cmd == "status":
            from .status import run_status

            extra = load(args.source_config) if args.source_config else None
            return run_status(cfg, as_json=args.json, watch=args.watch, extra=extra)
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except VolmirrorError as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the exit-code boundary: nothing escapes as a bare traceback
        return exit_code_for(e)
    return EXIT_FAILURE


def _seed(cfg: Config, volume: str, *, as_json: bool) -> int:
    import json

    from .source.seed import SeedError, seed

    if cfg.source is None:
        raise SeedError("seed needs a config with a [source] section (the reverse source of a failback)")
    vol = next((v for v in cfg.source.volumes if v.name == volume), None)
    if vol is None:
        raise SeedError(f"--volume: no volume {volume!r} in [source] (have: {', '.join(v.name for v in cfg.source.volumes)})")
    out = seed(cfg.source, vol)
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        print(f"seeded {out['volume']} from {out['root']}: {out['files']} files, {out['bytes']} bytes hashed in {out['seconds']:.1f} s"
              + (f"; {out['changed_while_read']} changed while read (the source sends them)" if out["changed_while_read"] else ""))
        for path, why in out["unreadable"].items():
            print(f"NOT SEEDED: {path}: {why}")
    return EXIT_OK


def first_volmirror_error(exc: BaseException) -> VolmirrorError | None:
    """The first VolmirrorError in ``exc``, looking depth-first through (nested) exception groups."""
    if isinstance(exc, VolmirrorError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = first_volmirror_error(sub)
            if found is not None:
                return found
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def exit_code_for(exc: Exception) -> int:
    """Log ``exc`` and return the exit code: a supervised task's failure reaches here as an
    ExceptionGroup (asyncio.TaskGroup); its first VolmirrorError decides the code and gives the one-line
    message. Anything else is a bug: logged with its traceback, exit 1."""
    known = first_volmirror_error(exc)
    if known is not None:
        log.error("%s", known, extra={"event": "fatal"})
    for leaf in _leaves(exc):
        if leaf is known:
            continue
        if isinstance(leaf, VolmirrorError):
            log.error("also failed: %s", leaf, extra={"event": "fatal"})
        else:
            log.error("unexpected error: %s: %s", type(leaf).__name__, leaf, exc_info=leaf, extra={"event": "fatal"})
    return EXIT_FAILURE if known is None else known.exit_code


def _run(coro: object) -> int:
    try:
        asyncio.run(coro)  # type: ignore[arg-type]
    except asyncio.CancelledError:
        pass
    return EXIT_OK


def _check_config(cfg: Config) -> int:
    parts = []
    if cfg.source:
        parts.append(f"source: {len(cfg.source.volumes)} volume(s) ({', '.join(v.name for v in cfg.source.volumes)})")
    if cfg.mirror:
        parts.append(f"mirror: root {cfg.mirror.root}, group {cfg.mirror.group_id}")
    print(f"{cfg.path}: OK; kafka {','.join(cfg.kafka.bootstrap_servers)} topic {cfg.kafka.topic}; " + "; ".join(parts))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
