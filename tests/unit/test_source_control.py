"""Control requests from mirrors: validated (a bad one is rejected, never a crash) and dispatched."""

from __future__ import annotations

import json

import pytest

from daemon.errors import RejectedEvent
from daemon.source.control import dispatch, parse_request


class Worker:
    def __init__(self) -> None:
        self.got: list[tuple] = []

    def mirror_position(self, site, epoch, seq):
        self.got.append(("position", site, epoch, seq))

    def request(self, kind, nonce):
        self.got.append((kind, nonce))

    def resync(self, path, hashes):
        self.got.append(("resync", path, hashes))


def req(**kw) -> bytes:
    return json.dumps(kw).encode()


def test_requests_are_dispatched_to_the_volume_worker():
    w = Worker()
    assert dispatch(parse_request(req(type="position", vol="v", epoch="e1", seq=42, site="drc-1")), {"v": w})
    assert dispatch(parse_request(req(type="checkpoint", vol="v", nonce="n1")), {"v": w})
    assert dispatch(parse_request(req(type="resync_file", vol="v", path="a/b", hashes="00" * 16)), {"v": w})
    assert not dispatch(parse_request(req(type="position", vol="other", epoch="e1", seq=1, site="s")), {"v": w})
    assert w.got == [("position", "drc-1", "e1", 42), ("checkpoint", "n1"), ("resync", "a/b", b"\0" * 16)]


@pytest.mark.parametrize("bad", [
    b"not json", b"[]", req(type="nope", vol="v"),
    req(type="position", vol="v", epoch="e", seq=-1, site="s"),
    req(type="position", vol="v", epoch="e", seq=True, site="s"),
    req(type="position", vol="v", epoch="e", seq="7", site="s"),
    req(type="position", vol="v", epoch="", seq=1, site="s"),
    req(type="position", vol="v", epoch="e", seq=1),
    req(type="listing", vol="v"),
    req(type="resync_file", vol="v", path="../x"),
    req(type="resync_file", vol="v", path="x", hashes="zz"),
])
def test_malformed_requests_are_rejected(bad):
    with pytest.raises(RejectedEvent):
        parse_request(bad)
