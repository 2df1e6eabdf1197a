"""volmirror: near-live, verified mirroring of file volumes over Apache Kafka."""

__version__ = "0.1.0"
