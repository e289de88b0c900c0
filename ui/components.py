"""Pieces more than one page draws: the live job panel and small formatting helpers."""

from __future__ import annotations

import streamlit as st

from engine import jobs
from engine.metrics import round_half_up
from ui import state

LOG_LINES = 12


def _cancel(run_id: str) -> None:
    # A callback: it runs before the panel redraws, so the panel already shows the stopped job.
    stopped = jobs.cancel(state.workspace_path(), run_id)
    st.session_state[f"_cancel_msg_{run_id}"] = (
        f"Cancelled {run_id}: `selfrat resume {run_id}` (or Launch, next iteration) continues it."
        if stopped else f"The job of {run_id} had already finished.")
    state.clear()


def _job_body(run_id: str, allow_cancel: bool) -> None:
    ws = state.workspace_path()
    info = jobs.status(ws, run_id)
    # When the job moves to another stage or ends, rerun the whole page so its tables and charts show
    # the new rows at once (the fragment alone only redraws this panel).
    progress = info.get("progress") or {}
    phase = (info.get("running"), info.get("run_status"), progress.get("iteration"), progress.get("stage"))
    seen_key = f"_job_phase_{run_id}"
    seen = st.session_state.get(seen_key)
    st.session_state[seen_key] = phase
    if seen is not None and seen != phase:
        state.clear()
        st.rerun(scope="app")
    message = st.session_state.pop(f"_cancel_msg_{run_id}", None)
    if message:
        st.info(message)
    if not info.get("running"):
        st.caption(f"No job running for {run_id} (run status: {info.get('run_status') or 'unknown'}).")
        failed = info.get("run_status") == "failed" or (
            info.get("returncode") not in (None, 0) and info.get("run_status") not in ("cancelled", "done"))
        if failed:
            st.error(f"The last job of {run_id} failed (exit code {info.get('returncode')}):"
                     f" {info.get('error') or 'see its output below'}")
            st.code("\n".join(jobs.tail(ws, run_id, LOG_LINES, which="out")) or "(no output)", language=None)
        lines = jobs.tail(ws, run_id, LOG_LINES)
        if lines:
            with st.expander("Last log lines"):
                st.code("\n".join(lines), language=None)
        return
    stage, iteration = progress.get("stage"), progress.get("iteration")
    done, total = progress.get("done") or 0, progress.get("total") or 0
    st.markdown(f"**Running** `{run_id}` (pid {info.get('pid')})"
                + (f": iteration {iteration}, stage **{stage}**" if stage else ": starting"))
    st.progress(min(done / total, 1.0) if total else 0.0, text=f"{done} / {total}" if total else "waiting")
    st.code("\n".join(jobs.tail(ws, run_id, LOG_LINES)) or "(no log yet)", language=None)
    if allow_cancel:
        st.button("Cancel job", key=f"cancel_{run_id}", on_click=_cancel, args=(run_id,))


@st.fragment(run_every="2s")
def job_panel(run_id: str, allow_cancel: bool = True) -> None:
    """The run's job: stage, progress bar and log tail, refreshed every 2 s without rerunning the page."""
    _job_body(run_id, allow_cancel)


def gold_label(gold) -> str:
    if gold is None:
        return "none"
    return f"{gold:g}" if float(gold) != round(float(gold)) else str(int(round(float(gold))))


def rounded_gold(gold) -> int | None:
    """Rounded half up (engine.metrics.round_half_up), as curation and the queries round it."""
    return None if gold is None else round_half_up(float(gold))
