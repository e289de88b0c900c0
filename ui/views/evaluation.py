"""Evaluation: every judge of a run side by side on one dataset (each iteration, and the baselines on the
seed: self-consistency, best-of-N, single-stage DPO, relative A/B), with 95% intervals, one iteration paired
against the seed and each baseline on the items both judged (engine.compare), per-group breakdowns (rubric,
capability, RewardBench section) and the run's contamination and curation reports."""

from __future__ import annotations

import plotly.express as px
import polars as pl
import streamlit as st

from engine.compare import compare_judges, judge_datasets, paired_rows, parse_judge, stored_judges
from engine.metrics import HEADLINE_METRICS
from store import SelfratError, queries
from ui import state

HEADLINE = (*HEADLINE_METRICS, "n")  # and how many items each figure is over

st.title("Evaluation")

run_id = state.run_picker()
if run_id is None:
    st.stop()

contamination = state.cached(queries.run_reports, run_id).get("contamination") or {}
if contamination.get("overlapping_items"):
    st.warning(f"{contamination['overlapping_items']} training items of this run also occur in its eval sets; "
               "they were left out of training (allow_contamination).")

figures = state.cached(queries.judge_metrics, run_id)
if figures.height == 0:
    st.info("No evaluation figures yet.")
    st.stop()
figures = figures.with_columns(
    pl.format("iteration {} · {}", pl.col("iteration"), pl.col("method")).alias("judge"))
dataset = st.selectbox("Dataset", sorted(set(figures["dataset"].to_list())), key="evaluation_dataset")
data = figures.filter(pl.col("dataset") == dataset)

st.subheader("Judges")
st.caption("Iteration 0 is the seed; methods other than greedy are baselines computed on it "
           "(relative = A/B judging in both orders, a disagreement counts as a tie; expected = the "
           "probability-weighted score; length-baseline = response length alone). partial_pearson controls "
           "for response length; similar_length_accuracy orders within-prompt pairs of similar length.")
wide = (data.filter(pl.col("metric").is_in(HEADLINE))
        .pivot(on="metric", index=["judge", "iteration", "method"], values="value")
        .sort("iteration", "method"))
st.dataframe(wide.select(["judge", *[m for m in HEADLINE if m in wide.columns]]), hide_index=True,
             key="judges_table")

metrics = [m for m in HEADLINE if m in set(data["metric"].to_list())]
metric = st.selectbox("Figure", metrics, key="evaluation_metric")
shown = data.filter(pl.col("metric") == metric).sort("iteration", "method")
has_ci = shown["lo"].is_not_null().any()
if has_ci:
    shown = shown.with_columns((pl.col("hi") - pl.col("value")).alias("plus"),
                               (pl.col("value") - pl.col("lo")).alias("minus"))
fig = px.bar(shown, x="judge", y="value", color="method", title=f"{dataset}: {metric}"
             + (" (95% bootstrap interval)" if has_ci else ""),
             error_y="plus" if has_ci else None, error_y_minus="minus" if has_ci else None)
st.plotly_chart(fig, key="judges_chart")

st.subheader("Paired comparison")
its = state.iterations_of(run_id)
judged = []
for k in its:
    try:
        if dataset in state.cached(judge_datasets, f"{run_id}:{k}"):
            judged.append(k)
    except SelfratError:
        pass
if not judged:
    st.caption(f"No iteration has eval judgments on {dataset}.")
else:
    k = st.selectbox("Iteration", judged, index=len(judged) - 1, key="paired_iteration",
                     format_func=lambda i: f"{i} (seed)" if i == 0 else str(i))
    # Against the seed's own evaluation and each method stored at iteration 0.
    references = [f"{run_id}:0"] if k != 0 and 0 in judged else []
    if 0 in its:
        references += [j for j in state.cached(stored_judges, run_id, 0, dataset)
                       if parse_judge(j).method != "greedy"]
    st.caption(f"Iteration {k} (B) against the seed (iteration 0) and each method stored on it (A), on the "
               "items both judged: B - A with a 95% paired-bootstrap interval and a two-sided p; * marks a "
               f"difference whose interval excludes 0. `selfrat compare {run_id}:0:METHOD {run_id}:{k} "
               f"--dataset {dataset}` prints one of them.")
    rows = []
    for ref in references:
        try:
            res = state.cached(compare_judges, ref, f"{run_id}:{k}", dataset)
        except SelfratError as e:
            st.caption(f"{ref}: {e}")
            continue
        spec = parse_judge(ref)
        rows += [{"against": f"iteration {spec.iteration} · {spec.method}", **r} for r in paired_rows(res)]
    if rows:
        st.dataframe(pl.DataFrame(rows, infer_schema_length=None), hide_index=True, key="paired_table",
                     column_config={
                         "A": st.column_config.NumberColumn("A", format="%.3f"),
                         "B": st.column_config.NumberColumn(f"iteration {k}", format="%.3f"),
                         "B - A": st.column_config.NumberColumn("B - A", format="%+.3f"),
                         "p": st.column_config.NumberColumn("p", format="%.3f")})
    elif not references:
        st.caption("Nothing stored at iteration 0 to compare with.")

groups = sorted(state.cached(queries.breakdown_groups, run_id, dataset), key=lambda g: g == "confusion")
if groups:
    st.subheader("Breakdown")
    c = st.columns(2)
    group_by = c[0].selectbox("Group by", groups, key="breakdown_group")
    rows = state.cached(queries.breakdown, run_id, dataset, group_by).with_columns(
        pl.format("iteration {} · {}", pl.col("iteration"), pl.col("method")).alias("judge"))
    available = sorted(set(rows["metric"].to_list()) - {"n"})
    if group_by == "confusion":  # gold k x predicted j counts: a heatmap per judge
        judge = c[1].selectbox("Judge", sorted(set(rows["judge"].to_list())), key="confusion_judge")
        grid = rows.filter(pl.col("judge") == judge).pivot(on="metric", index="group_value", values="value")
        grid = grid.sort("group_value")
        cols = sorted(col for col in grid.columns if col != "group_value")
        fig = px.imshow(grid.select(cols).to_numpy(), x=cols, y=grid["group_value"].to_list(), text_auto=True,
                        labels={"x": "predicted", "y": "gold", "color": "items"}, title=f"Confusion: {judge}")
        st.plotly_chart(fig, key="confusion_chart")
    elif available:
        what = c[1].selectbox("Figure", available, key="breakdown_metric")
        part = rows.filter(pl.col("metric") == what)
        fig = px.bar(part, x="group_value", y="value", color="judge", barmode="group",
                     title=f"{what} by {group_by}")
        st.plotly_chart(fig, key="breakdown_chart")
        st.dataframe(part.pivot(on="judge", index="group_value", values="value"), hide_index=True,
                     key="breakdown_table")

st.subheader("Curation reports")
reports = [(k, queries.curate_report(state.store(), run_id, k)) for k in state.iterations_of(run_id) if k > 0]
reports = [(k, r) for k, r in reports if r]
if not reports:
    st.caption("No iteration has been curated yet.")
for k, report in reports:
    for warning in report.get("warnings", []):
        st.warning(f"Iteration {k}: {warning}")
    with st.expander(f"Iteration {k}: {report.get('pairs', 0)} pairs ({report.get('strategy')})"):
        st.json(report)
