"""``volmirror verify``: a full check of a mirror now, performed by the running mirror agent.

The command asks the mirror agent (``GET /verify`` on its metrics listener). The agent asks the
source for a fresh checkpoint through Kafka, compares its index with it at that point of the stream
(and, if they differ, with the source's listing, path by path), then re-reads every mirror file
from disk against its index. Exit 0: identical; 1: drift (paths and kinds listed); 2: error (bad
config, agent unreachable, or an answer from the source that did not arrive in time). A timeout names
what did not arrive: no checkpoint (the source did not answer, or the mirror is too far behind to
reach the answer), or the checkpoint came but the listing was not received and compared (the source
did answer). Reports only, unless ``--repair``.
The ``--json`` schema is documented in docs/verify.md.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .config import Config
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK


def agent_url(cfg: Config, path: str, query: dict[str, str]) -> str:
    """The local agent's endpoint (its metrics listener; a wildcard address is asked on loopback)."""
    host, port = cfg.metrics.host_port
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")


def run_verify(cfg: Config, *, volume: str | None, as_json: bool, repair: bool, wait: float = 60.0) -> int:
    if cfg.mirror is None:
        print("volmirror: verify needs a config with a [mirror] section (run it on the DR host)", file=sys.stderr)
        return EXIT_CONFIG
    q = {k: v for k, v in (("volume", volume), ("repair", "1" if repair else None), ("timeout", f"{wait:g}")) if v}
    timeout = 2 * wait + 600  # the agent also scrubs every file: allow for large volumes
    url = agent_url(cfg, "/verify", q)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - local agent endpoint
            report: dict[str, Any] = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
        except ValueError:
            body = {}
        return _error(as_json, explain_http_error(e.code, body if isinstance(body, dict) else {}, str(e), wait))
    except TimeoutError:
        return _error(as_json, f"the mirror agent at {cfg.metrics.listen} took the request but did not answer within {timeout:.0f} s")
    except (OSError, ValueError) as e:
        return _error(as_json, f"mirror agent not reachable at {cfg.metrics.listen}: {e}")
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for name, v in sorted(report["volumes"].items()):
            cp = v["checkpoint"]
            state = "IDENTICAL" if v["identical"] else "DRIFT"
            print(f"{name}: {state} (checkpoint {cp['id']} {'matched' if cp['match'] else 'did not match'})")
            for d in v["drift"]:
                print(f"  {d['kind']:<9} {d['path']}")
        if report.get("repair"):
            print("repair requested: drifted paths are being repaired")
    return EXIT_OK if report.get("identical") else EXIT_FAILURE


_WAITED = re.compile(r"within (?P<secs>[\d.]+) ?s\b.*?waited for (?:a|the) (?P<what>checkpoint|listing) of (?P<vol>[A-Za-z0-9._-]+)", re.S)
_CP_ID = re.compile(r"checkpoint \(?id (?P<id>\d+)")


def explain_http_error(code: int, body: dict[str, Any], fallback: str, wait: float) -> str:
    """One line saying what went wrong, from the mirror's error answer.

    A 504 means the mirror waited for something from the source through Kafka. Say exactly which
    thing did not arrive, and blame the source only when it did not answer at all: when the
    checkpoint came back but the listing comparison did not finish, the source *did* answer.
    """
    raw = str(body.get("error") or fallback)
    if code != 504:
        return f"verify failed: {raw}"
    m = _WAITED.search(raw)
    what = body.get("waiting_for") or (m["what"] if m else None)
    vol = body.get("volume") or (m["vol"] if m else "the volume")
    secs = f"{float(m['secs']):.0f}" if m else f"{wait:.0f}"
    if what == "listing":
        cid = body.get("checkpoint_id") or (lambda c: c["id"] if c else None)(_CP_ID.search(raw))
        cp = f"checkpoint {cid}" if cid is not None else "a checkpoint"
        return (f"could not verify {vol}: the source answered ({cp} arrived), but the listing of {vol} the mirror then asked "
                f"for, to compare path by path, was not received and compared within {secs} s (a large volume, or a source still "
                f"scanning, needs more time: retry with a larger --timeout)")
    if what == "checkpoint":
        return (f"could not verify {vol}: no checkpoint of {vol} arrived within {secs} s: the source agent did not answer the "
                f"request (down, or not connected to Kafka), or this mirror is too far behind in the stream to have reached the "
                f"answer (see LAG(rec) in `volmirror status`)")
    return f"could not verify: the mirror timed out: {raw}"


def _error(as_json: bool, msg: str) -> int:
    if as_json:
        print(json.dumps({"error": msg, "identical": None}))
    print(f"volmirror: {msg}", file=sys.stderr)
    return EXIT_CONFIG


def run_resume(cfg: Config, volume: str, *, failback_done: bool = False) -> int:
    """``volmirror resume``: ask the running mirror agent to apply a volume it holds, paused by the
    mass-change guard or rolled back in place for a failover (``GET /resume?volume=V[&failback_done=1]``).
    Exit 0 resumed; 1 not held; 2 agent not reachable, bad usage, or a failover hold without --failback-done."""
    if cfg.mirror is None:
        print("volmirror: resume needs a config with a [mirror] section (run it on the DR host)", file=sys.stderr)
        return EXIT_CONFIG
    url = agent_url(cfg, "/resume", {"volume": volume, **({"failback_done": "1"} if failback_done else {})})
    try:
        with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - local agent endpoint
            body: dict[str, Any] = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error") or str(e)
        except ValueError:
            msg = str(e)
        print(f"volmirror: {msg}", file=sys.stderr)
        return EXIT_FAILURE if e.code == 404 else EXIT_CONFIG
    except (OSError, ValueError) as e:
        print(f"volmirror: mirror agent not reachable at {cfg.metrics.listen}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{volume}: applying resumed (it was held: {body.get('was', {}).get('why')})")
    return EXIT_OK
