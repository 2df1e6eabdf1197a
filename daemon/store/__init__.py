"""Persistent state, one module per store, each with one owner.

* :mod:`.source_index` — the source's per-volume index (what the mirror has been told) and the
  durable sequence allocator; owned by the volume's worker, written only through a Batch.
* :mod:`.mirror_index` — the mirror's index, progress and quarantine; owned by the apply actor.
* :mod:`.listing_spool` — listings being received, verified part by part; owned by the apply actor.
"""
