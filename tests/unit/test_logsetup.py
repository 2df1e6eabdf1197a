"""Log format: JSON with fixed keys, secrets masked, transient Kafka noise downgraded."""

import io
import json
import logging

from daemon import logsetup


def capture(fmt):
    logsetup.setup(fmt, "debug")
    buf = io.StringIO()
    logging.getLogger().handlers[0].stream = buf
    return buf


def test_json_lines_with_fixed_keys():
    buf = capture("json")
    logging.getLogger("volmirror.test").warning("drift", extra={"volume": "v", "path": "a/b", "offset": 7, "partition": 2, "event": "drift"})
    rec = json.loads(buf.getvalue().strip())
    assert rec["level"] == "warning" and rec["msg"] == "drift"
    assert (rec["volume"], rec["path"], rec["offset"], rec["partition"], rec["event"]) == ("v", "a/b", 7, 2, "drift")


def test_text_format_appends_fields():
    buf = capture("text")
    logging.getLogger("volmirror.test").info("hello", extra={"volume": "v"})
    assert buf.getvalue().rstrip().endswith("hello [volume=v]")


def test_secret_fields_masked():
    assert logsetup._mask({"sasl_plain_password": "hunter2", "volume": "v"}) == {"sasl_plain_password": "***", "volume": "v"}


def test_coordinator_noise_is_a_warning():
    buf = capture("json")
    logging.getLogger("aiokafka.consumer.group_coordinator").error("Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError")
    assert json.loads(buf.getvalue().strip())["level"] == "warning"
