"""Design space: 2-D t-SNE of latent vectors, initial training samples vs active-learning samples (Fig. 8)."""

from pathlib import Path

import pandas as pd
import streamlit as st

from agd.tracking.design_map import embed_sample
from dashboard import charts, data, ui


@st.cache_data(show_spinner=False, max_entries=16)
def _embedding(
    db: str, version: int, experiments: tuple, n_points: int, seed: int, perplexity: float, stored: bool
) -> pd.DataFrame:
    """The sampled points with their t-SNE coordinates: the catalog's embedded map if it has this one."""
    if stored:
        points = data.stored_design_map(Path(db), experiments, n_points, perplexity, seed)
        if not points.empty:
            return points
    return embed_sample(
        data.latent_sample(Path(db), experiments, n_points, seed), seed=seed, perplexity=perplexity
    )


st.title("Design space: latent map")
ui.caption_catalog()
ui.require_table("al_samples")
index = ui.query("campaign_index")
experiments = sorted(index["experiment"].dropna().unique())
default = [e for e in experiments if e != "kappa"] or experiments

left, middle, right = st.columns([2, 1, 1])
chosen = left.multiselect("Experiments", experiments, default=default, key="ds_experiments")
# the catalog stage embeds one map (params catalog.design_map): start from its settings, drawn at once
has_map = bool(ui.catalog_status().counts.get("design_map"))  # catalogs built before it have no such table
stored_points, stored_perplexity = (has_map and ui.query("design_map_settings")) or (1000, 30.0)
point_choices = sorted({200, 500, 1000, 2000, 3000, 5000, stored_points})
perplexity_choices = sorted({5.0, 10.0, 20.0, 30.0, 50.0, stored_perplexity})
n_points = middle.select_slider("Points (at most)", point_choices, value=stored_points, key="ds_points")
perplexity = right.select_slider(
    "Perplexity", perplexity_choices, value=stored_perplexity, format_func="{:g}".format, key="ds_perplexity"
)

cfg = ui.settings()
with st.spinner("Embedding the latent vectors with t-SNE (stored by the catalog stage for its settings) ..."):
    points = _embedding(
        str(cfg.catalog),
        data.catalog_version(cfg.catalog),
        tuple(chosen),
        int(n_points),
        0,
        float(perplexity),
        has_map,
    )
if points.empty:
    st.info("No labelled latent vectors for this selection.")
    st.stop()

counts = points["sample"].value_counts()
n_training = int(counts.get("training (round 0)", 0))
n_active = int(counts.get("active learning", 0))
st.markdown(f"**{n_training}** training samples (round 0) and **{n_active}** active-learning samples")
st.vega_lite_chart(*charts.design_map_spec(points), key="tsne")
st.caption(
    "Points with a band-gap label, drawn with a seeded hash: up to half from round 0 and half from the suggestion rounds. "
    "One t-SNE embedding of both groups, so positions are comparable across the two panels."
)
st.dataframe(
    points.groupby("sample")["band_gap"]
    .describe()[["count", "mean", "50%", "max"]]
    .rename(columns={"50%": "median"}),
    width="stretch",
    key="ds_summary",
)
