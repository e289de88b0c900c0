"""Pairs: review an iteration's curated preference pairs one at a time (keyboard-driven), edit the chosen
side, leave notes, bulk accept/reject the current filter, and read the audit history.

Every action is one `Store.review_pairs` call (one transaction with its audit rows) made with the
sidebar's "who", the same call `selfrat pairs accept|reject|swap|edit|note` makes; the read cache is cleared
afterwards so the next run shows the new state.
"""

from __future__ import annotations

import polars as pl
import streamlit as st

from engine.parsing import parse_judgment
from store import PAIR_STATUSES, StoreError, queries
from ui import components, state

ALL = "all"
INDEX_KEY = "pair_index"
FLASH_KEY = "_pairs_flash"

st.title("Pairs")

run_id = state.run_picker()
if run_id is None:
    st.stop()
counts_all = state.cached(queries.pair_counts, run_id)
curated = sorted(set(counts_all["iteration"].to_list())) if counts_all.height else []
# GRPO iterations (training.method grpo) have no pairs: their curate stage is skipped, with the reason stored.
iteration_rows = state.cached(queries.iterations_table, run_id)
for k in iteration_rows.filter((pl.col("iteration") > 0) & (pl.col("curate_status") == "skipped"))["iteration"]:
    report = state.cached(queries.curate_report, run_id, k) or {}
    if report.get("method") == "grpo":
        st.info(f"Iteration {k} trained with GRPO: curation is skipped ({report.get('reason', 'no pairs')}). "
                "Its rollouts, with their rewards, are on the Judgments page (purpose rollout).")
if not curated:
    st.info(f"Run {run_id} has no curated iteration yet: pairs appear after its first curate stage.")
    st.stop()
c = st.columns([1, 1, 3])
with c[0]:
    iteration = state.iteration_picker(run_id, options=curated)
status_choice = c[1].selectbox("Status", [ALL, *PAIR_STATUSES], key="p_status")
status = None if status_choice == ALL else status_choice

counts = counts_all.filter(pl.col("iteration") == iteration)
metric_cols = st.columns(len(PAIR_STATUSES) + 1)
metric_cols[0].metric("all", int(counts["n"].sum()))
for col, row in zip(metric_cols[1:], counts.iter_rows(named=True)):
    col.metric(row["status"], row["n"])

# The position in the filtered list; a new run/iteration/filter starts at the first pair.
view = (run_id, iteration, status)
if st.session_state.get("_pairs_view") != view:
    st.session_state["_pairs_view"] = view
    st.session_state[INDEX_KEY] = 0

page, total = state.cached(queries.pairs_page, run_id, iteration, status, 0, 1)
if total == 0:
    st.info("No pairs under this filter.")
    st.stop()
index = min(max(st.session_state.get(INDEX_KEY, 0), 0), total - 1)
st.session_state[INDEX_KEY] = index
if index:
    page, total = state.cached(queries.pairs_page, run_id, iteration, status, index, 1)
pair = page.row(0, named=True)
pair_id = int(pair["pair_id"])


def act(pair_ids: list[int] | None, action: str, advance: bool = False, **kw) -> None:
    """A review action through `Store.review_pairs`, the write `selfrat pairs ACTION` makes: the given pairs,
    or with None every pair under the status filter, picked at click time (a button callback: it runs
    before the rerun that shows its result)."""
    try:
        reviews = state.store().review_pairs(run_id, iteration, action, state.who(), pair_ids,
                                             status=status if pair_ids is None else None, **kw)
    except StoreError as e:
        st.session_state[FLASH_KEY] = ("error", str(e))
        return
    state.clear()
    n = len(reviews)
    st.session_state[FLASH_KEY] = ("success", f"{action} ({n} pair{'s' if n != 1 else ''}) by {state.who()}")
    # A pair that leaves the filter makes room for the next one at the same index; otherwise step on.
    if advance and status in (None, {"accept": "accepted", "reject": "rejected"}.get(action)):
        st.session_state[INDEX_KEY] = st.session_state.get(INDEX_KEY, 0) + 1


def move(step: int) -> None:
    st.session_state[INDEX_KEY] = min(max(st.session_state.get(INDEX_KEY, 0) + step, 0), total - 1)


flash = st.session_state.pop(FLASH_KEY, None)
if flash:
    (st.error if flash[0] == "error" else st.success)(flash[1])

# ------------------------------------------------------------------ the current pair

st.subheader(f"Pair {index + 1} of {total}")
st.caption(f"pair {pair_id} · item {pair['item_id']} · status **{pair['status']}**"
           + (" · swapped" if pair["swapped"] else "") + f" · margin {pair['margin']:g}"
           + (f" · last by {pair['updated_by']} at {pair['updated_at']:%Y-%m-%d %H:%M}" if pair["updated_by"] else ""))

b = st.columns(5)
b[0].button("Accept", key="p_accept", shortcut="a", type="primary", on_click=act, args=([pair_id], "accept", True),
            help="Keep this pair for training (a)")
b[1].button("Reject", key="p_reject", shortcut="x", on_click=act, args=([pair_id], "reject", True),
            help="Leave this pair out of training (x; 'r' is reserved by Streamlit)")
b[2].button("Swap", key="p_swap", shortcut="s", on_click=act, args=([pair_id], "swap"),
            help="Exchange chosen and rejected (s)")
b[3].button("Prev", key="p_prev", shortcut="k", on_click=move, args=(-1,), disabled=index == 0, help="k")
b[4].button("Next", key="p_next", shortcut="j", on_click=move, args=(1,), disabled=index >= total - 1, help="j")

with st.expander("Item", expanded=True):
    st.markdown(f"**Gold score: {components.gold_label(pair['gold_score'])}**"
                + (f" · criteria: {pair['criteria']}" if pair["criteria"] else ""))
    left, right = st.columns(2)
    left.markdown("**Instruction**")
    left.text(pair["instruction"] or "")
    if pair["input"]:
        left.markdown("**Input**")
        left.text(pair["input"])
    right.markdown("**Response**")
    right.text(pair["response"] or "")
    if pair["reference"]:
        st.markdown("**Reference answer**")
        st.text(pair["reference"])

chosen_col, rejected_col = st.columns(2)
with chosen_col.container(border=True):
    if pair["status"] == "edited" and pair["edited_rationale"]:
        st.markdown(f"**Chosen (edited)** · score **{pair['edited_score']}**")
        st.text(pair["edited_rationale"])
        with st.expander(f"Original chosen · score {pair['chosen_score']}"):
            st.text(pair["chosen_text"] or "")
    else:
        st.markdown(f"**Chosen** · score **{pair['chosen_score']}**")
        st.text(pair["chosen_text"] or "")
with rejected_col.container(border=True):
    st.markdown(f"**Rejected** · score **{pair['rejected_score']}**")
    st.text(pair["rejected_text"] or "")

edit_col, note_col = st.columns(2)
# Keyed by the pair's last review too: after a swap or an edit the fields start again from the new chosen
# side (a widget keeps its own state while its key stays the same, whatever its default says).
rev = f"{pair_id}_{pair['updated_at']:%Y%m%d%H%M%S%f}" if pair["updated_at"] else str(pair_id)
edit_keys = (f"p_edit_rationale_{rev}", f"p_edit_score_{rev}", f"p_note_{rev}")
with edit_col.form(f"edit_{rev}"):
    st.markdown("**Edit the chosen side** (status becomes edited)")
    # The rationale without its score form: training writes the score back from the edited score.
    base = pair["edited_rationale"] or parse_judgment(pair["chosen_text"] or "").rationale
    default_score = pair["edited_score"] or components.rounded_gold(pair["gold_score"]) or pair["chosen_score"] or 3
    st.text_area("Rationale", value=base, key=edit_keys[0], height=160)
    st.number_input("Score", min_value=1, max_value=5, value=int(default_score), step=1, key=edit_keys[1])
    st.form_submit_button("Save edit", on_click=lambda: act(
        [pair_id], "edit", rationale=st.session_state[edit_keys[0]], score=int(st.session_state[edit_keys[1]])))
with note_col.form(f"note_{rev}"):
    st.markdown("**Note** (kept with the pair; status unchanged)")
    st.text_input("Note", value=pair["note"] or "", key=edit_keys[2])
    st.form_submit_button("Save note", on_click=lambda: act([pair_id], "note", note=st.session_state[edit_keys[2]]))

# ------------------------------------------------------------------ bulk


def bulk(action: str) -> None:
    act(None, action)  # every pair the filter holds at click time, as `selfrat pairs ACTION --all --status S`
    st.session_state["p_bulk_confirm"] = False  # one confirmation, one bulk action


with st.container(border=True):
    scope = f"all {total} pairs with status {status}" if status else f"all {total} pairs of iteration {iteration}"
    st.markdown(f"**Bulk** on the current filter: {scope}")
    confirm = st.checkbox(f"I mean {scope}", key="p_bulk_confirm")
    bc = st.columns(2)
    bc[0].button("Bulk accept", key="p_bulk_accept", disabled=not confirm, on_click=bulk, args=("accept",))
    bc[1].button("Bulk reject", key="p_bulk_reject", disabled=not confirm, on_click=bulk, args=("reject",))

# ------------------------------------------------------------------ history

with st.expander("History"):
    st.markdown("**This pair**")
    st.dataframe(state.cached(queries.audit_history, run_id, pair_id=pair_id), hide_index=True,
                 key="p_history_pair")
    st.markdown(f"**Iteration {iteration}**")
    st.dataframe(state.cached(queries.audit_history, run_id, iteration=iteration), hide_index=True,
                 key="p_history_iteration")
