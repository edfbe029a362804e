"""The design-space map (the paper's Fig. 8): a 2-D t-SNE of labelled latent vectors, training vs suggested.

The dashboard draws it for any selection, but t-SNE of a thousand 128-d vectors takes seconds (plus
the import of scikit-learn), which is most of a first visit. So the catalog stage embeds the default
selection once (``catalog.design_map`` in params) into the ``design_map`` table, and the dashboard
embeds live only what differs from it. Both paths draw their sample with the same query, so a stored
map and a live one of the same settings hold the same points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import pandas as pd

#: Rounds that hold the initial (training) samples; the rest are the campaign's suggestions.
TRAINING_LABEL = "training (round 0)"
ACTIVE_LABEL = "active learning"


def selection_key(experiments: Sequence[str]) -> str:
    """Canonical text of an experiment selection, as stored in ``design_map.experiments``."""
    return ",".join(sorted({str(e) for e in experiments}))


def latent_sample_query(experiments: Sequence[str], n_points: int, seed: int = 0) -> tuple[str, list[Any]]:
    """SQL (and parameters) for up to ``n_points`` labelled latents of ``al_samples``: half round 0, half later.

    The rows are chosen by a seeded hash of their (campaign, repeat, round, idx) key, so the choice
    does not depend on load order and grows stably with ``n_points``.
    """
    values = [str(e) for e in experiments]
    condition = f"experiment IN ({', '.join('?' for _ in values)})" if values else "FALSE"
    half = max(1, int(n_points) // 2)
    sql = (
        "SELECT experiment, campaign, repeat, round, idx, formula, label AS band_gap, latent, "
        f"       CASE WHEN round = 0 THEN '{TRAINING_LABEL}' ELSE '{ACTIVE_LABEL}' END AS sample "
        f"FROM al_samples WHERE {condition} AND latent IS NOT NULL AND label IS NOT NULL "
        "QUALIFY row_number() OVER (PARTITION BY round = 0 ORDER BY hash(campaign, repeat, round, idx, ?)) <= ? "
        "ORDER BY campaign, repeat, round, idx"
    )
    return sql, [*values, int(seed), half]


def embed_tsne(latents: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of the latent vectors (perplexity capped for small samples)."""
    from sklearn.manifold import TSNE  # a second and a half to import: only when a map is computed

    n = len(latents)
    if n < 3:
        return np.zeros((n, 2))
    perplexity = min(float(perplexity), (n - 1) / 3)
    # 500 iterations (250 of them early exaggeration) settle a map of a few thousand points and halve
    # the default's time
    return TSNE(
        n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed
    ).fit_transform(latents)


def embed_sample(sample: pd.DataFrame, seed: int = 0, perplexity: float = 30.0) -> pd.DataFrame:
    """The sampled rows without their latents, with t-SNE coordinates ``tsne_1``, ``tsne_2``."""
    if sample.empty:
        return sample.drop(columns="latent", errors="ignore").assign(tsne_1=[], tsne_2=[])
    xy = embed_tsne(
        np.vstack(sample["latent"].to_numpy()).astype(np.float32), seed=seed, perplexity=perplexity
    )
    return sample.drop(columns="latent").assign(tsne_1=xy[:, 0], tsne_2=xy[:, 1])


def default_experiments(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The dashboard's default selection: every experiment of ``al_samples`` but the kappa sweep."""
    found = [
        row[0]
        for row in con.execute(
            "SELECT DISTINCT experiment FROM al_samples WHERE experiment IS NOT NULL ORDER BY 1"
        ).fetchall()
    ]
    return [e for e in found if e != "kappa"] or found


def compute_design_map(
    con: duckdb.DuckDBPyConnection, n_points: int, perplexity: float, seed: int = 0
) -> pd.DataFrame:
    """The default selection's map as rows of the ``design_map`` table (empty when there are no latents)."""
    experiments = default_experiments(con)
    sql, params = latent_sample_query(experiments, n_points, seed)
    points = embed_sample(con.execute(sql, params).df(), seed=seed, perplexity=perplexity)
    return points.assign(
        experiments=selection_key(experiments),
        n_points=int(n_points),
        perplexity=float(perplexity),
        seed=int(seed),
    )
