"""The workspace database (DuckDB): schema, migrations, every read and write. Imports neither engine nor ui."""

from store.db import StoreBusy
from store.errors import Cancelled, SelfratError, UsageError
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
    "PAIR_STATUSES", "STAGES", "TRAINABLE_STATUSES", "Cancelled", "SelfratError", "Store", "StoreBusy", "StoreError",
    "UsageError", "default_who", "judgment_id",
]
