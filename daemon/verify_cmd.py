"""``volmirror verify``: a full check of a mirror now, performed by the running mirror agent.

The command asks the mirror agent (``GET /verify`` on its metrics listener). The agent asks the
source for a fresh checkpoint through Kafka, compares its index with it at that point of the stream
(and, if they differ, with the source's listing, path by path), then re-reads every mirror file
from disk against its index. Exit 0: identical; 1: drift (paths and kinds listed); 2: error (bad
config, agent or source unreachable, no checkpoint in time). Reports only, unless ``--repair``.
The ``--json`` schema is documented in docs/verify.md.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .config import Config
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK


def run_verify(cfg: Config, *, volume: str | None, as_json: bool, repair: bool, wait: float = 60.0) -> int:
    if cfg.mirror is None:
        print("volmirror: verify needs a config with a [mirror] section (run it on the DR host)", file=sys.stderr)
        return EXIT_CONFIG
    host, port = cfg.metrics.host_port
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    q = {k: v for k, v in (("volume", volume), ("repair", "1" if repair else None), ("timeout", f"{wait:g}")) if v}
    timeout = 2 * wait + 600  # the agent also scrubs every file: allow for large volumes
    url = f"http://{host}:{port}/verify" + ("?" + urllib.parse.urlencode(q) if q else "")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - local agent endpoint
            report: dict[str, Any] = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", str(e))
        except ValueError:
            msg = str(e)
        return _error(as_json, f"verify failed: {msg}")
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


def _error(as_json: bool, msg: str) -> int:
    if as_json:
        print(json.dumps({"error": msg, "identical": None}))
    print(f"volmirror: {msg}", file=sys.stderr)
    return EXIT_CONFIG
