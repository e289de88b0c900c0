"""Judgments: filter a run's judgments, page through them, open one item with all its sampled judgments
side by side, and see score histograms per iteration and the gold-vs-sampled confusion matrix. A GRPO
iteration's rollouts (purpose rollout) show their reward, step and group, with the reward per step charted."""

from __future__ import annotations

import math
import statistics

import plotly.express as px
import plotly.graph_objects as go
import polars as pl
import streamlit as st

from store import Store, queries
from ui import components, state

PAGE_SIZE = 50
COLUMNS_PER_ROW = 4
ANY = "any"

st.title("Judgments")

run_id = state.run_picker()
if run_id is None:
    st.stop()
iteration = state.iteration_picker(run_id)
if iteration is None:
    st.stop()


def _choice(value):
    return None if value == ANY else value


with st.container(border=True):
    c = st.columns(5)
    purpose = _choice(c[0].selectbox("Purpose", [ANY, "train", "eval", "rollout"], key="j_purpose",
                                     help="rollout: the judgments a GRPO train stage generated and rewarded"))
    dataset = _choice(c[1].selectbox("Dataset", [ANY, *state.cached(queries.judgment_datasets, run_id)],
                                     key="j_dataset"))
    gold = _choice(c[2].selectbox("Gold score", [ANY, 1, 2, 3, 4, 5], key="j_gold"))
    score = _choice(c[3].selectbox("Sampled score", [ANY, 1, 2, 3, 4, 5], key="j_score"))
    parse_status = _choice(c[4].selectbox("Parse status", [ANY, *queries.PARSE_STATUSES], key="j_parse"))
    c = st.columns([1, 1, 3])
    agreement = c[0].selectbox("Agreement with gold", list(queries.AGREEMENTS), key="j_agreement")
    forced = {ANY: None, "forced": True, "not forced": False}[
        c[1].selectbox("Forced score", [ANY, "forced", "not forced"], key="j_forced")]
    text = c[2].text_input("Text contains", key="j_text", placeholder="in the rationale or the instruction")

flt = queries.JudgmentFilter(run_id=run_id, iteration=iteration, purpose=purpose, dataset=dataset, gold=gold,
                             score=score, parse_status=parse_status, agreement=agreement, text=text or None,
                             forced=forced)
# A new filter starts at page 1; the page number would otherwise point past the end of a smaller result.
if st.session_state.get("_j_filter") != flt:
    st.session_state["_j_filter"] = flt
    st.session_state["j_page"] = 1

first_page, total = state.cached(queries.judgments_page, flt, 0, PAGE_SIZE)
pages = max(math.ceil(total / PAGE_SIZE), 1)
st.session_state["j_page"] = min(st.session_state.get("j_page", 1), pages)
page = st.number_input("Page", min_value=1, max_value=pages, step=1, key="j_page")
frame = first_page if page == 1 else state.cached(queries.judgments_page, flt, page - 1, PAGE_SIZE)[0]
rollouts = state.cached(Store.rollouts, run_id, iteration)
if purpose == "rollout" and frame.height:  # the rollout's reward, optimizer step and generation group
    frame = frame.join(rollouts.select("judgment_id", "step", "group_index", "reward"), on="judgment_id",
                       how="left", maintain_order="left")
start = (page - 1) * PAGE_SIZE
st.caption(f"{start + 1 if total else 0}–{start + frame.height} of {total} judgments (page {page} of {pages})")
st.dataframe(frame, hide_index=True, key="judgments_table",
             column_config={"judgment_id": st.column_config.TextColumn(), "item_id": st.column_config.TextColumn()})

# ------------------------------------------------------------------ one item, all its judgments

st.subheader("Item")
if frame.height == 0:
    st.caption("No judgments match the filter.")
else:
    item_ids = list(dict.fromkeys(frame["item_id"].to_list()))  # page order, each once
    item_id = st.selectbox("Item on this page", item_ids, key="j_item", format_func=str)
    item = state.cached(queries.item_detail, item_id)
    judged = state.cached(queries.item_judgments, run_id, item_id, iteration)
    gold_int = components.rounded_gold(item.get("gold_score"))

    left, right = st.columns(2)
    with left:
        st.markdown(f"**Dataset** `{item.get('dataset')}` · split `{item.get('split')}` · "
                    f"gold score **{components.gold_label(item.get('gold_score'))}**")
        st.markdown("**Instruction**")
        st.text(item.get("instruction") or "")
        if item.get("input"):  # the text the instruction works on (Alpaca layout), when the item has one
            st.markdown("**Input**")
            st.text(item["input"])
        st.markdown("**Response**" + (" A" if item.get("response_b") else ""))
        st.text(item.get("response") or "")
        if item.get("response_b"):
            st.markdown("**Response B**")
            st.text(item["response_b"])
    with right:
        st.markdown("**Reference answer**")
        st.text(item.get("reference") or "(none)")
        st.markdown("**Rubric**")
        rubric = [item.get("criteria") or "(no criteria)"] + [
            f"{k}: {item.get(f'score{k}_description')}" for k in range(1, 6) if item.get(f"score{k}_description")]
        st.text("\n".join(rubric))

    scores = [s for s in judged["score"].to_list() if s is not None]
    if scores:
        spread = (f"Scores {', '.join(map(str, scores))} · mean {statistics.fmean(scores):.2f}"
                  f" · sd {statistics.pstdev(scores):.2f} · range {min(scores)}–{max(scores)}")
        if gold_int is not None:
            spread += f" · {sum(s == gold_int for s in scores)}/{judged.height} match gold"
        st.markdown(f"**Score spread** ({judged.height} judgments): {spread}")
    else:
        st.markdown(f"**Score spread**: none of the {judged.height} judgments has a score")

    rows = judged.to_dicts()
    for offset in range(0, len(rows), COLUMNS_PER_ROW):
        cols = st.columns(COLUMNS_PER_ROW)
        for col, j in zip(cols, rows[offset:offset + COLUMNS_PER_ROW]):
            with col.container(border=True):
                label = f"{j['purpose']} #{j['sample_index']}" + (f" side {j['side']}" if j["side"] != "a" else "")
                st.markdown(f"**{label}** · score **{j['score'] if j['score'] is not None else '–'}**")
                if gold_int is not None and j["score"] == gold_int:
                    st.badge("matches gold", icon=":material/check:", color="green")
                elif j["score"] is not None and gold_int is not None:
                    st.badge(f"off by {abs(j['score'] - gold_int)}", color="orange")
                st.caption(f"parse: {j['parse_status']}" + (" · forced" if j["forced"] else "")
                           + (f" · reward {j['reward']:.3f} · step {j['step']} · group {j['group_index']}"
                              if j.get("reward") is not None else ""))
                st.text(j["rationale"] or j["raw_text"] or "")

# ------------------------------------------------------------------ charts

st.subheader("Scores")
left, right = st.columns(2)
hist = state.cached(queries.score_histogram, run_id, purpose)
if hist.height:
    hist = hist.with_columns(pl.col("score").cast(pl.String).fill_null("none"),
                             pl.col("iteration").cast(pl.String))
    fig = px.bar(hist, x="score", y="n", color="iteration", barmode="group",
                 title="Sampled scores per iteration" + (f" ({purpose})" if purpose else ""),
                 category_orders={"score": ["1", "2", "3", "4", "5", "none"]})
    left.plotly_chart(fig, key="score_histogram")
conf = state.cached(queries.confusion, run_id, iteration, purpose)
if conf.height:
    z = [[0] * 5 for _ in range(5)]
    for g, s, n in conf.select("gold", "score", "n").iter_rows():
        if 1 <= g <= 5 and 1 <= s <= 5:
            z[g - 1][s - 1] = n
    fig = go.Figure(go.Heatmap(z=z, x=[1, 2, 3, 4, 5], y=[1, 2, 3, 4, 5], colorscale="Blues",
                               text=z, texttemplate="%{text}", hovertemplate="gold %{y}, score %{x}: %{z}"))
    fig.update_layout(title=f"Gold vs sampled score, iteration {iteration}", xaxis_title="sampled score",
                      yaxis_title="gold score (rounded)")
    right.plotly_chart(fig, key="confusion")
else:
    right.caption("No scored judgments of gold-scored items in this iteration.")

# ------------------------------------------------------------------ GRPO rollouts

if rollouts.height:
    st.subheader("GRPO rollouts")
    per_step = (rollouts.filter(pl.col("reward").is_not_null()).group_by("step")
                .agg(pl.col("reward").mean().alias("mean"), pl.col("reward").min().alias("min"),
                     pl.col("reward").max().alias("max"), pl.len().alias("rollouts"),
                     (pl.col("parse_status") == "ok").mean().alias("parsed"))
                .sort("step"))
    st.caption(f"Iteration {iteration}: {rollouts.height} rollouts over {per_step.height} steps; each step's "
               "prompts get a group of completions, rewarded per training.grpo.rewards (the reward the trainer used).")
    if per_step.height:
        long = per_step.unpivot(index="step", on=["mean", "min", "max", "parsed"], variable_name="figure")
        fig = px.line(long, x="step", y="value", color="figure", markers=True,
                      title=f"Rollout reward per step, iteration {iteration} (parsed: share that parses)")
        fig.update_xaxes(dtick=1)
        st.plotly_chart(fig, key="rollout_rewards")
