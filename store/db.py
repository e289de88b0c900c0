"""Short-lived DuckDB connections that wait out the other process's lock.

DuckDB lets one process hold a file read-write, and while it does no other process can open the file at
all (not even read-only). selfrat has two kinds of processes on one workspace: a job (sampling, training)
and the app or `selfrat status`. So no process keeps a connection open: every read and every write opens
the file, does its work in one transaction and closes it (~40 ms). When the other process holds the file,
`connect()` retries with jittered backoff until `timeout_s`, so a user sees a short wait, never a lock
error, and no edit is dropped. Jobs write in small batches, so the lock is free most of the time.

Connections are always opened read-write: DuckDB refuses a read-only and a read-write connection to the
same file inside one process, and Streamlit serves sessions from threads of one process.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from store.errors import SelfratError

DEFAULT_TIMEOUT_S = 120.0


class StoreBusy(SelfratError, RuntimeError):
    """The workspace database stayed locked by another process for longer than the timeout."""


def _is_lock_error(err: Exception) -> bool:
    msg = str(err).lower()
    return "lock" in msg and ("conflict" in msg or "could not set" in msg)


@contextlib.contextmanager
def connect(path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open `path`, retrying while another process holds it; always closes."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            con = duckdb.connect(str(path))
            break
        except duckdb.IOException as e:
            if not _is_lock_error(e):
                raise
            if time.monotonic() > deadline:
                raise StoreBusy(f"{path} stayed locked by another process for {timeout_s:.0f} s") from e
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)
    try:
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def transaction(path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """One connection, one transaction: committed on success, rolled back on any error."""
    with connect(path, timeout_s) as con:
        con.begin()
        try:
            yield con
        except BaseException:
            con.rollback()
            raise
        con.commit()
