"""Data sources and the prepared, memory-mapped store.

    resolve_source(source, cache_dir) -> Path        explicit path, $FASTCIFAR_SOURCE, or checked download
    prepare_store(source, out, force=..., log=...)   build the store (all-or-nothing), returns meta
    verify_store(store_dir) -> meta                  re-hash arrays against meta.json
    open_store(store_dir, verify=False) -> Store     memory-mapped arrays + meta
"""

from fastcifar.data.sources import OFFICIAL_MD5, OFFICIAL_URL, resolve_source
from fastcifar.data.store import Store, open_store, prepare_store, verify_store

__all__ = [
    "OFFICIAL_MD5",
    "OFFICIAL_URL",
    "Store",
    "open_store",
    "prepare_store",
    "resolve_source",
    "verify_store",
]
