"""Per-volume commands around restore points (daemon.source.hooks), and the worker running them:
the pre-command before a point, the post-command after it (with the point's id), no point when the
pre-command fails, and the post-command when no point follows in time. No broker: the fake sink of
test_source_worker acks every record."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from daemon.config import VolumeConfig
from daemon.source.hooks import run_hook
from daemon.source.volume import VolumeWorker

from .test_source_worker import Env, until


async def test_a_hook_reports_its_exit_and_output():
    r = await run_hook('echo "$VOLMIRROR_PHASE on $VOLMIRROR_VOLUME"', {"VOLMIRROR_PHASE": "pre", "VOLMIRROR_VOLUME": "v"}, 5)
    assert r.ok and r.why == "" and r.output == "pre on v"
    r = await run_hook("echo broken >&2; exit 3", {}, 5)
    assert not r.ok and r.why == "exit 3" and r.output == "broken"


async def test_a_hook_that_hangs_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    r = await run_hook(f"sleep 30 & echo $! > {pidfile}; wait", {}, 0.5)
    assert not r.ok and r.why == "timed out after 0.5 s"
    assert time.monotonic() - t0 < 5
    child = int(pidfile.read_text())
    await until(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2],
                5, "the hook's child to be killed too")


class HookEnv(Env):
    def hooked_worker(self, name: str, pre: str = "", post: str = "", timeout: float = 30.0) -> VolumeWorker:
        root = self.tmp / "src" / name
        root.mkdir(parents=True, exist_ok=True)
        self.m.init_volume(name)
        vc = VolumeConfig(name, root, 16384, point_pre_command=pre, point_post_command=post, point_hook_timeout=timeout)
        w = VolumeWorker(vc, self.state, self.pub, self.m, debounce=0.01, max_delay=0.05, checkpoint_interval=3600,
                         point_interval=0.2, point_quiet=0.05)
        w.watching = lambda: True
        w.gate.scan_done([])  # no start-up scan in these tests: the volume starts empty
        self.workers[name] = w
        self.tasks.append(asyncio.create_task(w.run()))
        return w


@pytest.fixture
async def henv(tmp_path):
    e = HookEnv(tmp_path)
    yield e
    await e.stop()


def lines(p: Path) -> list[str]:
    return p.read_text().split() if p.exists() else []


async def test_pre_command_runs_before_the_point_and_post_command_after_it_with_its_id(henv, tmp_path):
    log = tmp_path / "hooks.log"
    w = henv.hooked_worker("v", pre=f"echo pre >> {log}", post=f'echo "post:$VOLMIRROR_POINT" >> {log}')
    (w.vol.path / "a").write_bytes(b"x" * 100)
    w.mark("a", force=False)
    pts = await until(lambda: henv.sink.ops("v", "point"), 10, "a point")
    await until(lambda: len(lines(log)) >= 2, 5, "the post-command")
    got = lines(log)
    assert got[:2] == ["pre", f"post:{pts[0]['id']}"], got
    # the file's record went out before the point; the hooks ran once each, and nothing more without a change
    ops = [e.op for e in henv.sink.events if e.vol == "v"]
    assert ops.index("point") > max(i for i, op in enumerate(ops) if op in ("file", "manifest"))
    await asyncio.sleep(0.6)
    assert lines(log) == got[:2] and len(henv.sink.ops("v", "point")) == 1
    assert henv.metric("volmirror_source_point_hooks_total", volume="v", phase="pre", result="ok") == 1
    assert henv.metric("volmirror_source_point_hooks_total", volume="v", phase="post", result="ok") == 1


async def test_a_failing_pre_command_means_no_point_until_it_succeeds(henv, tmp_path):
    flag = tmp_path / "ok"
    w = henv.hooked_worker("v", pre=f"test -e {flag}")
    (w.vol.path / "a").write_bytes(b"x")
    w.mark("a", force=False)
    await until(lambda: henv.metric("volmirror_source_point_hooks_total", volume="v", phase="pre", result="failed") >= 2, 10,
                "the pre-command to fail twice")
    assert henv.sink.ops("v", "point") == []
    flag.touch()
    await until(lambda: henv.sink.ops("v", "point"), 10, "a point once the pre-command succeeds")


async def test_the_post_command_runs_when_no_point_follows_the_pre_command_in_time(henv, tmp_path):
    log = tmp_path / "hooks.log"
    # the pre-command starts a writer that keeps rewriting a file the point depends on: no point can
    # be taken while it runs (the file is stale at every look), so the post-command must come anyway
    writer = "(for i in $(seq 1 150); do echo $i > \"$VOLMIRROR_ROOT/busy\"; sleep 0.02; done) >/dev/null 2>&1 &"
    w = henv.hooked_worker("v", pre=f"echo pre >> {log}; {writer}", post=f'echo "post:${{VOLMIRROR_POINT:-none}}" >> {log}', timeout=0.5)
    (w.vol.path / "busy").write_bytes(b"0")
    w.mark("busy", force=False)
    await until(lambda: "post:none" in lines(log), 10, "the post-command after point_hook_timeout")
    assert lines(log)[:2] == ["pre", "post:none"], lines(log)
    assert henv.sink.ops("v", "point") == []
    assert henv.metric("volmirror_source_points_total", volume="v", result="stale") >= 1


async def test_stopping_the_worker_between_the_pre_command_and_its_point_runs_the_post_command(henv, tmp_path):
    log = tmp_path / "hooks.log"
    writer = "(for i in $(seq 1 150); do echo $i > \"$VOLMIRROR_ROOT/busy\"; sleep 0.02; done) >/dev/null 2>&1 &"
    w = henv.hooked_worker("v", pre=f"echo pre >> {log}; {writer}", post=f'echo "post:${{VOLMIRROR_POINT:-none}}" >> {log}', timeout=30)
    (w.vol.path / "busy").write_bytes(b"0")
    w.mark("busy", force=False)
    await until(lambda: "pre" in lines(log), 10, "the pre-command")
    await asyncio.sleep(0.2)
    assert "post:none" not in lines(log)  # waiting for a point that cannot come (timeout 30 s)
    await henv.stop()  # the agent stops (SIGTERM cancels the worker)
    assert lines(log) == ["pre", "post:none"], lines(log)
