"""The workspace database (DuckDB): schema, migrations, every read and write. Imports neither engine nor ui."""

from store.db import StoreBusy
from store.store import (
    PAIR_STATUSES,
    STAGES,
    TRAINABLE_STATUSES,
    Store,
    StoreError,
    default_who,
    judgment_id,
)

__all__ = [
    "PAIR_STATUSES", "STAGES", "TRAINABLE_STATUSES", "Store", "StoreBusy", "StoreError", "default_who",
    "judgment_id",
]
