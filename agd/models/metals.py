"""A band-gap oracle that has seen metals.

The main oracle follows the paper: it trains on the Exp1 set, whose gaps are all positive, so it gives
every formula a positive gap, metals included. Decoded and generated formulas can be metallic, so this
stage trains a second oracle (same models, same Exp1 protocol) on a dataset that keeps the metals
(``metals_oracle.dataset``, by default MP's ``mp_gap_by_composition.csv``, about 48% metals), and
reports, beside R2/MAE/RMSE, how well each model tells metals from non-metals:

- ``metal_*``: a formula is called a metal when its predicted gap is at most ``metal_cutoff`` (eV);
  accuracy, precision, recall and F1 of the metal class, and ROC AUC (threshold-free: the predicted
  gap ranks formulas from most to least metallic);
- ``nonmetal``: regression metrics on the non-metal rows only, comparable with the main oracle's;
- ``reference``: with ``compare_oracle``, the same figures for the main oracle on this test split.

Use it for campaigns with ``agd experiments --oracle models/oracle_metals`` (it is a regular oracle
folder for :func:`agd.models.oracle.load_oracle`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from agd.config import MetalsOracleConfig, PrepareConfig
from agd.models.oracle import _json_ready, load_oracle, regression_metrics, run_oracle_stage


def metal_metrics(
    gaps: np.ndarray, predicted: np.ndarray, metal_gap: float, cutoff: float
) -> dict[str, float]:
    """How well ``predicted`` separates metals (label <= ``metal_gap``) from non-metals.

    Rows without a finite prediction are left out and counted in ``n_unlabelled``.
    """
    from sklearn.metrics import roc_auc_score

    gaps = np.asarray(gaps, dtype=float)
    predicted = np.asarray(predicted, dtype=float)
    ok = np.isfinite(predicted)
    truth = gaps[ok] <= metal_gap
    called = predicted[ok] <= cutoff
    tp = int((truth & called).sum())
    fp = int((~truth & called).sum())
    fn = int((truth & ~called).sum())
    n = int(ok.sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    both = truth.any() and (~truth).any()
    return {
        "n": n,
        "n_unlabelled": int((~ok).sum()),
        "n_metals": int(truth.sum()),
        "metal_accuracy": float((truth == called).mean()) if n else math.nan,
        "metal_precision": precision,
        "metal_recall": recall,
        "metal_f1": 2 * precision * recall / (precision + recall) if tp else (0.0 if n else math.nan),
        # a lower predicted gap means more metallic, so the score of "metal" is minus the gap
        "metal_roc_auc": float(roc_auc_score(truth, -predicted[ok])) if both else math.nan,
    }


def _judge(gaps: np.ndarray, predicted: np.ndarray, cfg: MetalsOracleConfig) -> dict[str, dict]:
    nonmetal = gaps > cfg.metal_gap
    return {
        "all": regression_metrics(gaps, predicted),
        "metals": metal_metrics(gaps, predicted, cfg.metal_gap, cfg.metal_cutoff),
        "nonmetal": regression_metrics(gaps[nonmetal], predicted[nonmetal]),
    }


def run_metals_oracle_stage(
    cfg: MetalsOracleConfig,
    prepare: PrepareConfig,
    out_dir: str | os.PathLike,
    compare_oracle: str | os.PathLike | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> dict:
    """Load, prepare (``prepare`` params, metals kept), train and judge the metal-aware oracle.

    ``out_dir`` gets the oracle folder layout of :func:`run_oracle_stage` plus ``data/`` (the prepared
    table, its rejects and summary); the returned metrics (also in ``out_dir/metrics.json``) add a
    ``metals`` section per model and split, and ``reference`` for ``compare_oracle``.
    """
    from agd.data.prepare import prepare_dataset, write_prepared
    from agd.data.sources import file_sha256, load_local

    if prepare.filters.gap_positive_only:
        raise ValueError(
            "prepare.filters.gap_positive_only is true, which would drop every metal from the metals "
            "oracle's data; set it to false (the main dataset's own filtering is unaffected by this stage "
            "only if the main data has no metals)"
        )
    out = Path(out_dir)
    raw = load_local(cfg.dataset, cfg.columns)
    prepared = prepare_dataset(raw, prepare)
    paths = write_prepared(prepared, out / "data")
    metrics = run_oracle_stage(paths["dataset"], out, cfg.oracle, on_epoch=on_epoch, progress=progress)

    data = pd.read_parquet(out / "predictions.parquet")
    gaps = data["band_gap"].to_numpy(dtype=float)
    splits = {s: (data["split"] == s).to_numpy() for s in ("val", "test")}
    kinds = [k for k in ("roost", "forest") if k in data.columns]
    metrics["metals"] = {
        "definition": {
            "metal_gap": cfg.metal_gap,
            "metal_cutoff": cfg.metal_cutoff,
            "text": f"a label <= {cfg.metal_gap} eV is a metal; a prediction <= {cfg.metal_cutoff} eV calls one",
        },
        "models": {
            kind: {
                split: _judge(gaps[mask], data[kind].to_numpy(dtype=float)[mask], cfg)
                for split, mask in splits.items()
            }
            for kind in kinds
        },
    }
    metrics["dataset"]["source"] = {"path": str(cfg.dataset), "sha256": file_sha256(cfg.dataset)}
    metrics["dataset"]["prepared"] = {k: prepared.summary[k] for k in ("rows_in", "rejected", "rows_out")}
    if compare_oracle is not None:
        test = data[splits["test"]]
        reference = load_oracle(compare_oracle).label(test["reduced_formula"].tolist())
        metrics["reference"] = {
            "oracle": str(compare_oracle),
            "note": "the main oracle on this stage's test split; it trained on positive gaps only, and some of "
            "these rows may be in its own training data",
            "test": _judge(
                test["band_gap"].to_numpy(dtype=float), np.asarray(reference.gaps, dtype=float), cfg
            ),
        }
    metrics = _json_ready(metrics)  # NaN -> None: valid JSON for DVC and MLflow
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
