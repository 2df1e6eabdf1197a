"""Exit codes at the CLI boundary, and what `verify` says when the mirror times out.

A supervised task's failure leaves asyncio.TaskGroup as an ExceptionGroup: the CLI must exit with the
code of its first VolmirrorError and one clear line, not a traceback and exit 1. Unknown exceptions
still exit non-zero, with their traceback in the log. The agents are replaced by fakes that run the
real supervisor (daemon.runtime.supervise).
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from daemon import cli
from daemon.errors import EXIT_CONFIG, EXIT_FAILURE, ConfigError, PermanentError, StateError, VolmirrorError
from daemon.runtime import StopSignal, supervise
from daemon.verify_cmd import explain_http_error

CONFIG = """
[kafka]
bootstrap_servers = ["127.0.0.1:9092"]
topic = "t"
[mirror]
root = "{tmp}/root"
state_dir = "{tmp}/state"
group_id = "drc1"
[metrics]
listen = "127.0.0.1:1"
"""


class Exit7(VolmirrorError):
    exit_code = 7


@pytest.fixture
def run_mirror(tmp_path, monkeypatch, capsys):
    """main(["mirror", ...]) with an agent whose supervised tasks raise the given exceptions."""
    import daemon.mirror.agent as agent_mod

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    cfg = tmp_path / "m.toml"
    cfg.write_text(CONFIG.format(tmp=tmp_path))

    def run(*excs: BaseException) -> tuple[int, list[dict]]:
        class FakeAgent:
            def __init__(self, _cfg) -> None:
                pass

            async def run(self) -> None:
                async def fail(e: BaseException, delay: float) -> None:
                    await asyncio.sleep(delay)
                    raise e

                async def forever() -> None:
                    await asyncio.Event().wait()

                # all failing tasks raise at the same instant, so the group holds every one of them
                await supervise(StopSignal(), *(fail(e, 0.01) for e in excs), forever())

        monkeypatch.setattr(agent_mod, "MirrorAgent", FakeAgent)
        code = cli.main(["mirror", "--config", str(cfg), "--log-format", "json"])
        lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
        return code, lines

    yield run
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_supervised_volmirror_error_keeps_its_exit_code(run_mirror):
    code, lines = run_mirror(StateError("state_dir /var/lib/volmirror/mirror: No space left on device"))
    assert code == EXIT_FAILURE
    errors = [x for x in lines if x["level"] == "error"]
    assert [x["msg"] for x in errors] == ["state_dir /var/lib/volmirror/mirror: No space left on device"]
    assert "exc" not in errors[0]  # one clear line, no traceback


def test_supervised_config_error_exits_2(run_mirror):
    code, lines = run_mirror(ConfigError("metrics.listen", "cannot listen on 127.0.0.1:1: Permission denied"))
    assert code == EXIT_CONFIG
    assert any("config key 'metrics.listen'" in x["msg"] for x in lines)


def test_any_volmirror_error_subclass_code_is_used(run_mirror):
    code, _ = run_mirror(Exit7("seven"))
    assert code == 7


def test_unknown_exception_exits_1_with_traceback_in_log(run_mirror):
    code, lines = run_mirror(RuntimeError("a bug"))
    assert code == EXIT_FAILURE
    (err,) = [x for x in lines if x["level"] == "error"]
    assert "RuntimeError: a bug" in err["msg"]
    assert "Traceback" in err["exc"] and "a bug" in err["exc"]


def test_mixed_group_first_volmirror_error_decides_and_the_bug_is_logged(run_mirror):
    code, lines = run_mirror(RuntimeError("a bug"), ConfigError("mirror.root", "cannot create /x: Read-only file system"))
    assert code == EXIT_CONFIG
    errors = [x for x in lines if x["level"] == "error"]
    assert errors[0]["msg"] == "config key 'mirror.root': cannot create /x: Read-only file system"
    assert any("Traceback" in x.get("exc", "") and "a bug" in x["exc"] for x in errors)


def test_first_volmirror_error_searches_nested_groups():
    inner = PermanentError("topic cannot be created")
    eg = ExceptionGroup("outer", [ValueError("x"), ExceptionGroup("inner", [KeyError("k"), inner]), StateError("later")])
    assert cli.first_volmirror_error(eg) is inner
    assert cli.first_volmirror_error(ExceptionGroup("g", [ValueError("x")])) is None
    assert cli.first_volmirror_error(inner) is inner


def test_bare_volmirror_error_still_mapped(tmp_path, monkeypatch, capsys):
    """Not every failure comes through the TaskGroup (start-up errors are raised directly)."""
    import daemon.mirror.agent as agent_mod

    class FakeAgent:
        def __init__(self, _cfg) -> None:
            pass

        async def run(self) -> None:
            raise ConfigError("metrics.listen", "cannot listen")

    monkeypatch.setattr(agent_mod, "MirrorAgent", FakeAgent)
    cfg = tmp_path / "m.toml"
    cfg.write_text(CONFIG.format(tmp=tmp_path))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert cli.main(["mirror", "--config", str(cfg), "--log-format", "json"]) == EXIT_CONFIG
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


# -- `volmirror verify`: what did not arrive ----------------------------------------------------------

def test_verify_checkpoint_timeout_names_the_checkpoint_and_the_source():
    body = {"error": "no answer within 5 s: waited for a checkpoint of vol1 from the source (no answer on the event stream: "
                     "is the source agent running and connected?)"}
    msg = explain_http_error(504, body, "HTTP Error 504", 5.0)
    assert msg.startswith("could not verify vol1: no checkpoint of vol1 arrived within 5 s")
    assert "source agent did not answer" in msg


def test_verify_listing_timeout_does_not_blame_the_source():
    body = {"error": "no answer within 60 s: waited for the listing of vol1: the source answered the checkpoint (id 42) but its "
                     "listing was not received and compared in time (the source defers listings while it is still scanning)"}
    msg = explain_http_error(504, body, "HTTP Error 504", 60.0)
    assert "the source answered (checkpoint 42 arrived)" in msg
    assert "listing of vol1" in msg and "within 60 s" in msg
    assert "did not answer" not in msg and "source agent" not in msg and "no checkpoint" not in msg


def test_verify_listing_timeout_older_agent_wording():
    msg = explain_http_error(504, {"error": "no answer within 30 s: waited for the listing of perkara from the source"}, "", 30.0)
    assert "the source answered (a checkpoint arrived)" in msg and "listing of perkara" in msg


def test_verify_structured_fields_win():
    body = {"error": "timed out", "waiting_for": "listing", "volume": "v2", "checkpoint_id": 9}
    msg = explain_http_error(504, body, "", 10.0)
    assert "checkpoint 9 arrived" in msg and "listing of v2" in msg and "within 10 s" in msg


def test_verify_other_errors_pass_through():
    assert explain_http_error(404, {"error": "volume 'x' is not known to this mirror"}, "", 60) == \
        "verify failed: volume 'x' is not known to this mirror"
    assert "the mirror timed out: odd" in explain_http_error(504, {"error": "odd"}, "", 60)
