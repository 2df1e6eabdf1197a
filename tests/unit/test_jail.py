"""The mirror's path jail: nothing may resolve outside <root>/<volume>."""

import os

import pytest

from daemon.errors import RejectedEvent
from daemon.mirror.jail import resolve


@pytest.fixture
def vroot(tmp_path):
    r = tmp_path / "mirror" / "vol"
    (r / "dir").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(str(tmp_path / "outside"), r / "escape")  # absolute symlink out of the jail
    os.symlink("dir", r / "inner")  # relative symlink that stays inside
    return str(r)


def test_plain_paths(vroot):
    assert resolve(vroot, "dir/file") == os.path.join(vroot, "dir/file")
    assert resolve(vroot, "new/deep/file") == os.path.join(vroot, "new/deep/file")
    # the final component may be a symlink: the applier never follows it
    assert resolve(vroot, "escape") == os.path.join(vroot, "escape")


@pytest.mark.parametrize("path,reason", [
    ("/etc/passwd", "unsafe_path"),
    ("../x", "unsafe_path"),
    ("dir/../../x", "unsafe_path"),
    ("a\x00b", "unsafe_path"),
    ("escape/file", "symlink_escape"),
    ("escape/deeper/file", "symlink_escape"),
    ("inner/file", "symlink_escape"),  # no path through any symlink, even one pointing inside
])
def test_rejections(vroot, path, reason):
    with pytest.raises(RejectedEvent) as ei:
        resolve(vroot, path)
    assert ei.value.reason == reason
