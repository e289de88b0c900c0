"""What every page shares: the workspace, the Store, cached reads, the run/iteration pickers, who is acting.

Reads go through `cached(fn, *args)`: one `st.cache_data` wrapper keyed by the function's name, its
arguments and `Store.data_version()` (file modification times, read without opening DuckDB), so a page
shows a finished stage or another reviewer's edit on its next rerun, and cached frames are reused until
then. Pickers keep their choice under plain session_state keys ("run_id", "iteration"): widget state is
dropped when a page that does not render the widget runs, plain keys survive page switches.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from engine.workspace import Workspace, default_workspace
from store import Store, default_who, queries

RUN_KEY = "run_id"
ITERATION_KEY = "iteration"
WHO_KEY = "who"


def workspace_path() -> Path:
    return default_workspace().resolve()


def workspace() -> Workspace:
    return Workspace.open(workspace_path())


@st.cache_resource(show_spinner=False)
def _store(path: str) -> Store:
    # A Store holds a path, never an open connection, so one instance can serve every session thread.
    return Store.in_workspace(path)


def store() -> Store:
    return _store(str(workspace_path()))


def _resolve(name: str) -> Callable:
    """'module:Qual.name' -> the function (Store methods resolve to the unbound method, called with the store)."""
    module, qualname = name.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@st.cache_data(show_spinner=False, max_entries=512)
def _cached_call(name: str, path: str, version: tuple, args: tuple, kwargs: dict) -> Any:
    # `path` and `version` are only part of the key: a new workspace or any write makes a new entry.
    return _resolve(name)(_store(path), *args, **kwargs)


def cached(fn: Callable, *args, **kwargs) -> Any:
    """`fn(store, *args, **kwargs)` for a store.queries function (or a Store method, e.g. `Store.datasets`),
    cached until the workspace database changes."""
    s = store()
    name = f"{fn.__module__}:{fn.__qualname__}"
    return _cached_call(name, str(s.path.parent), s.data_version(), args, kwargs)


def clear() -> None:
    """Drop cached reads after a write: two writes within one file-time tick would leave the version equal."""
    _cached_call.clear()


def who() -> str:
    return st.session_state.get(WHO_KEY) or default_who()


# ------------------------------------------------------------------ pickers shared by pages


def _persistent_select(label: str, options: list, key: str, *, where=st, format_func=str, help=None):
    """A selectbox whose choice lives in session_state[key] across pages (the widget key is private)."""
    if not options:
        st.session_state.pop(key, None)
        return None
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[-1]
    widget_key = f"_pick_{key}"
    # The callback copies a user's pick into the plain key before the script reruns, so seeding the widget
    # from the plain key each run also follows picks made elsewhere (another page, a launch).
    st.session_state[widget_key] = st.session_state[key]
    value = where.selectbox(label, options, key=widget_key, format_func=format_func, help=help,
                            on_change=lambda: st.session_state.__setitem__(key, st.session_state[widget_key]))
    st.session_state[key] = value
    return value


def run_picker(where=st) -> str | None:
    runs = cached(queries.runs_overview)
    ids = runs["run_id"].to_list() if runs.height else []
    if not ids:
        st.info("No runs in this workspace yet: start one on the Launch page (or `selfrat run config.yaml`).")
        return None
    return _persistent_select("Run", ids, RUN_KEY, where=where)


def iterations_of(run_id: str) -> list[int]:
    table = cached(queries.iterations_table, run_id)
    return sorted(table["iteration"].to_list()) if table.height else []


def iteration_picker(run_id: str, options: list[int] | None = None, where=st, label: str = "Iteration",
                     key: str = ITERATION_KEY) -> int | None:
    options = iterations_of(run_id) if options is None else options
    if not options:
        st.info(f"Run {run_id} has no iterations with data yet.")
        return None
    return _persistent_select(label, options, key, where=where,
                              format_func=lambda k: f"{k} (seed)" if k == 0 else str(k))
