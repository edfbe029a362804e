"""The metal-aware oracle: metal classification metrics and a small real run of the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from agd.config import ForestConfig, MetalsOracleConfig, OracleConfig, PrepareConfig, RoostConfig
from agd.data.prepare import prepare_dataset
from agd.models.metals import metal_metrics, run_metals_oracle_stage
from agd.models.oracle import load_oracle, run_oracle_stage
from tests.conftest import read_shared_csv

TINY = RoostConfig(
    ensemble_size=1, epochs=6, batch_size=64, learning_rate=2e-3, elem_fea_len=16, n_graph=1,
    hidden=32, trunk_hidden=[64], out_hidden=[32], patience=None, num_threads=1,
)  # fmt: skip


def test_metal_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    gaps = np.where(rng.random(500) < 0.5, 0.0, rng.uniform(0.01, 8, 500))
    predicted = np.clip(gaps + rng.normal(0, 0.6, 500), 0, None)
    predicted[:7] = np.nan  # rows a model could not label are left out and counted
    got = metal_metrics(gaps, predicted, metal_gap=0.0, cutoff=0.25)
    ok = np.isfinite(predicted)
    truth, called = gaps[ok] <= 0.0, predicted[ok] <= 0.25
    assert got["n"] == 493 and got["n_unlabelled"] == 7 and got["n_metals"] == int(truth.sum())
    assert got["metal_precision"] == pytest.approx(precision_score(truth, called))
    assert got["metal_recall"] == pytest.approx(recall_score(truth, called))
    assert got["metal_f1"] == pytest.approx(f1_score(truth, called))
    assert got["metal_accuracy"] == pytest.approx((truth == called).mean())
    assert got["metal_roc_auc"] == pytest.approx(roc_auc_score(truth, -predicted[ok]))
    # an oracle that never predicts a metal (the Exp1 oracle's failure) recalls none
    never = metal_metrics(gaps, np.full(500, 1.5), 0.0, 0.25)
    assert never["metal_recall"] == 0.0 and never["metal_f1"] == 0.0 and never["metal_roc_auc"] == 0.5


def test_metals_stage_trains_and_tells_metals_apart(shared_data, tmp_path):
    df = read_shared_csv(shared_data / "mp_gap_by_composition.csv").sample(1500, random_state=0)
    source = tmp_path / "metals.csv"
    df.to_csv(source, index=False)
    # a main oracle trained on positive gaps only, as the paper's Exp1 oracle is
    exp1 = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv").sample(800, random_state=1)
    raw = exp1.rename(columns={"composition": "formula"})[["formula", "band_gap"]].assign(
        row=np.arange(1, 801)
    )
    (tmp_path / "exp1").mkdir()
    prepare_dataset(raw, PrepareConfig(seed=0)).dataset.to_parquet(tmp_path / "exp1" / "d.parquet")
    forest = ForestConfig(n_estimators=30, max_features=0.3, n_jobs=1)
    main = OracleConfig(models=["forest"], primary="forest", refit="none", forest=forest)
    run_oracle_stage(tmp_path / "exp1" / "d.parquet", tmp_path / "main", main, progress=False)

    cfg = MetalsOracleConfig(
        dataset=str(source),
        oracle=OracleConfig(models=["roost", "forest"], refit="none", roost=TINY, forest=forest),
    )
    out = tmp_path / "metals"
    metrics = run_metals_oracle_stage(
        cfg, PrepareConfig(seed=0), out, compare_oracle=tmp_path / "main", progress=False
    )

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["dataset"]["rows"] == metrics["dataset"]["prepared"]["rows_out"] > 1400
    assert 0.3 < metrics["dataset"]["frac_metal"] < 0.7  # the metals were kept
    for kind in ("roost", "forest"):
        test = metrics["metals"]["models"][kind]["test"]
        assert test["metals"]["n"] == metrics["dataset"]["test_rows"]
        assert test["metals"]["metal_roc_auc"] > 0.75, kind  # it learnt what a metal looks like
        assert test["nonmetal"]["n"] == test["metals"]["n"] - test["metals"]["n_metals"]
    reference = metrics["reference"]["test"]["metals"]
    assert reference["n"] + reference["n_unlabelled"] == metrics["dataset"]["test_rows"]
    # the main oracle saw no metal: it calls far fewer metals than the metal-aware forest
    assert reference["metal_recall"] < metrics["metals"]["models"]["forest"]["test"]["metals"]["metal_recall"]
    labels = load_oracle(out).label(["NaCl", "Cu", "Fe3Al"])  # a regular oracle folder
    assert np.isfinite(labels.gaps).all()


def test_metals_stage_refuses_a_prepare_that_drops_metals(tmp_path):
    prepare = PrepareConfig(filters={"gap_positive_only": True})
    with pytest.raises(ValueError, match="gap_positive_only"):
        run_metals_oracle_stage(
            MetalsOracleConfig(dataset=str(tmp_path / "x.csv")), prepare, tmp_path / "out"
        )
