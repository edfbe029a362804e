"""Campaigns: per-round band gaps and best so far (Fig. 5a), the kappa sweep (Fig. 5b), valid decodes, how the
finds spread over chemical systems, MLflow runs."""

import pandas as pd
import streamlit as st

from dashboard import charts, data, ui


@st.cache_data(show_spinner=False, ttl=60)
def _mlflow_runs(uri: str) -> tuple[pd.DataFrame, str | None]:
    return data.mlflow_runs(uri)


def _rounds(index: pd.DataFrame, experiments: list[str]) -> None:
    """Fig. 5a for one campaign repeat: band gap of every labelled formula per round, best so far in red."""
    left, middle, right = st.columns(3)
    experiment = left.selectbox(
        "Experiment",
        experiments,
        index=experiments.index("Exp2") if "Exp2" in experiments else 0,
        key="camp_experiment",
    )
    campaigns = index.loc[index["experiment"] == experiment, "campaign"].unique().tolist()
    campaign = middle.selectbox("Campaign", campaigns, key="camp_campaign")
    repeats = index.loc[index["campaign"] == campaign, "repeat"].astype(int).tolist()
    repeat = right.selectbox("Repeat", repeats, key="camp_repeat")

    rounds = ui.query("round_summary", (experiment,))
    trace = rounds[(rounds["campaign"] == campaign) & (rounds["repeat"] == repeat)]
    samples = ui.query("sampled_gaps", campaign, int(repeat))
    st.vega_lite_chart(*charts.round_trace_spec(samples, trace), width="stretch", key="fig_5a")
    st.dataframe(
        trace[
            [
                "round",
                "n_suggested",
                "n_valid",
                "valid_rate",
                "n_labelled",
                "mean_gap",
                "max_gap",
                "best_so_far",
            ]
        ],
        hide_index=True,
        width="stretch",
        column_config={
            "valid_rate": st.column_config.NumberColumn("valid rate", format="percent"),
            "mean_gap": st.column_config.NumberColumn("mean gap (eV)", format="%.3f"),
            "max_gap": st.column_config.NumberColumn("max gap (eV)", format="%.3f"),
            "best_so_far": st.column_config.NumberColumn("best so far (eV)", format="%.3f"),
        },
        key="round_table",
    )


def _valid_rate(index: pd.DataFrame, experiments: list[str]) -> None:
    """Fraction of suggestions that became valid new formulas, per round and campaign."""
    all_rounds = ui.query("round_summary", tuple(experiments))
    suggested = all_rounds[all_rounds["round"] >= 1]
    valid_rate = (  # per campaign: an experiment's Bayesian and random campaigns differ
        suggested.groupby(["campaign", "round"], as_index=False)[["n_valid", "n_suggested"]]
        .sum()
        .assign(valid_rate=lambda f: f["n_valid"] / f["n_suggested"])
    )
    st.vega_lite_chart(
        *charts.line_spec(
            valid_rate,
            x="round",
            y="valid_rate",
            color="campaign",
            y_title="valid formulas / suggestions",
            percent=True,
        ),
        width="stretch",
        key="valid_rate_chart",
    )
    overall = suggested.groupby("campaign")[["n_valid", "n_suggested"]].sum()
    st.table(
        pd.DataFrame(
            {
                "suggestions": overall["n_suggested"],
                "valid formulas": overall["n_valid"],
                "valid rate": (overall["n_valid"] / overall["n_suggested"]).map("{:.1%}".format),
            }
        )
    )


def _kappa_sweep(index: pd.DataFrame, experiments: list[str]) -> None:
    """Fig. 5b: new formulas above a threshold found per round, for each kappa (mean over repeats)."""
    default_sweep = data.sweep_experiment(index)
    left, right = st.columns(2)
    sweep = left.selectbox(
        "Sweep experiment",
        experiments,
        index=experiments.index(default_sweep) if default_sweep in experiments else 0,
        key="sweep_experiment",
    )
    threshold = right.number_input(
        "Band-gap threshold (eV)", min_value=0.0, max_value=20.0, value=6.0, step=0.5, key="sweep_threshold"
    )
    kappas = ui.query("kappa_sweep", sweep, float(threshold))
    if kappas.empty:
        st.info(f"No suggestion rounds for {sweep}.")
    else:
        # pivot on the numbers, so kappa 10 sorts after 5; label with text only afterwards
        found = kappas.pivot(index="kappa", columns="round", values="n_high")
        found.index = [f"{k:g}" for k in found.index]
        found.index.name = "kappa"
        kappas["kappa"] = kappas["kappa"].map("{:g}".format)
        st.vega_lite_chart(
            *charts.line_spec(
                kappas,
                x="round",
                y="cum_high",
                color="kappa",
                y_title=f"new formulas > {threshold:g} eV (cumulative, mean over repeats)",
                color_order=list(found.index),
                height=360,
            ),
            width="stretch",
            key="fig_5b",
        )
        found.columns = [f"round {c}" for c in found.columns]
        found["total"] = found.sum(axis=1)
        st.caption(f"New formulas above {threshold:g} eV found per round (mean over repeats)")
        st.dataframe(found.round(2), width="stretch", key="kappa_table")


def _spread(index: pd.DataFrame, experiments: list[str]) -> None:
    """How each campaign's finds spread over chemical systems, mean over repeats."""
    left, right = st.columns(2)
    chosen = left.multiselect("Experiments", experiments, default=experiments, key="spread_experiments")
    threshold = right.number_input(
        "Band-gap threshold (eV)", min_value=0.0, max_value=20.0, value=6.0, step=0.5, key="spread_threshold"
    )
    spread = ui.query("system_spread", tuple(chosen), float(threshold))
    if spread.empty:
        st.info("No registered finds in the chosen experiments.")
        return
    st.caption(
        "Per campaign, mean over repeats: the new formulas it registered, the chemical systems (element "
        f"sets) they span, those above {threshold:g} eV and their systems, and the most finds in one system "
        "(`experiments.campaign.max_per_system` caps it)."
    )
    st.dataframe(
        spread,
        hide_index=True,
        width="stretch",
        column_config={
            "high_gap": st.column_config.NumberColumn(f"finds > {threshold:g} eV", format="%.1f"),
            "high_gap_systems": st.column_config.NumberColumn("their systems", format="%.1f"),
            "most_in_one_system": st.column_config.NumberColumn("most in one system", format="%.1f"),
            "most_max": st.column_config.NumberColumn("most in one system (largest)"),
            "finds": st.column_config.NumberColumn(format="%.1f"),
            "systems": st.column_config.NumberColumn(format="%.1f"),
        },
        key="spread_table",
    )


def _mlflow(index: pd.DataFrame, experiments: list[str]) -> None:
    """The campaigns' MLflow runs, each with a link into `mlflow ui`."""
    cfg = ui.settings()
    runs, problem = _mlflow_runs(cfg.tracking_uri)
    if problem:
        st.info(problem)
    runs = runs[runs["experiment"].isin(experiments)]
    if runs.empty:
        if not problem:
            st.info(f"No runs tagged with an experiment in {cfg.tracking_uri}.")
    else:
        runs = runs.assign(
            link=[
                data.run_url(cfg.mlflow_ui, e, r)
                for e, r in zip(runs["mlflow_experiment_id"], runs["run_id"], strict=True)
            ]
        )
        st.caption(f"Links open `mlflow ui` at {cfg.mlflow_ui} (set AGD_MLFLOW_UI for another address).")
        st.dataframe(
            runs[["experiment", "campaign", "role", "repeat", "kappa", "run_name", "status", "link"]],
            hide_index=True,
            width="stretch",
            column_config={"link": st.column_config.LinkColumn("MLflow run", display_text="open")},
            key="mlflow_runs",
        )


TABS = {
    "Rounds (Fig. 5a)": _rounds,
    "Valid decodes": _valid_rate,
    "Kappa sweep (Fig. 5b)": _kappa_sweep,
    "Chemical spread": _spread,
    "MLflow runs": _mlflow,
}

st.title("Active-learning campaigns")
ui.caption_catalog()
ui.require_table("al_samples")
index = ui.query("campaign_index")
experiments = sorted(index["experiment"].dropna().unique())
# only the open tab's content is computed and drawn: a first visit draws one chart and one table
for tab, draw in zip(st.tabs(list(TABS), key="camp_tab", on_change="rerun"), TABS.values(), strict=True):
    if tab.open:
        with tab:
            draw(index, experiments)
