"""Config validation: every error names its key; the CLI exits 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load, parse
from daemon.errors import ConfigError

GOOD = """
[kafka]
bootstrap_servers = ["127.0.0.1:9092"]
topic = "volmirror.events"
security_protocol = "PLAINTEXT"
[source]
state_dir = "/var/lib/volmirror/source"
[[source.volumes]]
name = "perkara"
path = "/srv/data/perkara"
block_size = 131072
exclude = ["*.swp", ".cache/**"]
[mirror]
root = "/srv/mirror"
state_dir = "/var/lib/volmirror/mirror"
group_id = "drc-site-1"
[metrics]
listen = "127.0.0.1:9464"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_good_config(tmp_path):
    cfg = load(write(tmp_path, GOOD))
    assert cfg.kafka.bootstrap_servers == ("127.0.0.1:9092",)
    assert cfg.kafka.client_options == {"security_protocol": "PLAINTEXT"}
    v = cfg.source.volumes[0]
    assert (v.name, v.block_size, str(v.path)) == ("perkara", 131072, "/srv/data/perkara")
    assert v.is_excluded("a/b/x.swp") and v.is_excluded(".cache/x/y") and not v.is_excluded("a/.cache/x")
    assert not v.is_excluded("x.swpx")
    assert cfg.mirror.group_id == "drc-site-1" and cfg.mirror.repair is True
    assert cfg.metrics.host_port == ("127.0.0.1", 9464)
    # payloads compressed by the source in its read threads; whole batches on the event loop: not by default
    assert (cfg.source.compression, cfg.kafka.compression) == ("zstd", "none")


@pytest.mark.parametrize(
    "replace,key",
    [
        (('block_size = 131072', 'block_size = 100000'), "source.volumes[0].block_size"),
        (('block_size = 131072', 'block_size = 8192'), "source.volumes[0].block_size"),
        (('block_size = 131072', 'block_size = 2097152'), "source.volumes[0].block_size"),
        (('block_size = 131072', 'block_size = "big"'), "source.volumes[0].block_size"),
        (('name = "perkara"', 'name = "bad name!"'), "source.volumes[0].name"),
        (('name = "perkara"', 'nmae = "perkara"'), "source.volumes[0].name"),  # typo → missing name
        (('block_size = 131072', 'block_size = 131072\ncolour = "red"'), "source.volumes[0].colour"),
        (('bootstrap_servers = ["127.0.0.1:9092"]', 'bootstrap_servers = []'), "kafka.bootstrap_servers"),
        (('bootstrap_servers = ["127.0.0.1:9092"]', 'bootstrap_servers = ["nohostport"]'), "kafka.bootstrap_servers[0]"),
        (('group_id = "drc-site-1"', ''), "mirror.group_id"),
        (('listen = "127.0.0.1:9464"', 'listen = "nowhere"'), "metrics.listen"),
        (('exclude = ["*.swp", ".cache/**"]', 'exclude = [1]'), "source.volumes[0].exclude[0]"),
        (('topic = "volmirror.events"', 'topic = "bad topic"'), "kafka.topic"),
        (('[metrics]', '[metrix]'), "metrix"),
        (('security_protocol = "PLAINTEXT"', 'security_protocol = 5'), "kafka.security_protocol"),
        (('state_dir = "/var/lib/volmirror/source"', 'state_dir = "/var/lib/volmirror/source"\ncompression = "gzip"'), "source.compression"),
        (('block_size = 131072', 'block_size = 131072\npoint_pre_command = 5'), "source.volumes[0].point_pre_command"),
        (('block_size = 131072', 'block_size = 131072\npoint_post_command = "  "'), "source.volumes[0].point_post_command"),
        (('block_size = 131072', 'block_size = 131072\npoint_hook_timeout = 0'), "source.volumes[0].point_hook_timeout"),
    ],
)
def test_bad_key_is_named(tmp_path, replace, key):
    text = GOOD.replace(*replace)
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, text))
    assert ei.value.key == key
    assert key in str(ei.value)


def test_duplicate_volume_names(tmp_path):
    text = GOOD + '[[source.volumes]]\nname = "perkara"\npath = "/srv/other"\n'
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, text))
    assert ei.value.key == "source.volumes[1].name"


def test_overlapping_volumes(tmp_path):
    text = GOOD + '[[source.volumes]]\nname = "inner"\npath = "/srv/data/perkara/sub"\n'
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, text))
    assert ei.value.key.startswith("source.volumes[")


def test_missing_kafka_section():
    with pytest.raises(ConfigError) as ei:
        parse({"mirror": {}}, Path("/x.toml"))
    assert ei.value.key == "kafka"


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, "this is [not toml"))
    assert ei.value.key == "--config"


def test_cli_check_config_exit_codes(tmp_path):
    good = write(tmp_path, GOOD)
    r = subprocess.run([sys.executable, "-m", "daemon", "check-config", "--config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("block_size = 131072", "block_size = 3"))
    r = subprocess.run([sys.executable, "-m", "daemon", "check-config", "--config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "source.volumes[0].block_size" in r.stderr
    r = subprocess.run([sys.executable, "-m", "daemon", "check-config", "--config", str(tmp_path / "missing.toml")], capture_output=True, text=True)
    assert r.returncode == 2


def test_mirror_max_file_size(tmp_path):
    from daemon import wire

    assert load(write(tmp_path, GOOD)).mirror.max_file_size == wire.DEFAULT_MAX_FILE_SIZE == 2**44
    for val in (2**20, 2**40, 2**62):
        text = GOOD.replace('group_id = "drc-site-1"', f'group_id = "drc-site-1"\nmax_file_size = {val}')
        assert load(write(tmp_path, text)).mirror.max_file_size == val


@pytest.mark.parametrize("val", [str(2**20 - 1), "0", "-1", str(2**62 + 1), "9223372036854775807", "1e12", "true", '"16T"'])
def test_mirror_max_file_size_rejected(tmp_path, val):
    text = GOOD.replace('group_id = "drc-site-1"', f'group_id = "drc-site-1"\nmax_file_size = {val}')
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, text))
    assert ei.value.key == "mirror.max_file_size"
    assert "mirror.max_file_size" in str(ei.value)


def test_point_hooks(tmp_path):
    text = GOOD.replace("block_size = 131072", 'block_size = 131072\npoint_pre_command = " sqlite3 db \'PRAGMA wal_checkpoint\' "\npoint_post_command = "true"')
    v = load(write(tmp_path, text)).source.volumes[0]
    assert (v.point_pre_command, v.point_post_command, v.point_hook_timeout) == ("sqlite3 db 'PRAGMA wal_checkpoint'", "true", 30.0)
    # a hook with restore points turned off would never run: a mistake, named
    off = text.replace('state_dir = "/var/lib/volmirror/source"', 'state_dir = "/var/lib/volmirror/source"\npoint_interval = 0')
    with pytest.raises(ConfigError) as ei:
        load(write(tmp_path, off))
    assert ei.value.key == "source.volumes[0].point_pre_command"
