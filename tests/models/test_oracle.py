"""Oracles, Roost and the forest on a few thousand real Exp1 rows with tiny configurations."""

from __future__ import annotations

import json
import typing

import numpy as np
import pandas as pd
import pytest
import torch

from agd.config import ForestConfig, OracleConfig, PrepareConfig, RoostConfig
from agd.data.prepare import prepare_dataset
from agd.models.forest import ForestModel, train_forest
from agd.models.oracle import (
    NO_RESULT,
    ModelOracle,
    Oracle,
    TableOracle,
    load_oracle,
    oracle_files,
    regression_metrics,
    run_oracle_stage,
)
from agd.models.roost import (
    RoostEnsemble,
    build_roost,
    embedding_elements,
    encode_formulas,
    finetune_roost,
    graph_batch,
    roost_forward,
    train_ensemble,
    train_roost,
)
from tests.conftest import read_shared_csv

TINY = RoostConfig(
    ensemble_size=2,
    epochs=4,
    batch_size=64,
    learning_rate=2e-3,
    elem_fea_len=16,
    n_graph=1,
    elem_heads=1,
    cry_heads=1,
    hidden=32,
    trunk_hidden=[64],
    out_hidden=[32],
    patience=None,
    num_threads=1,
)
TINY_FOREST = ForestConfig(n_estimators=20, max_features=0.3, n_jobs=1)


@pytest.fixture(scope="module")
def exp1(shared_data) -> pd.DataFrame:
    """2,500 Exp1 rows (all 500 paper rows kept among them) through the real prepare step."""
    df = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv")
    rows = pd.concat(
        [df[df["in_agd_bd_test"]].iloc[:100], df[~df["in_agd_bd_test"]].sample(2400, random_state=0)]
    )
    raw = pd.DataFrame(
        {
            "row": np.arange(1, len(rows) + 1),
            "formula": rows["composition"].to_numpy(),
            "band_gap": rows["band_gap"].to_numpy(),
            "in_agd_bd_test": rows["in_agd_bd_test"].to_numpy(),
        }
    )
    return prepare_dataset(raw, PrepareConfig(seed=0)).dataset


def _part(data: pd.DataFrame, split: str) -> tuple[list[str], np.ndarray]:
    part = data[data["split"] == split]
    return part["reduced_formula"].tolist(), part["band_gap"].to_numpy()


@pytest.fixture(scope="module")
def ensemble(exp1) -> RoostEnsemble:
    train_f, train_y = _part(exp1, "train")
    val_f, val_y = _part(exp1, "val")
    return train_ensemble(train_f, train_y, val_f, val_y, TINY, seed=3, progress=False)


def test_batches_and_forward_match_aviary(exp1):
    from aviary.roost.data import CompositionData, collate_batch

    formulas = exp1["reduced_formula"].iloc[:40].tolist()
    frame = pd.DataFrame({"composition": formulas, "band_gap": 1.0, "material_id": range(len(formulas))})
    data = CompositionData(frame, {"band_gap": "regression"})
    theirs = collate_batch([data[i] for i in range(len(formulas))])[0]
    ours = graph_batch(
        encode_formulas(formulas, embedding_elements("matscholar200")), np.arange(len(formulas))
    )
    assert [t.shape for t in theirs] == [t.shape for t in ours]
    torch.manual_seed(0)
    net = build_roost(
        RoostConfig(elem_fea_len=16, hidden=32, trunk_hidden=[32], out_hidden=[16]), robust=True
    ).eval()
    with torch.no_grad():
        # aviary orders each formula's elements its own way; the model does not depend on the order
        assert torch.allclose(net(*theirs)[0], roost_forward(net, ours), atol=1e-5)


@pytest.mark.parametrize("name", typing.get_args(RoostConfig.model_fields["embedding"].annotation))
def test_an_embedding_the_config_accepts_builds_a_roost_and_one_it_rejects_fails_in_aviary(name):
    from aviary.utils import get_element_embedding

    small = {"elem_fea_len": 8, "hidden": 16, "trunk_hidden": [16], "out_hidden": [8]}
    try:
        cfg = RoostConfig(embedding=name, **small)
    except ValueError as exc:  # refused at params.yaml time: aviary must really be unable to load it
        offered = str(exc).split("choose one of ")[1].split(" [")[0]  # pydantic appends "[type=...]"
        assert "matscholar200" in offered and name not in offered
        with pytest.raises(ValueError):
            get_element_embedding(name)
        return
    formulas = ["NaCl", "Al2O3", "GaN"]
    batch = graph_batch(encode_formulas(formulas, embedding_elements(name)), np.arange(3))
    with torch.no_grad():
        out = roost_forward(build_roost(cfg, robust=False).eval(), batch)
    assert out.shape == (3, 1) and torch.isfinite(out).all()


def test_roost_loss_decreases_and_history_is_reported(ensemble):
    member = ensemble.members[0]
    assert [h["epoch"] for h in member.history] == [1, 2, 3, 4]
    losses = [h["train_loss"] for h in member.history]
    assert losses[-1] < losses[0]
    assert all(np.isfinite(h["val_mae"]) for h in member.history)
    assert member.best_epoch == 1 + int(np.argmin([h["val_mae"] for h in member.history]))


def test_predictions_shape_finite_and_ensemble_spread(ensemble, exp1):
    formulas, y = _part(exp1, "test")
    labels = ensemble.predict(formulas)
    assert labels.gaps.shape == (len(formulas),) and labels.std.shape == (len(formulas),)
    ok = labels.ok
    assert ok.mean() > 0.97  # a few test rows may hold an element no training row has
    assert np.isfinite(labels.gaps[ok]).all() and np.isnan(labels.gaps[~ok]).all()
    assert (labels.std[ok] >= 0).all() and labels.std[ok].mean() > 1e-3
    members, aleatoric, _ = ensemble.predict_members(formulas)
    assert members.shape == (len(formulas), 2) and (aleatoric[ok] > 0).all()
    np.testing.assert_allclose(labels.gaps[ok], members[ok].mean(axis=1))
    streamed = np.concatenate([c.gaps for c in ensemble.predict_chunks(iter(formulas), chunk_size=97)])
    np.testing.assert_allclose(streamed, labels.gaps, equal_nan=True, atol=1e-6)
    assert regression_metrics(y, labels.gaps)["mae"] < np.abs(y - y.mean()).mean()


def test_training_is_deterministic_for_a_seed(exp1):
    train_f, train_y = _part(exp1, "train")
    test_f, _ = _part(exp1, "test")
    cfg = TINY.model_copy(update={"epochs": 2})
    a = train_roost(train_f[:600], train_y[:600], None, None, cfg, seed=5, progress=False).predict(test_f)
    b = train_roost(train_f[:600], train_y[:600], None, None, cfg, seed=5, progress=False).predict(test_f)
    c = train_roost(train_f[:600], train_y[:600], None, None, cfg, seed=6, progress=False).predict(test_f)
    np.testing.assert_array_equal(a.gaps, b.gaps)
    assert not np.allclose(a.gaps[a.ok], c.gaps[c.ok])


def test_save_and_load_give_identical_predictions(ensemble, exp1, tmp_path):
    formulas, _ = _part(exp1, "test")
    ensemble.save(tmp_path / "roost")
    back = RoostEnsemble.load(tmp_path / "roost")
    before, after = ensemble.predict(formulas), back.predict(formulas)
    np.testing.assert_array_equal(before.gaps, after.gaps)
    np.testing.assert_array_equal(before.std, after.std)
    assert back.members[1].seed == 4
    # the file keeps each epoch's metrics but not its wall-clock seconds (a retrain writes the same bytes)
    assert back.members[0].history == [
        {k: v for k, v in row.items() if k != "seconds"} for row in ensemble.members[0].history
    ]
    assert all("seconds" in row for row in ensemble.members[0].to_checkpoint()["history"])
    oracle = load_oracle(tmp_path / "roost")
    np.testing.assert_array_equal(oracle.label(formulas).gaps, before.gaps)


def test_predictions_do_not_depend_on_the_batch_size(ensemble, exp1):
    formulas = exp1["reduced_formula"].iloc[:700].tolist()
    default = ensemble.predict(formulas)
    for batch_size in (1, 100, 4096):
        other = ensemble.predict(formulas, batch_size=batch_size)
        np.testing.assert_allclose(other.gaps, default.gaps, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(other.std, default.std, rtol=1e-4, atol=1e-5)


def test_bad_formulas_get_a_status_and_the_rest_are_labelled(ensemble):
    oracle = ModelOracle(ensemble, "roost")
    assert isinstance(oracle, Oracle)
    batch = ["NaCl", "Xx2O", "", None, "Fe0.37O", "Og2O", "GaN", 3.5]
    labels = oracle.label(batch)
    status = labels.status
    assert status[0] == "ok" and status[6] == "ok"
    assert status[1].startswith("unparsable: ") and "Xx" in status[1]
    assert status[2] == "unparsable: empty formula" and status[3] == "unparsable: missing formula"
    assert status[4].startswith("unparsable: fractional")
    assert status[5] == "element Og unknown to the model"
    assert status[7].startswith("unparsable: formula is not text")
    assert labels.ok.tolist() == [True, False, False, False, False, False, True, False]
    assert np.isfinite(labels.gaps[[0, 6]]).all() and np.isnan(labels.gaps[[1, 2, 3, 4, 5, 7]]).all()
    frame = labels.to_frame(batch)
    assert list(frame.columns) == ["formula", "gap", "std", "status"] and len(frame) == len(batch)


def test_table_oracle_returns_known_values_and_no_result_otherwise(tmp_path):
    table = pd.DataFrame(
        {
            "formula": ["ZnO", "Zn2O2", "GaN", "Mg1O1", "not a formula", "NaCl"],
            "band_gap": [0.7, 0.9, 1.7, 4.4, 1.0, "n/a"],
        }
    )
    oracle = TableOracle(table, formula_column="formula")
    assert isinstance(oracle, Oracle) and len(oracle) == 3 and oracle.skipped == 2
    labels = oracle.label(["O4Zn4", "MgO", "GaN", "NaCl", "Xx", "AlN"])
    assert labels.gaps[:3].tolist() == [pytest.approx(0.8), 4.4, 1.7]  # ZnO: median of its two rows
    assert labels.status[3] == NO_RESULT and labels.status[5] == NO_RESULT
    assert labels.status[4].startswith("unparsable: ")
    assert np.isnan(labels.gaps[3:]).all() and labels.std is None
    oracle.save(tmp_path / "dft")
    back = load_oracle(tmp_path / "dft")
    again = back.label(["ZnO", "AlN"])
    assert again.gaps[0] == pytest.approx(0.8) and again.status == ["ok", NO_RESULT]


def test_forest_beats_the_mean_and_round_trips(exp1, tmp_path):
    train_f, train_y = _part(exp1, "train")
    test_f, test_y = _part(exp1, "test")
    model = train_forest(train_f, train_y, TINY_FOREST, seed=0)
    labels = model.predict(test_f + ["Xx", "Og2O"])
    assert (
        labels.status[-2].startswith("unparsable: ")
        and labels.status[-1] == "element Og unknown to the model"
    )
    pred = labels.gaps[: len(test_f)]
    ours = regression_metrics(test_y, pred)
    baseline = regression_metrics(test_y, np.full(len(test_y), train_y.mean()))
    assert ours["mae"] < 0.85 * baseline["mae"] and ours["r2"] > 0.3
    assert (labels.std[labels.ok] >= 0).all()
    model.save(tmp_path / "forest.joblib")
    np.testing.assert_array_equal(ForestModel.load(tmp_path / "forest.joblib").predict(test_f).gaps, pred)


def test_run_oracle_stage_writes_metrics_models_and_a_loadable_oracle(exp1, tmp_path):
    path = tmp_path / "dataset.parquet"
    exp1.to_parquet(path)
    cfg = OracleConfig(roost=TINY.model_copy(update={"epochs": 2}), forest=TINY_FOREST, seed=1)
    seen = []
    metrics = run_oracle_stage(
        path, tmp_path / "oracle", cfg, on_epoch=lambda e, m: seen.append((e, m)), progress=False
    )
    out = tmp_path / "oracle"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["models"]["roost"]["best_epochs"] == metrics["models"]["roost"]["best_epochs"]
    roost = metrics["models"]["roost"]
    for group in ("test", "val", "paper500_all", "paper500_heldout"):
        assert set(roost["ensemble"][group]) == {"n", "n_unlabelled", "r2", "mae", "rmse"}
        assert group in metrics["models"]["forest"]["model"]
    assert roost["ensemble"]["paper500_all"]["n"] + roost["ensemble"]["paper500_all"]["n_unlabelled"] == 100
    assert set(roost["members"]) == {"m0", "m1"}
    # each member is logged under its own keys, step = epoch, for the hold-out and the refit
    keys = {k for _, m in seen for k in m}
    assert "roost.holdout.m0.val_mae" in keys and "roost.deployed.m1.train_loss" in keys
    assert (out / "deployed" / "roost" / "ensemble.json").is_file() and (
        out / "deployed" / "forest.joblib"
    ).is_file()
    oracle = load_oracle(out)
    assert oracle.name == "roost-all-data"
    deployed = RoostEnsemble.load(out / "deployed" / "roost")
    assert [len(m.history) for m in deployed.members] == [TINY.finetune_epochs] * 2  # fine-tuned on all rows
    assert "val_mae" not in deployed.members[0].history[0]
    assert "blend_roost_forest" in metrics["models"]
    labels = oracle.label(["GaN", "Xx"])
    assert labels.status == ["ok", "unparsable: unknown element 'Xx'"]
    assert {"roost", "roost_std", "forest", "split"} <= set(
        pd.read_parquet(out / "predictions.parquet").columns
    )


def test_the_stage_run_twice_writes_the_same_oracle_bytes(exp1, tmp_path):
    """Same data, settings and seeds: every model file is byte-identical (timings live in metrics.json
    and history.csv only), so DVC and the screen stage see the same oracle."""
    path = tmp_path / "dataset.parquet"
    exp1.to_parquet(path)
    cfg = OracleConfig(roost=TINY.model_copy(update={"epochs": 2}), forest=TINY_FOREST, seed=1)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run_oracle_stage(path, out, cfg, progress=False)
    models = sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".pt", ".joblib"))
    assert len(models) == 6  # two Roost members and a forest, held out and deployed
    for name in models:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    files = oracle_files(a)
    assert [p.relative_to(a).as_posix() for p in files] == [
        "deployed/roost/ensemble.json", "deployed/roost/member_0.pt", "deployed/roost/member_1.pt", "oracle.json",
    ]  # fmt: skip
    assert all((a / p.relative_to(a)).read_bytes() == (b / p.relative_to(a)).read_bytes() for p in files)


def test_members_trained_in_worker_processes_equal_sequential_ones(exp1):
    train_f, train_y = _part(exp1, "train")
    val_f, val_y = _part(exp1, "val")
    cfg = TINY.model_copy(update={"epochs": 1})
    seen = []
    parallel = train_ensemble(
        train_f[:300], train_y[:300], val_f, val_y, cfg.model_copy(update={"workers": 2}), seed=7,
        on_epoch=lambda i, e, m: seen.append((i, e)), progress=False,
    )  # fmt: skip
    sequential = train_ensemble(train_f[:300], train_y[:300], val_f, val_y, cfg, seed=7, progress=False)
    assert sorted(seen) == [(0, 1), (1, 1)]
    np.testing.assert_array_equal(parallel.predict(val_f).gaps, sequential.predict(val_f).gaps)


def test_scratch_refit_and_finetune_of_new_elements(exp1, tmp_path):
    small = exp1.iloc[:700].copy()
    small.to_parquet(tmp_path / "dataset.parquet")
    roost = TINY.model_copy(update={"ensemble_size": 1, "epochs": 2})
    cfg = OracleConfig(models=["roost"], roost=roost, refit="scratch")
    metrics = run_oracle_stage(tmp_path / "dataset.parquet", tmp_path / "oracle", cfg, progress=False)
    deployed = RoostEnsemble.load(tmp_path / "oracle" / "deployed" / "roost")
    assert len(deployed.members[0].history) == metrics["models"]["roost"]["best_epochs"][0]
    assert "forest" not in metrics["models"] and "blend_roost_forest" not in metrics["models"]
    model = deployed.members[0]
    assert "Ac" not in model.elements and model.predict(["AcF3"]).status == [
        "element Ac unknown to the model"
    ]
    tuned = finetune_roost(model, ["GaN", "AcF3", "NaCl"], [1.9, 3.0, 5.0], epochs=1, progress=False)
    assert tuned.elements == model.elements | {"Ac"} and len(tuned.history) == 1
    assert tuned.predict(["AcF3"]).status == ["ok"]
    assert not np.allclose(tuned.predict(["GaN"]).gaps, model.predict(["GaN"]).gaps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_roost_trains_finetunes_and_predicts_on_a_gpu(exp1, tmp_path):
    train_f, train_y = _part(exp1, "train")
    val_f, val_y = _part(exp1, "val")
    cfg = TINY.model_copy(update={"epochs": 2, "device": "cuda", "workers": 2})
    gpu = train_ensemble(train_f[:400], train_y[:400], val_f, val_y, cfg, seed=3, progress=False)
    assert all(next(m.net.parameters()).is_cuda for m in gpu.members)
    labels = gpu.predict(val_f)
    assert np.isfinite(labels.gaps).all() and labels.std is not None
    # the same weights on the CPU give the same gaps
    gpu.save(tmp_path / "gpu")
    cpu = RoostEnsemble.load(tmp_path / "gpu", device="cpu")
    np.testing.assert_allclose(cpu.predict(val_f).gaps, labels.gaps, atol=1e-4)
    tuned = finetune_roost(gpu.members[0], ["GaN", "AcF3"], [1.9, 3.0], epochs=1, progress=False)
    assert next(tuned.net.parameters()).is_cuda and tuned.predict(["AcF3"]).status == ["ok"]
