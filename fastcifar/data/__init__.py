"""Data sources and the prepared, memory-mapped store.

    resolve_source(source, cache_dir) -> Path        explicit path, $FASTCIFAR_SOURCE, or checked download
    prepare_store(source, out, force=..., log=..., options=ReadOptions(...))   build the store (all-or-nothing)
    verify_store(store_dir) -> meta                  re-hash arrays against meta.json
    open_store(store_dir, verify=False) -> Store     memory-mapped arrays + meta
"""

from fastcifar.data.readers import DATASETS, ReadOptions
from fastcifar.data.sources import OFFICIAL_MD5, OFFICIAL_URL, resolve_source
from fastcifar.data.store import Store, open_store, prepare_store, store_stats, verify_store

__all__ = [
    "DATASETS",
    "OFFICIAL_MD5",
    "OFFICIAL_URL",
    "ReadOptions",
    "Store",
    "open_store",
    "prepare_store",
    "store_stats",
    "resolve_source",
    "verify_store",
]
