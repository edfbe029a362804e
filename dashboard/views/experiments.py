"""Experiments: the paper's Table 1 (mean ± std over repeats) and bar charts BS vs AL vs random."""

import streamlit as st

from dashboard import data, ui

st.title("Experiments: screening performance (Table 1)")
ui.caption_catalog()
ui.require_table("screening_metrics")

experiments = ui.query("distinct_values", "screening_metrics", "experiment")
models = ui.query("distinct_values", "screening_metrics", "model")
windows = ui.query("distinct_values", "screening_metrics", "gap_window")
labels = {metric: label for metric, (label, _) in data.TABLE1_METRICS.items()}

left, middle, right = st.columns(3)
chosen_experiments = left.multiselect("Experiments", experiments, default=experiments, key="exp_experiments")
chosen_models = middle.multiselect("Models", models, default=models, key="exp_models")
# the paper's headline window first; the others are one click away
headline = [w for w in windows if w.lower() in ("gt6", ">6")] or windows
chosen_windows = right.multiselect("Band-gap windows", windows, default=headline, key="exp_windows")
chosen_metrics = st.multiselect(
    "Metrics",
    list(labels),
    default=list(labels),
    format_func=labels.get,
    key="exp_metrics",
)
has_kept = bool(ui.catalog_status().counts.get("screening_labels_kept"))
labels_kept = st.toggle(
    "Judge the candidates a training set labels by their labels",
    key="exp_labels_kept",
    disabled=not has_kept,
    help="Off: every candidate is judged by the screening model's prediction (the paper's protocol). On: a "
    "candidate the screener's own training set labels (a campaign that searched the candidates labelled "
    "some) is a hit when its label lies in the window; the others are judged by the model. Only the "
    "screening metrics change; the stage writes this table for the windows whose hits it stores."
    + (
        ""
        if has_kept
        else " The catalog has no screening_labels_kept rows: rerun `agd screen` and `agd catalog`."
    ),
)
if labels_kept:
    chosen_metrics = ["n_labelled", *(m for m in chosen_metrics if m in data.LABELS_KEPT_METRICS)]
selection = (tuple(chosen_experiments), tuple(chosen_models), tuple(chosen_windows))

frame = ui.query("table1", *selection, labels_kept=labels_kept)
if frame.empty:
    st.info("No Table-1 rows match the selection.")
    st.stop()
st.table(
    data.table1_display(frame, chosen_metrics).set_index(["Experiment", "Model", "Training set", "Window"])
)
st.caption(
    "Mean ± sample standard deviation over repeats; recovery = recovered / oracle hits, precision = recovered / model hits."
    + (" Labelled candidates: the screened candidates the training set labels." if labels_kept else "")
)

st.subheader("Paired by repeat: AL − random, AL − BS")
paired = ui.query("paired", *selection, labels_kept=labels_kept)
if paired.empty:
    st.info("No selected experiment has both sets of a pair (AL and random, or AL and BS).")
else:
    st.table(data.paired_display(paired).set_index(["Pair", "Experiment", "Model", "Window"]))
    st.caption(
        "The sets of one repeat share its initial samples: each cell is the mean ± sample standard deviation "
        "of the per-repeat difference in percentage points, and 'ahead' counts the repeats where AL scores "
        "higher. A mean larger than its standard deviation is a difference larger than the spread over repeats."
    )

VERIFY_SECTIONS = {
    "screening_check": (
        "After a check of the near-misses",
        "The screener's own training set keeps its labels; every other candidate it predicts inside the window "
        "widened by the margin is checked with the oracle (DFT in a real campaign). Checked: the labels that "
        "costs; listed: the set's labelled hits and the checked candidates the oracle puts in the window.",
    ),
    "screening_domain": (
        "Within each screener's element domain",
        "The model's calls on candidates one of whose elements occurs in fewer than the given number of "
        "formulas of the screener's own training set are left out; what remains is scored by the model alone "
        "(listed, recovery, precision) and with the set's labels kept.",
    ),
}
counts = ui.catalog_status().counts
for table, (title, caption) in VERIFY_SECTIONS.items():
    if not counts.get(table):  # the screen stage writes these only when its option is set
        continue
    st.subheader(title)
    rows = ui.query("verify_table", table, *selection)
    if rows.empty:
        st.info(f"No {table} rows match the selection (the stage writes them for its hit windows only).")
        continue
    st.table(data.verify_display(rows, table))
    st.caption(caption + " Mean ± sample standard deviation over repeats.")

st.subheader("BS vs AL vs random")
chart_metrics = st.multiselect(
    "Charts",
    list(labels),
    default=[m for m in ("recovery", "r2_test") if m in labels],
    format_func=labels.get,
    key="exp_charts",
)
for metric in (m for m in chart_metrics if f"{m}_mean" in frame.columns):
    st.vega_lite_chart(spec=data.table1_bar_spec(frame, metric), width="content", key=f"chart_{metric}")
