"""Vega-Lite chart specs for the Campaigns and Design-space pages.

Each function returns ``(frame, spec)`` for ``st.vega_lite_chart(frame, spec)``: Streamlit ships the
frame to the browser as Arrow and the spec refers to its columns. Vega-Lite rather than plotly: a new
browser loads and compiles plotly's 4.7 MB chart bundle before drawing. On the pipeline's catalog the
Campaigns page drew its first plotly chart 2.8 s after its heading, and its first Vega-Lite chart
1.1-1.8 s after (Vega-Lite's bundle is about 0.8 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

SAMPLED, BEST = "sampled formulas", "best so far"
TRAINING, ACTIVE = "training (round 0)", "active learning"


def round_trace_spec(samples: pd.DataFrame, trace: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The paper's Fig. 5a for one campaign repeat: each labelled sample's band gap by round (points) and
    the best label so far (line). ``samples``: round, band_gap, formula; ``trace``: round, best_so_far."""
    frame = pd.concat(
        [
            pd.DataFrame(
                {
                    "series": SAMPLED,
                    "round": samples["round"].astype(int),
                    "band_gap": samples["band_gap"].astype(float),
                    "formula": samples["formula"].fillna("").astype(str),
                }
            ),
            pd.DataFrame(
                {
                    "series": BEST,
                    "round": trace["round"].astype(int),
                    "band_gap": trace["best_so_far"].astype(float),
                    "formula": "",
                }
            ),
        ],
        ignore_index=True,
    )
    x = {"field": "round", "type": "quantitative", "title": "round (0 = initial training samples)"}
    y = {"field": "band_gap", "type": "quantitative", "title": "band gap (eV)"}
    color = {
        "field": "series",
        "type": "nominal",
        "title": None,
        "scale": {"domain": [SAMPLED, BEST], "range": ["#4c78a8", "#e45756"]},  # blue points, red line
    }
    spec = {
        "height": 360,
        "layer": [
            {
                "transform": [{"filter": {"field": "series", "equal": SAMPLED}}],
                "mark": {"type": "circle", "size": 22, "opacity": 0.5},
                "encoding": {
                    "x": x,
                    "y": y,
                    "color": color,
                    "tooltip": [
                        {"field": "formula", "type": "nominal"},
                        {"field": "round", "type": "quantitative"},
                        {"field": "band_gap", "type": "quantitative", "format": ".3f", "title": "gap (eV)"},
                    ],
                },
            },
            {
                "transform": [{"filter": {"field": "series", "equal": BEST}}],
                "mark": {"type": "line", "point": True},
                "encoding": {
                    "x": x,
                    "y": y,
                    "color": color,
                    "tooltip": [
                        {"field": "round", "type": "quantitative"},
                        {"field": "band_gap", "type": "quantitative", "format": ".3f", "title": "best (eV)"},
                    ],
                },
            },
        ],
    }
    return frame, spec


def line_spec(
    frame: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str,
    y_title: str,
    color_order: Sequence[str] | None = None,
    percent: bool = False,
    height: int = 320,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One line with points per ``color`` value; ``percent``: y holds fractions, shown 0-100 %."""
    y_enc: dict[str, Any] = {"field": y, "type": "quantitative", "title": y_title}
    if percent:
        y_enc |= {"axis": {"format": ".0%"}, "scale": {"domain": [0, 1.05]}}
    color_enc: dict[str, Any] = {"field": color, "type": "nominal"}
    if color_order is not None:
        color_enc["sort"] = list(color_order)
    spec = {
        "height": height,
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": x, "type": "quantitative"},
            "y": y_enc,
            "color": color_enc,
            "tooltip": [
                {"field": color, "type": "nominal"},
                {"field": x, "type": "quantitative"},
                {"field": y, "type": "quantitative", "format": ".1%" if percent else ".3g"},
            ],
        },
    }
    return frame[[x, y, color]], spec


def design_map_spec(points: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The paper's Fig. 8: t-SNE coordinates coloured by band gap, training samples and active-learning
    samples side by side (one embedding, so positions compare across the panels)."""
    frame = points[
        ["tsne_1", "tsne_2", "band_gap", "sample", "formula", "experiment", "repeat", "round"]
    ].copy()
    frame["sample"] = frame["sample"].astype(str)
    frame["formula"] = frame["formula"].fillna("").astype(str)
    frame["experiment"] = frame["experiment"].astype(str)
    spec = {
        "facet": {
            "column": {"field": "sample", "type": "nominal", "title": None, "sort": [TRAINING, ACTIVE]}
        },
        "spec": {
            "width": 330,
            "height": 330,
            "mark": {"type": "circle", "size": 22, "opacity": 0.8},
            "encoding": {
                "x": {"field": "tsne_1", "type": "quantitative", "title": "t-SNE 1"},
                "y": {"field": "tsne_2", "type": "quantitative", "title": "t-SNE 2"},
                "color": {
                    "field": "band_gap",
                    "type": "quantitative",
                    "title": "band gap (eV)",
                    "scale": {"scheme": "viridis"},
                },
                "tooltip": [
                    {"field": "formula", "type": "nominal"},
                    {"field": "band_gap", "type": "quantitative", "format": ".3f", "title": "gap (eV)"},
                    {"field": "experiment", "type": "nominal"},
                    {"field": "repeat", "type": "quantitative"},
                    {"field": "round", "type": "quantitative"},
                ],
            },
        },
    }
    return frame, spec
