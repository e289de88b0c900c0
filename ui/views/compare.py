"""Compare: two iterations of a run side by side: the headline figures paired on the items both judged
(B - A with a 95% paired-bootstrap interval and p, engine.compare), every stored metric's raw delta, per-item
score drift, and the rationales the two judges wrote for one item, diffed."""

from __future__ import annotations

import difflib
import re

import plotly.express as px
import polars as pl
import streamlit as st

from engine.compare import compare_judges, judge_datasets, paired_rows
from store import SelfratError, queries
from ui import state

TABLE_ROWS = 500  # items shown in the drift table (largest |drift| first); the histogram covers all

st.title("Compare iterations")

run_id = state.run_picker()
if run_id is None:
    st.stop()
its = state.iterations_of(run_id)
if len(its) < 2:
    st.info(f"Run {run_id} has {len(its)} iteration(s); comparing needs two.")
    st.stop()
c = st.columns(3)
# Defaults: the seed against the latest iteration, the comparison that says whether training helped.
if st.session_state.get("compare_a") not in its:
    st.session_state["compare_a"] = its[0]
if st.session_state.get("compare_b") not in its:
    st.session_state["compare_b"] = its[-1]
with c[0]:
    a = state.iteration_picker(run_id, its, label="Iteration A", key="compare_a")
with c[1]:
    b = state.iteration_picker(run_id, its, label="Iteration B", key="compare_b")
purpose = c[2].selectbox("Judgments", ["eval", "train"], key="compare_purpose",
                         help="eval: the evaluation judgments; train: the sampled training judgments")
if a == b:
    st.warning("Pick two different iterations.")

st.subheader("Paired comparison (B - A)")
st.caption("The headline figures of both iterations' evaluations on the items both judged; B - A with a 95% "
           "paired-bootstrap interval (items resampled, both judges at the same indices) and a two-sided p. "
           "* marks a difference whose interval excludes 0. "
           f"`selfrat compare {run_id}:{a} {run_id}:{b} --dataset D` prints the same.")
PAIRED_COLUMNS = {
    "A": st.column_config.NumberColumn(f"iteration {a}", format="%.3f"),
    "B": st.column_config.NumberColumn(f"iteration {b}", format="%.3f"),
    "B - A": st.column_config.NumberColumn("B - A", format="%+.3f"),
    "p": st.column_config.NumberColumn("p", format="%.3f"),
}
try:
    paired_datasets = sorted(set(state.cached(judge_datasets, f"{run_id}:{a}"))
                             & set(state.cached(judge_datasets, f"{run_id}:{b}")))
except SelfratError as e:
    paired_datasets = []
    st.caption(str(e))
if not paired_datasets:
    st.caption("No dataset has eval judgments in both iterations.")
for name in paired_datasets:
    try:
        paired = state.cached(compare_judges, f"{run_id}:{a}", f"{run_id}:{b}", name)
    except SelfratError as e:
        st.caption(f"{name}: {e}")
        continue
    st.markdown(f"**{name}** ({paired['kind']}, {paired['items']} items judged in both)")
    st.dataframe(pl.DataFrame(paired_rows(paired), infer_schema_length=None), hide_index=True,
                 key=f"paired_{name}", column_config=PAIRED_COLUMNS)

deltas = state.cached(queries.metric_deltas, run_id, a, b)
with st.expander("Every stored metric (raw deltas, no intervals)"):
    if deltas.height == 0:
        st.caption("No metrics stored for these iterations.")
    for name in sorted(set(deltas["dataset"].to_list())):
        st.markdown(f"**{name}**")
        st.dataframe(deltas.filter(pl.col("dataset") == name).drop("dataset"), hide_index=True,
                     key=f"deltas_{name}", column_config={
                         "value_a": st.column_config.NumberColumn(f"iteration {a}", format="%.3f"),
                         "value_b": st.column_config.NumberColumn(f"iteration {b}", format="%.3f"),
                         "delta": st.column_config.NumberColumn("delta", format="%+.3f")})

st.subheader("Score drift per item")
summary = state.cached(queries.compare_summary, run_id, a, b, purpose)
if not summary["items"]:
    st.caption(f"No item has {purpose} judgments in both iterations.")
    st.stop()
m = st.columns(4)
m[0].metric("Items judged in both", summary["items"])
m[1].metric("Changed score", summary["changed"])
m[2].metric("Up / down", f"{summary['up']} / {summary['down']}")
m[3].metric("Mean |drift|", f"{summary['mean_abs_drift'] or 0:.2f}")

rows = state.cached(queries.compare_iterations, run_id, a, b, purpose, TABLE_ROWS)
left, right = st.columns(2)
hist = state.cached(queries.drift_histogram, run_id, a, b, purpose).filter(pl.col("drift").is_not_null())
# Drift as categories: one evenly sized bar per observed value, in numeric order.
hist = hist.sort("drift").with_columns(pl.col("drift").cast(pl.String))
fig = px.bar(hist, x="drift", y="n", title=f"Drift (score in {b} - score in {a})",
             category_orders={"drift": hist["drift"].to_list()})
left.plotly_chart(fig, key="drift_histogram")
scored = rows.filter(pl.col("score_a").is_not_null() & pl.col("score_b").is_not_null())
if scored.height:
    counts = scored.group_by("score_a", "score_b").len("items")
    fig = px.scatter(counts, x="score_a", y="score_b", size="items", title="Score in A vs score in B",
                     labels={"score_a": f"iteration {a}", "score_b": f"iteration {b}"})
    fig.add_shape(type="line", x0=1, y0=1, x1=5, y1=5, line={"dash": "dot", "color": "gray"})
    right.plotly_chart(fig, key="drift_scatter")
st.caption(f"{min(rows.height, TABLE_ROWS)} of {summary['items']} items, largest |drift| first.")
st.dataframe(rows.drop("rationale_a", "rationale_b"), hide_index=True, key="drift_table",
             column_config={"item_id": st.column_config.TextColumn()})

st.subheader("Rationales")
keys = [(r["item_id"], r["side"]) for r in rows.select("item_id", "side").iter_rows(named=True)]
pick = st.selectbox("Item", keys, key="compare_item",
                    format_func=lambda key: f"{key[0]}" + (f" (side {key[1]})" if key[1] != "a" else ""))
row = rows.filter((pl.col("item_id") == pick[0]) & (pl.col("side") == pick[1])).row(0, named=True)
st.markdown(f"**Instruction**: {row['instruction'][:400]}")
if item_input := state.cached(queries.item_detail, pick[0]).get("input"):
    st.markdown("**Input**")
    st.text(item_input[:400])
st.caption(f"gold {row['gold_score']} · score {row['score_a']} in {a} → {row['score_b']} in {b}")
la, lb = st.columns(2)
la.markdown(f"**Iteration {a}**")
la.text(row["rationale_a"] or "(no rationale)")
lb.markdown(f"**Iteration {b}**")
lb.text(row["rationale_b"] or "(no rationale)")


def _sentences(text: str | None) -> list[str]:
    # A rationale is usually one long line; diff it sentence by sentence so changes line up.
    return [s for s in re.split(r"(?<=[.!?])\s+", text or "") if s]


with st.expander("Diff"):
    table = difflib.HtmlDiff(wrapcolumn=60).make_table(
        _sentences(row["rationale_a"]), _sentences(row["rationale_b"]),
        fromdesc=f"iteration {a}", todesc=f"iteration {b}")
    st.html("<style>.diff_add{background:#d4f7d4}.diff_chg{background:#fff3b0}.diff_sub{background:#f7d4d4}"
            "table.diff{font-size:0.85em}</style>" + table)
