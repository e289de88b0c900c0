"""Overview: every run, the selected run's iterations and stage status, eval metrics over iterations,
parse failures, pair counts by review status, and the running job."""

from __future__ import annotations

import plotly.express as px
import polars as pl
import streamlit as st

from engine.demo import side_by_side
from engine.metrics import HEADLINE_METRICS
from store import Store, queries
from ui import components, state

st.title("Overview")

runs = state.cached(queries.runs_overview)
st.subheader("Runs")
if runs.height == 0:
    st.info("No runs yet. Import data (`selfrat import ...`) and start one on the Launch page.")
    st.stop()
st.dataframe(runs, hide_index=True, key="runs_table")

run_id = state.run_picker()
if run_id is None:
    st.stop()

st.subheader(f"Iterations of {run_id}")
iters = state.cached(queries.iterations_table, run_id)
if iters.height:
    shown = iters.with_columns((1 - pl.col("parse_rate")).alias("parse_failure_rate"))
    st.dataframe(shown.drop("parse_rate"), hide_index=True, key="iterations_table",
                 column_config={"parse_failure_rate": st.column_config.NumberColumn(format="%.3f")})
else:
    st.caption("No iteration has started yet.")

components.job_panel(run_id)

judges = side_by_side(state.cached(Store.run_status, run_id))
if judges:
    st.subheader("Judges side by side")
    st.caption("The headline metrics of each judge on each eval set: the raw model (when the run evaluated it, "
               "baseline `raw`), the initial judge (J_SFT after a seed SFT), then each iteration.")
    st.dataframe(pl.DataFrame(judges), hide_index=True, key="judges_table")

st.subheader("Evaluation metrics over iterations")
st.caption("Iteration 0 is the seed judge, before any training.")
metrics = state.cached(queries.metrics_long, run_id)
if metrics.height == 0:
    st.caption("No evaluation metrics yet.")
else:
    # Each iteration's own figures; baselines ('<method>/<metric>') and intervals are on the Evaluation page.
    available = sorted({m for m in metrics["metric"].to_list() if "/" not in m and not m.endswith(("_lo", "_hi"))})
    default = [m for m in HEADLINE_METRICS if m in available] or available[:3]
    picked = st.multiselect("Metrics", available, default=default, key="overview_metrics")
    datasets = sorted(set(metrics["dataset"].to_list()))
    cols = st.columns(min(len(datasets), 2) or 1)
    for i, name in enumerate(datasets):
        data = metrics.filter((pl.col("dataset") == name) & pl.col("metric").is_in(picked)).sort("iteration")
        fig = px.line(data, x="iteration", y="value", color="metric", markers=True, title=name)
        fig.update_xaxes(dtick=1)
        cols[i % len(cols)].plotly_chart(fig, key=f"metrics_{name}")

if metrics.height:
    st.subheader("Calibration and saturation")
    st.caption("From the five score probabilities stored with each greedy judgment: a reliability diagram "
               "(confidence in the top score vs how often it equals gold; the diagonal is perfect calibration) "
               "and the mean entropy of the score distribution per iteration (a collapse flags overconfidence).")
    saturated = metrics.filter((pl.col("metric") == "saturated") & (pl.col("value") == 1))
    for row in saturated.iter_rows(named=True):
        st.warning(f"Iteration {row['iteration']}, {row['dataset']}: score saturation (one score takes more than "
                   "half of the judgments while gold is balanced).")
    bins = state.cached(queries.reliability, run_id)
    c = st.columns(2)
    if bins.height:
        fig = px.line(bins.sort("iteration", "dataset", "confidence").with_columns(
            pl.format("iteration {} · {}", pl.col("iteration"), pl.col("dataset")).alias("judge")),
            x="confidence", y="accuracy", color="judge", markers=True, hover_data=["n"],
            range_x=[0, 1], range_y=[0, 1], title="Reliability diagram")
        fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "grey"})
        c[0].plotly_chart(fig, key="reliability")
    entropy = metrics.filter(pl.col("metric") == "mean_entropy").sort("iteration")
    if entropy.height:
        fig = px.line(entropy, x="iteration", y="value", color="dataset", markers=True,
                      title="Mean entropy of the score distribution (nats; uniform = 1.609)")
        fig.update_xaxes(dtick=1)
        c[1].plotly_chart(fig, key="entropy")

if iters.height:
    st.subheader("Parse failures")
    rate = iters.filter(pl.col("parse_rate").is_not_null()).with_columns(
        (1 - pl.col("parse_rate")).alias("parse_failure_rate"))
    if rate.height:
        fig = px.bar(rate, x="iteration", y="parse_failure_rate", range_y=[0, 1],
                     title="Share of judgments without a parsed score (all purposes)")
        fig.update_xaxes(dtick=1)
        st.plotly_chart(fig, key="parse_failures")

st.subheader("Pairs by review status")
counts = state.cached(queries.pair_counts, run_id)
if counts.height == 0:
    st.caption("No curated pairs yet.")
else:
    wide = counts.pivot(on="status", index="iteration", values="n").sort("iteration")
    st.dataframe(wide, hide_index=True, key="pair_counts_table")
    fig = px.bar(counts, x="iteration", y="n", color="status", barmode="stack")
    fig.update_xaxes(dtick=1)
    st.plotly_chart(fig, key="pair_counts_chart")
