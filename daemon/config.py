"""TOML configuration → frozen dataclasses.

One file format serves both agents; each agent asks for the sections it needs
(:meth:`Config.require_source`, :meth:`Config.require_mirror`). Every problem is a
:class:`~daemon.errors.ConfigError` naming the dotted key (``source.volumes[1].block_size``), and
unknown keys are errors too, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import fnmatch
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import codec
from .errors import ConfigError

VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MIN_BLOCK = 16 * 1024
MAX_BLOCK = 1024 * 1024
DEFAULT_BLOCK = 128 * 1024

# aiokafka keyword arguments passed through unchanged from [kafka] (TLS / SASL / client identity).
KAFKA_PASSTHROUGH = {
    "security_protocol": str,
    "sasl_mechanism": str,
    "sasl_plain_username": str,
    "sasl_plain_password": str,
    "sasl_kerberos_service_name": str,
    "sasl_kerberos_domain_name": str,
    "ssl_cafile": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_password": str,
    "ssl_check_hostname": bool,
    "client_id": str,
}


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: tuple[str, ...]
    topic: str = "volmirror.events"
    partitions: int = 6
    replication_factor: int = 0  # 0 = min(3, brokers in the cluster)
    retention_ms: int = 7 * 24 * 3600 * 1000
    compression: str = "none"  # of whole producer batches, on the event loop; payloads: source.compression
    request_timeout_ms: int = 30000
    client_options: dict[str, Any] = field(default_factory=dict)

    @property
    def control_topic(self) -> str:
        return f"{self.topic}.control"


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    path: Path
    block_size: int = DEFAULT_BLOCK
    exclude: tuple[str, ...] = ()
    point_pre_command: str = ""  # run before each restore point (daemon.source.hooks); "": none
    point_post_command: str = ""  # run after each restore point, or when none followed the pre-command in time
    point_hook_timeout: float = 30.0  # seconds: a command is killed after it; a pre-command's point must come within it

    def is_excluded(self, rel: str) -> bool:
        """True when the relative POSIX path matches an exclude glob.

        A pattern without ``/`` matches the last component anywhere (``*.swp``); a pattern with
        ``/`` matches the whole path, ``**`` spanning directories (``.cache/**``).
        """
        base = rel.rsplit("/", 1)[-1]
        for pat in self.exclude:
            if "/" not in pat:
                if fnmatch.fnmatchcase(base, pat):
                    return True
            elif _glob_re(pat).match(rel):
                return True
        return False


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def _glob_re(pat: str) -> re.Pattern[str]:
    rx = _GLOB_CACHE.get(pat)
    if rx is None:
        out = []
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                out.append(".*")
                i += 2
            elif pat[i] == "*":
                out.append("[^/]*")
                i += 1
            elif pat[i] == "?":
                out.append("[^/]")
                i += 1
            else:
                out.append(re.escape(pat[i]))
                i += 1
        rx = re.compile("^" + "".join(out) + "$")
        _GLOB_CACHE[pat] = rx
    return rx


@dataclass(frozen=True)
class SourceConfig:
    state_dir: Path
    volumes: tuple[VolumeConfig, ...]
    host: str = ""
    heartbeat_interval: float = 5.0
    reconcile_interval: float = 600.0
    debounce_ms: int = 50
    max_delay_ms: int = 1000
    announce_interval: float = 30.0
    checkpoint_interval: float = 60.0
    point_interval: float = 2.0  # seconds between two restore points of a volume (0: none; daemon.source.points)
    point_quiet_ms: int = 50  # a restore point needs this long without a change event (nor a read)
    compression: str = "zstd"  # of each block / small file, in the read threads (daemon.codec)


@dataclass(frozen=True)
class MirrorConfig:
    root: Path
    state_dir: Path
    group_id: str
    volumes: tuple[str, ...] = ()  # empty = every volume found in the stream
    commit_interval_ms: int = 1000
    repair: bool = True
    scrub_rate_mib: float = 64.0
    rpo_seconds: float = 60.0
    max_file_size: int = 1 << 44  # bytes; larger files are rejected (too_large); = wire.DEFAULT_MAX_FILE_SIZE
    accept_new_source: tuple[str, ...] = ()  # volumes whose source host / block size may change (operator action)
    history_dir: Path | None = None  # undo journal of restore points (daemon.mirror.history); None: state_dir/history
    history_hours: float = 24.0  # restore points kept at least this long ...
    history_max_gib: float = 10.0  # ... unless the history would take more disk than this (oldest pruned first)
    guard: str = "alert"  # mass-change guard (daemon.mirror.guard): off | alert | pause
    guard_window_s: float = 60.0
    guard_min_files: int = 100  # a burst: at least this many files ...
    guard_fraction: float = 0.05  # ... and this share of the volume's files, rewritten / deleted / renamed in the window

    @property
    def history_path(self) -> Path:
        return self.history_dir or self.state_dir / "history"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "auto"  # auto | text | json
    level: str = "info"


@dataclass(frozen=True)
class Config:
    path: Path
    kafka: KafkaConfig
    source: SourceConfig | None
    mirror: MirrorConfig | None
    metrics: MetricsConfig
    logging: LoggingConfig

    def require_source(self) -> SourceConfig:
        if self.source is None:
            raise ConfigError("source", "section [source] is required by the source agent")
        return self.source

    def require_mirror(self) -> MirrorConfig:
        if self.mirror is None:
            raise ConfigError("mirror", "section [mirror] is required by the mirror agent")
        return self.mirror


# --------------------------------------------------------------------------------------------
# parsing helpers


class _Section:
    """Reads typed keys from one TOML table and complains about unknown ones."""

    def __init__(self, table: Any, prefix: str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(prefix, "must be a table")
        self.t = table
        self.prefix = prefix
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, typ: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        self.seen.add(name)
        if name not in self.t:
            if required or default is ...:
                raise ConfigError(self.key(name), "is required")
            return default
        val = self.t[name]
        # bool is an int in Python; never accept it where a number is wanted.
        if isinstance(val, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
            raise ConfigError(self.key(name), f"must be {_tname(typ)}, got a boolean")
        if not isinstance(val, typ):
            raise ConfigError(self.key(name), f"must be {_tname(typ)}, got {type(val).__name__}")
        return val

    def number(self, name: str, default: float, *, minimum: float, maximum: float | None = None) -> float:
        val = float(self.get(name, (int, float), default))
        if val < minimum or (maximum is not None and val > maximum):
            rng = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(self.key(name), f"must be {rng}, got {val:g}")
        return val

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        val = self.get(name, int, default)
        if val < minimum or (maximum is not None and val > maximum):
            rng = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(self.key(name), f"must be {rng}, got {val}")
        return val

    def string_list(self, name: str) -> tuple[str, ...]:
        val = self.get(name, list, [])
        for i, item in enumerate(val):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.key(name)}[{i}]", "must be a non-empty string")
        return tuple(val)

    def done(self, extra_allowed: set[str] = frozenset()) -> None:
        unknown = sorted(set(self.t) - self.seen - set(extra_allowed))
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _tname(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "a table"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _abs_path(sec: _Section, name: str, base: Path, *, required: bool = True) -> Path:
    raw = sec.get(name, str, required=required)
    if not raw:
        raise ConfigError(sec.key(name), "must not be empty")
    p = Path(raw)
    if not p.is_absolute():
        p = (base / p).resolve()
    return p


def _parse_kafka(t: Any) -> KafkaConfig:
    s = _Section(t, "kafka")
    servers = s.get("bootstrap_servers", (list, str), required=True)
    if isinstance(servers, str):
        servers = [x.strip() for x in servers.split(",") if x.strip()]
    if not servers:
        raise ConfigError("kafka.bootstrap_servers", "must list at least one host:port")
    for i, srv in enumerate(servers):
        if not isinstance(srv, str) or not re.match(r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$", srv):
            raise ConfigError(f"kafka.bootstrap_servers[{i}]", f"must be host:port, got {srv!r}")
    topic = s.get("topic", str, "volmirror.events")
    if not re.match(r"^[A-Za-z0-9._-]{1,200}$", topic):
        raise ConfigError("kafka.topic", f"invalid Kafka topic name {topic!r}")
    compression = s.get("compression", str, "none")
    if compression not in ("zstd", "lz4", "gzip", "snappy", "none"):
        raise ConfigError("kafka.compression", "must be one of zstd, lz4, gzip, snappy, none")
    opts: dict[str, Any] = {}
    for name, typ in KAFKA_PASSTHROUGH.items():
        if name in s.t:
            opts[name] = s.get(name, typ)
    kc = KafkaConfig(
        bootstrap_servers=tuple(servers),
        topic=topic,
        partitions=s.integer("partitions", 6, minimum=1, maximum=10000),
        replication_factor=s.integer("replication_factor", 0, minimum=0, maximum=32),
        retention_ms=s.integer("retention_ms", 7 * 24 * 3600 * 1000, minimum=-1),
        compression=compression,
        request_timeout_ms=s.integer("request_timeout_ms", 30000, minimum=1000),
        client_options=opts,
    )
    s.done()
    return kc


def _parse_volume(t: Any, i: int, base: Path) -> VolumeConfig:
    s = _Section(t, f"source.volumes[{i}]")
    name = s.get("name", str, required=True)
    if not VOLUME_NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(s.key("name"), f"must match [A-Za-z0-9._-]+, got {name!r}")
    path = _abs_path(s, "path", base)
    bs = s.get("block_size", int, DEFAULT_BLOCK)
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise ConfigError(s.key("block_size"), f"must be a power of two from 16384 to 1048576, got {bs}")
    exclude = s.string_list("exclude")
    pre = s.get("point_pre_command", str, "")
    post = s.get("point_post_command", str, "")
    for key, cmd in (("point_pre_command", pre), ("point_post_command", post)):
        if cmd and not cmd.strip():
            raise ConfigError(s.key(key), "must be a shell command, or left out")
    timeout = s.number("point_hook_timeout", 30.0, minimum=0.1, maximum=3600)
    s.done()
    return VolumeConfig(name=name, path=path, block_size=bs, exclude=exclude, point_pre_command=pre.strip(),
                        point_post_command=post.strip(), point_hook_timeout=timeout)


def _parse_source(t: Any, base: Path) -> SourceConfig:
    s = _Section(t, "source")
    state_dir = _abs_path(s, "state_dir", base)
    raw_vols = s.get("volumes", list, required=True)
    if not raw_vols:
        raise ConfigError("source.volumes", "must list at least one volume")
    vols = tuple(_parse_volume(v, i, base) for i, v in enumerate(raw_vols))
    names: set[str] = set()
    for i, v in enumerate(vols):
        if v.name in names:
            raise ConfigError(f"source.volumes[{i}].name", f"duplicate volume name {v.name!r}")
        names.add(v.name)
    for i, v in enumerate(vols):
        for j, w in enumerate(vols):
            if i != j and (v.path == w.path or w.path in v.path.parents):
                raise ConfigError(f"source.volumes[{i}].path", f"overlaps volume {w.name!r} ({w.path})")
        if state_dir == v.path or v.path in state_dir.parents:
            raise ConfigError("source.state_dir", f"must not be inside volume {v.name!r}")
    sc = SourceConfig(
        state_dir=state_dir,
        volumes=vols,
        host=s.get("host", str, "") or socket.gethostname(),
        heartbeat_interval=s.number("heartbeat_interval", 5.0, minimum=0.1, maximum=3600),
        reconcile_interval=s.number("reconcile_interval", 600.0, minimum=1.0),
        debounce_ms=s.integer("debounce_ms", 50, minimum=0, maximum=60000),
        max_delay_ms=s.integer("max_delay_ms", 1000, minimum=1, maximum=600000),
        announce_interval=s.number("announce_interval", 30.0, minimum=0.5),
        checkpoint_interval=s.number("checkpoint_interval", 60.0, minimum=0.5),
        point_interval=_point_interval(s),
        point_quiet_ms=s.integer("point_quiet_ms", 50, minimum=10, maximum=60000),
        compression=_payload_codec(s),
    )
    s.done()
    for i, v in enumerate(vols):
        if v.point_pre_command and v.point_hook_timeout <= sc.point_quiet_ms / 1000:
            raise ConfigError(f"source.volumes[{i}].point_hook_timeout", f"must be longer than source.point_quiet_ms "
                              f"({sc.point_quiet_ms} ms): a point needs that long without a change after the pre-command")
    if sc.point_interval == 0:
        for i, v in enumerate(vols):
            for key in ("point_pre_command", "point_post_command"):
                if getattr(v, key):
                    raise ConfigError(f"source.volumes[{i}].{key}", "runs at restore points, but source.point_interval = 0 turns them off")
    return sc


def _point_interval(s: "_Section") -> float:
    v = s.number("point_interval", 2.0, minimum=0.0, maximum=86400)
    if 0 < v < 0.1:
        raise ConfigError(s.key("point_interval"), f"must be 0 (no restore points) or at least 0.1 seconds, got {v}")
    return v


def _guard_mode(s: "_Section") -> str:
    g = s.get("guard", str, "alert")
    if g not in ("off", "alert", "pause"):
        raise ConfigError(s.key("guard"), f"must be one of off, alert, pause, got {g!r}")
    return g


def _payload_codec(s: "_Section") -> str:
    c = s.get("compression", str, "zstd")
    if c not in codec.CHOICES:
        raise ConfigError(s.key("compression"), f"must be one of {', '.join(codec.CHOICES)}, got {c!r}")
    return c


def _parse_mirror(t: Any, base: Path) -> MirrorConfig:
    s = _Section(t, "mirror")
    root = _abs_path(s, "root", base)
    state_dir = _abs_path(s, "state_dir", base)
    if state_dir == root or root in state_dir.parents:
        raise ConfigError("mirror.state_dir", "must not be inside mirror.root")
    group = s.get("group_id", str, required=True)
    if not group.strip():
        raise ConfigError("mirror.group_id", "must not be empty")
    vols = s.string_list("volumes")
    for i, v in enumerate(vols):
        if not VOLUME_NAME_RE.match(v):
            raise ConfigError(f"mirror.volumes[{i}]", f"must match [A-Za-z0-9._-]+, got {v!r}")
    accept = s.string_list("accept_new_source")
    for i, v in enumerate(accept):
        if not VOLUME_NAME_RE.match(v):
            raise ConfigError(f"mirror.accept_new_source[{i}]", f"must match [A-Za-z0-9._-]+, got {v!r}")
    mc = MirrorConfig(
        root=root,
        state_dir=state_dir,
        group_id=group,
        volumes=vols,
        commit_interval_ms=s.integer("commit_interval_ms", 1000, minimum=10, maximum=600000),
        repair=s.get("repair", bool, True),
        scrub_rate_mib=s.number("scrub_rate_mib", 64.0, minimum=0.0),
        rpo_seconds=s.number("rpo_seconds", 60.0, minimum=1.0),
        max_file_size=s.integer("max_file_size", 1 << 44, minimum=1 << 20, maximum=1 << 62),
        accept_new_source=accept,
        history_dir=_abs_path(s, "history_dir", base) if "history_dir" in t else None,
        history_hours=s.number("history_hours", 24.0, minimum=0.0, maximum=24 * 366),
        history_max_gib=s.number("history_max_gib", 10.0, minimum=0.0),
        guard=_guard_mode(s),
        guard_window_s=s.number("guard_window_s", 60.0, minimum=1.0, maximum=86400),
        guard_min_files=s.integer("guard_min_files", 100, minimum=1),
        guard_fraction=s.number("guard_fraction", 0.05, minimum=0.0, maximum=1.0),
    )
    if mc.history_dir is not None and (mc.history_dir == root or root in mc.history_dir.parents):
        raise ConfigError("mirror.history_dir", "must not be inside mirror.root")
    s.done()
    return mc


def _parse_metrics(t: Any) -> MetricsConfig:
    s = _Section(t, "metrics")
    listen = s.get("listen", str, "127.0.0.1:9464")
    m = re.match(r"^(\[[0-9a-fA-F:]+\]|[^\s:\[\]]+):(\d{1,5})$", listen)
    if not m or not (0 <= int(m.group(2)) <= 65535):
        raise ConfigError("metrics.listen", f"must be host:port, got {listen!r}")
    s.done()
    return MetricsConfig(listen=listen)


def _parse_logging(t: Any) -> LoggingConfig:
    s = _Section(t, "logging")
    fmt = s.get("format", str, "auto")
    if fmt not in ("auto", "text", "json"):
        raise ConfigError("logging.format", "must be auto, text or json")
    level = s.get("level", str, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("logging.level", "must be debug, info, warning or error")
    s.done()
    return LoggingConfig(format=fmt, level=level)


def parse(data: dict[str, Any], path: Path) -> Config:
    """Validate an already-decoded TOML document."""
    base = path.parent.resolve()
    top = _Section(data, "")
    for name in ("kafka", "source", "mirror", "metrics", "logging"):
        top.seen.add(name)
    top.done()
    if "kafka" not in data:
        raise ConfigError("kafka", "section [kafka] is required")
    cfg = Config(
        path=path,
        kafka=_parse_kafka(data["kafka"]),
        source=_parse_source(data["source"], base) if "source" in data else None,
        mirror=_parse_mirror(data["mirror"], base) if "mirror" in data else None,
        metrics=_parse_metrics(data.get("metrics", {})),
        logging=_parse_logging(data.get("logging", {})),
    )
    if cfg.source is None and cfg.mirror is None:
        raise ConfigError("source", "at least one of [source] or [mirror] is required")
    return cfg


def load(path: str | Path) -> Config:
    """Read and validate a config file; every failure is a ConfigError naming a key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{p} is not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{p} is not valid TOML: {e}") from None
    return parse(data, p)
