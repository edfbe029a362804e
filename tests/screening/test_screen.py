"""A small real screening run: real data, a real (tiny) forest oracle, tiny forest and Roost screeners."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from agd.chem.formula import formula_key
from agd.chem.magpie import MagpieFeaturizer
from agd.config import ForestConfig, RoostConfig, ScreeningConfig
from agd.models.forest import ForestModel, train_forest
from agd.models.oracle import load_oracle
from agd.screening import screen as screen_module
from agd.screening.metrics import window_mask
from agd.screening.screen import Group, ScreeningError, _Screener, read_training_sets, run_screening_stage
from agd.tracking.catalog import PROVENANCE_COLUMNS, TABLES
from tests.conftest import read_shared_csv

TINY = ScreeningConfig(
    models=["forest", "roost"],
    chunk_size=700,
    groups_per_pass=3,
    forest=ForestConfig(n_estimators=10, max_features=0.3, min_samples_leaf=2, n_jobs=1),
    roost=RoostConfig(
        ensemble_size=1,
        epochs=2,
        batch_size=64,
        learning_rate=2e-3,
        loss="l1",
        elem_fea_len=16,
        n_graph=1,
        elem_heads=1,
        cry_heads=1,
        hidden=16,
        trunk_hidden=[32],
        out_hidden=[16],
        patience=None,
        num_threads=1,
    ),  # fmt: skip
)
N_CANDIDATES = 2500


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Prepared data, training sets (the paper's Exp2 BS/AL plus sampled ones), candidates and an oracle."""
    folder = tmp_path_factory.mktemp("screen-inputs")
    rng = np.random.default_rng(7)
    exp1 = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv")
    prepared = exp1.iloc[rng.choice(len(exp1), 3000, replace=False)][["reduced_formula", "band_gap"]].copy()
    prepared["split"] = rng.choice(["train", "val", "test"], len(prepared), p=[0.6, 0.2, 0.2])
    prepared = prepared.reset_index(drop=True)
    prepared.to_parquet(folder / "prepared.parquet")

    paper = shared_data / "agd_paper"
    bs = read_shared_csv(paper / "Exp2_BS_1k.csv").head(200)
    al_extra = read_shared_csv(paper / "Exp2_AL_1741.csv").iloc[1000:1150]
    frames = []

    def add(experiment, repeat, tset, formulas, gaps, origin):
        frames.append(
            pd.DataFrame(
                {
                    "experiment": experiment,
                    "repeat": repeat,
                    "training_set": tset,
                    "reduced_formula": [formula_key(f) for f in formulas],
                    "band_gap": list(gaps),
                    "origin": origin,
                }
            )  # fmt: skip
        )

    add("Exp2", 0, "BS", bs["composition"], bs["Eg"], "data")
    add("Exp2", 0, "AL", pd.concat([bs["composition"], al_extra["composition"]]),
        pd.concat([bs["Eg"], al_extra["Eg"]]), ["data"] * len(bs) + ["oracle"] * len(al_extra))  # fmt: skip
    pool = prepared[prepared["split"] != "test"].reset_index(drop=True)
    add("Exp1", 0, "ALL", pool["reduced_formula"].head(600), pool["band_gap"].head(600), "data")
    for repeat in (0, 1):
        rows = pool.iloc[rng.choice(len(pool), 200, replace=False)]
        add("Exp3", repeat, "BS", rows["reduced_formula"].head(120), rows["band_gap"].head(120), "data")
        add("Exp3", repeat, "random", rows["reduced_formula"], rows["band_gap"], "data")
    training = pd.concat(frames, ignore_index=True)
    # two bad rows, which must be reported and skipped without losing the rest of their group
    bad = training.iloc[[0, 1]].copy()
    bad["reduced_formula"] = ["Qq2O3", "NaCl"]
    bad["band_gap"] = [1.0, np.nan]
    training = pd.concat([training, bad], ignore_index=True)
    training.to_parquet(folder / "training_sets.parquet")

    mp = read_shared_csv(shared_data / "mp_gap_by_composition.csv")
    cands = mp.iloc[rng.choice(len(mp), N_CANDIDATES, replace=False)][["formula", "reduced_formula"]]
    cands = cands.reset_index(drop=True)
    cands["valid"] = np.arange(len(cands)) % 5 != 0
    cands["novel"] = True
    cands.to_parquet(folder / "candidates.parquet")

    oracle = train_forest(prepared["reduced_formula"].tolist(), prepared["band_gap"], TINY.forest, seed=1)
    oracle.save(folder / "oracle" / "forest.joblib")
    return {
        "training_sets": folder / "training_sets.parquet",
        "prepared": folder / "prepared.parquet",
        "candidates": folder / "candidates.parquet",
        "oracle": folder / "oracle",
    }


def _run(inputs, out: Path, cfg: ScreeningConfig = TINY) -> dict:
    return run_screening_stage(
        inputs["training_sets"],
        inputs["candidates"],
        inputs["prepared"],
        inputs["oracle"],
        out,
        cfg,
        progress=False,
    )


@pytest.fixture(scope="module")
def first(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("screen-out")
    _run(inputs, out)
    return out


def _outputs(out: Path) -> dict[str, object]:
    return {
        "metrics": pd.read_parquet(out / "metrics.parquet"),
        "hits": pd.read_parquet(out / "hits.parquet"),
        "report": (out / "table1.md").read_text(),
        "summary": json.loads((out / "summary.json").read_text()),
    }


def _assert_same(a: dict, b: dict) -> None:
    pd.testing.assert_frame_equal(a["metrics"], b["metrics"])
    pd.testing.assert_frame_equal(a["hits"], b["hits"])
    assert a["report"] == b["report"]
    assert a["summary"] == b["summary"]


def test_tables_match_the_catalog_schema(first):
    out = _outputs(first)
    kept = pd.read_parquet(first / "labels_kept.parquet")
    tables = (
        ("screening_metrics", out["metrics"]),
        ("screening", out["hits"]),
        ("screening_labels_kept", kept),
        ("screening_check", pd.read_parquet(first / "check.parquet")),  # empty here: the option is off
        ("screening_domain", pd.read_parquet(first / "domain.parquet")),
    )
    for name, table in tables:
        expected = [c.name for c in TABLES[name] if c.name not in PROVENANCE_COLUMNS]
        assert list(table.columns) == expected, name
    metrics = out["metrics"]
    # 7 training sets (Exp1 ALL, Exp2 BS/AL, Exp3 BS/random x 2 repeats) x 2 models x 2 windows
    assert len(metrics) == 7 * 2 * 2
    assert set(metrics["gap_window"]) == {"gt6", "2-4"}
    assert metrics.groupby(["experiment", "repeat", "training_set", "model"]).size().eq(2).all()
    exp2_bs = metrics[(metrics.experiment == "Exp2") & (metrics.training_set == "BS")]
    assert (exp2_bs["n_train"] == 160).all()  # 200 usable rows, 40 held out
    assert metrics["r2_test"].notna().all() and metrics["mae_holdout"].gt(0).all()
    forest_all = metrics[(metrics.training_set == "ALL") & (metrics.model == "forest")]
    assert (forest_all["r2_test"] > 0.2).all()  # a forest on 480 real rows predicts something


def test_bad_training_rows_are_reported_not_fatal(first, inputs):
    rejected = pd.read_csv(first / "rejected_rows.csv", keep_default_na=False)
    assert len(rejected) == 2
    reasons = " ".join(rejected["reason"])
    assert "Qq2O3" in reasons and "band_gap" in reasons
    n_rows = len(pd.read_parquet(inputs["training_sets"]))
    assert set(rejected["row"]) == {n_rows - 2, n_rows - 1}
    good, bad = read_training_sets(inputs["training_sets"])
    assert len(good) == n_rows - 2 and len(bad) == 2
    with pytest.raises(ScreeningError, match="missing column"):
        read_training_sets(pd.DataFrame({"experiment": ["Exp2"], "reduced_formula": ["NaCl"]}))


def test_counts_agree_with_a_direct_computation(first, inputs):
    out = _outputs(first)
    metrics, hits = out["metrics"], out["hits"]
    cands = pd.read_parquet(inputs["candidates"])
    screened = cands[cands["valid"]].reset_index(drop=True)
    oracle_gap = load_oracle(inputs["oracle"]).label(screened["formula"].tolist()).gaps
    oracle_of = dict(zip(screened["formula"], oracle_gap, strict=True))
    windows = TINY.windows
    n_oracle = {name: int(window_mask(oracle_gap, w).sum()) for name, w in windows.items()}
    assert n_oracle["2-4"] > 50  # the check below means something
    assert out["summary"]["oracle"]["screened"] == len(screened)
    assert out["summary"]["oracle"]["hits"] == n_oracle
    assert set(hits["formula"]) <= set(screened["formula"])  # invalid candidates are never screened

    for key, rows in metrics.groupby(["experiment", "repeat", "training_set", "model", "gap_window"]):
        *_, window = key
        mine = hits.set_index(["experiment", "repeat", "training_set", "model", "gap_window"]).sort_index()
        group_hits = mine.loc[key] if key in mine.index else mine.iloc[:0]
        row = rows.iloc[0]
        assert row["n_oracle"] == n_oracle[window]
        assert row["n_candidates"] == len(group_hits)
        assert window_mask(group_hits["predicted_gap"].to_numpy(), windows[window]).all()
        np.testing.assert_allclose(group_hits["oracle_gap"], [oracle_of[f] for f in group_hits["formula"]])
        recovered = int(window_mask(group_hits["oracle_gap"].to_numpy(), windows[window]).sum())
        assert row["n_recovered"] == recovered
        if row["n_oracle"]:
            assert row["recovery"] == pytest.approx(recovered / row["n_oracle"])

    # retrain one forest independently (same split rule and seed) and predict every screened candidate
    group = Group("Exp3", 1, "random", "forest")
    training, _ = read_training_sets(inputs["training_sets"])
    rows = training[
        (training.experiment == "Exp3") & (training.repeat == 1) & (training.training_set == "random")
    ]
    seed = group.seed(TINY.seed)
    order = np.random.default_rng(seed).permutation(len(rows))
    train = order[round(TINY.holdout_fraction * len(rows)) :]
    model: ForestModel = train_forest(
        rows["reduced_formula"].iloc[train].tolist(), rows["band_gap"].iloc[train], TINY.forest, seed
    )
    features = MagpieFeaturizer().featurize_formulas(screened["formula"].tolist()).features
    predicted = model.forest.predict(features)
    for window_name, window in windows.items():
        expected = set(screened["formula"][window_mask(predicted, window)])
        got = hits[(hits.experiment == "Exp3") & (hits.repeat == 1) & (hits.training_set == "random")
                   & (hits.model == "forest") & (hits.gap_window == window_name)]  # fmt: skip
        assert set(got["formula"]) == expected, window_name
        np.testing.assert_allclose(
            got["predicted_gap"], predicted[screened.index[screened["formula"].isin(got["formula"])]]
        )


def test_hits_flag_predictions_beyond_their_models_training_labels(first, inputs):
    """beyond_training: the prediction lies outside [min, max] of the labels its model trained on."""
    hits = pd.read_parquet(first / "hits.parquet")
    training, _ = read_training_sets(inputs["training_sets"])
    checked = 0
    for (experiment, repeat, training_set, model), got in hits.groupby(
        ["experiment", "repeat", "training_set", "model"]
    ):
        rows = training[(training.experiment == experiment) & (training.repeat == repeat)
                        & (training.training_set == training_set)].drop_duplicates("key")  # fmt: skip
        rows = rows[screen_module._usable_for(model, rows["reduced_formula"].tolist(), TINY)]
        n = len(rows)
        order = np.random.default_rng(
            Group(experiment, repeat, training_set, model).seed(TINY.seed)
        ).permutation(n)
        train = order[min(max(int(round(TINY.holdout_fraction * n)), 1), n - 1) :]
        labels = rows["band_gap"].to_numpy()[train]
        outside = (got["predicted_gap"] < labels.min()) | (got["predicted_gap"] > labels.max())
        assert got["beyond_training"].tolist() == outside.tolist(), (experiment, repeat, training_set, model)
        if model == "forest":  # a forest averages training labels: it cannot leave their range
            assert not got["beyond_training"].any()
        checked += len(got)
    assert checked == len(hits) > 0
    summary = json.loads((first / "summary.json").read_text())
    assert summary["hits_beyond_training"] == int(hits["beyond_training"].sum())


def test_a_screener_flags_predictions_outside_its_label_range():
    model = train_forest(["NaCl", "KCl", "NaBr", "KBr", "KI"], [5.0, 6.0, 4.0, 5.0, 4.5], TINY.forest)
    screener = _Screener("forest", model, model.elements, TINY, (4.0, 6.0))
    assert screener.beyond(np.array([3.9, 4.0, 5.0, 6.0, 6.1, np.nan])).tolist() == [
        True, False, False, False, True, False,
    ]  # fmt: skip


def test_a_roost_screener_predicts_as_its_members_do_on_shared_batches(shared_data):
    """Screening builds each chunk's Roost batches once for every member of every screener; the gaps
    must equal each member's own prediction, bit for bit, with NaN where a formula cannot be encoded."""
    from agd.models.roost import train_ensemble

    rows = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv").head(700)
    formulas = rows["reduced_formula"].tolist()
    cfg = TINY.roost.model_copy(update={"ensemble_size": 2, "epochs": 1})
    model = train_ensemble(
        formulas[:300], rows["band_gap"].to_numpy(float)[:300], None, None, cfg, 3, progress=False
    )
    screener = _Screener("roost", model, model.elements, TINY, (0.0, 9.0))
    chunk = formulas[300:] + ["Xx2O", "Og2O3"]  # unparsable, and an element the embedding lacks
    inputs = screen_module._ChunkInputs(chunk, TINY)
    own = np.array([m.predict_encoded(inputs.encoded())[0] for m in model.members])  # the stock path
    shared = screen_module._roost_member_gaps(model.members, inputs)
    np.testing.assert_array_equal(shared, own)
    assert np.isnan(shared[:, -2:]).all() and not np.isnan(shared[:, :-2]).any()
    assert not np.array_equal(shared[0], shared[1])  # two members, two different models
    np.testing.assert_array_equal(screener.predict(inputs), own.mean(axis=0))


def test_models_trained_and_parts_screened_in_worker_processes_give_the_same_tables(first, inputs, tmp_path):
    """train_jobs: 2 trains a pass's groups in two spawned processes and screen_jobs: 2 screens the
    cached candidate parts (4 here) in two others; the tables are those of one process."""
    out = tmp_path / "two-jobs"
    summary = _run(inputs, out, TINY.model_copy(update={"train_jobs": 2, "screen_jobs": 2}))
    assert len(list((out / "state" / "oracle").glob("*/part-*.parquet"))) > 2, summary
    for name in ("metrics.parquet", "hits.parquet", "table1.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(first / name), pd.read_parquet(out / name), check_exact=True, obj=name
        )
    assert (first / "table1.md").read_text() == (out / "table1.md").read_text()


def test_rerun_is_idempotent_and_reuses_every_group(first, inputs, tmp_path, monkeypatch):
    before = _outputs(first)
    copy = tmp_path / "out"
    shutil.copytree(first, copy)

    def no_training(*args, **kwargs):
        raise AssertionError("a stored group was trained again")

    monkeypatch.setattr(screen_module, "_train_screener", no_training)
    _run(inputs, copy)
    _assert_same(before, _outputs(copy))
    assert (copy / "hits.parquet").read_bytes() == (first / "hits.parquet").read_bytes()


def test_resume_after_losing_a_group_and_an_oracle_part(first, inputs, tmp_path, monkeypatch):
    before = _outputs(first)
    copy = tmp_path / "out"
    shutil.copytree(first, copy)
    lost = Group("Exp3", 0, "BS", "roost")
    (copy / "state" / "groups" / f"{lost.name}.json").unlink()
    (oracle_folder,) = (copy / "state" / "oracle").iterdir()
    parts = sorted(oracle_folder.glob("part-*.parquet"))
    assert len(parts) == 3  # 2000 valid candidates in chunks of 700
    (oracle_folder / "complete.json").unlink()
    parts[-1].unlink()

    trained = []
    real = screen_module._train_screener
    monkeypatch.setattr(
        screen_module, "_train_screener", lambda kind, *a, **k: trained.append(kind) or real(kind, *a, **k)
    )
    _run(inputs, copy)
    assert trained == ["roost"]
    _assert_same(before, _outputs(copy))


def _no_training(*args, **kwargs):
    raise AssertionError("a stored group was trained again")


def test_an_oracle_folder_changed_without_changing_a_label_keeps_every_group(
    first, inputs, tmp_path, monkeypatch
):
    """A timing file beside the oracle changes nothing it is loaded from: its labelling is reused. The
    same model written again with other bytes (a retrain with the same seeds, another compression) is
    labelled again, and gives the same labels: no screener is trained again either way."""
    before = _outputs(first)
    copy = tmp_path / "out"
    shutil.copytree(first, copy)
    oracle = tmp_path / "oracle"
    shutil.copytree(inputs["oracle"], oracle)
    (oracle / "history.csv").write_text("epoch,seconds\n1,12.5\n")
    monkeypatch.setattr(screen_module, "_train_screener", _no_training)
    _run(inputs | {"oracle": oracle}, copy)
    _assert_same(before, _outputs(copy))
    (old,) = (first / "state" / "oracle").iterdir()
    assert [d.name for d in (copy / "state" / "oracle").iterdir()] == [old.name]  # reused
    model = joblib.load(oracle / "forest.joblib")
    joblib.dump(model, oracle / "forest.joblib", compress=1)
    assert (oracle / "forest.joblib").read_bytes() != (inputs["oracle"] / "forest.joblib").read_bytes()
    _run(inputs | {"oracle": oracle}, copy)
    _assert_same(before, _outputs(copy))
    (new,) = (copy / "state" / "oracle").iterdir()  # labelled again, the old labelling replaced
    assert old.name != new.name
    hashes = [json.loads((d / "complete.json").read_text())["labels_hash"] for d in (old, new)]
    assert hashes[0] == hashes[1]


def test_an_oracle_with_other_labels_trains_every_group_again(first, inputs, tmp_path, monkeypatch):
    copy = tmp_path / "out"
    shutil.copytree(first, copy)
    prepared = pd.read_parquet(inputs["prepared"])
    other = tmp_path / "oracle"
    train_forest(prepared["reduced_formula"].tolist(), prepared["band_gap"], TINY.forest, seed=2).save(
        other / "forest.joblib"
    )
    trained = []
    real = screen_module._train_screener
    monkeypatch.setattr(
        screen_module, "_train_screener", lambda kind, *a, **k: trained.append(kind) or real(kind, *a, **k)
    )
    _run(inputs | {"oracle": other}, copy)
    assert len(trained) == len(pd.read_parquet(first / "metrics.parquet").groupby(
        ["experiment", "repeat", "training_set", "model"]))  # fmt: skip


def test_groups_stored_under_the_oracle_folders_hash_are_kept(first, inputs, tmp_path, monkeypatch):
    """Groups stored before the oracle's labels were hashed were keyed by the hash of its folder: with
    the same oracle folder they are the same groups, kept and stored again under the new key."""
    real = screen_module._group_fingerprints
    out = tmp_path / "old"
    monkeypatch.setattr(screen_module, "_group_fingerprints", lambda *a, legacy=False: real(*a, legacy=True))
    _run(inputs, out)  # as the code before the labels' hash keyed them
    monkeypatch.setattr(screen_module, "_group_fingerprints", real)
    monkeypatch.setattr(screen_module, "_train_screener", _no_training)
    _run(inputs, out)
    _assert_same(_outputs(first), _outputs(out))
    for path in sorted((first / "state" / "groups").glob("*.json")):
        kept, fresh = (
            json.loads((out / "state" / "groups" / path.name).read_text()),
            json.loads(path.read_text()),
        )
        assert (kept["fingerprint"], kept["model_fingerprint"]) == (
            fresh["fingerprint"],
            fresh["model_fingerprint"],
        )


def test_same_seed_same_results_in_a_fresh_folder(first, inputs, tmp_path):
    _run(inputs, tmp_path / "fresh")
    _assert_same(_outputs(first), _outputs(tmp_path / "fresh"))


def test_changed_settings_retrain_only_what_they_touch(first, inputs, tmp_path, monkeypatch):
    copy = tmp_path / "out"
    shutil.copytree(first, copy)
    trained = []
    real = screen_module._train_screener
    monkeypatch.setattr(
        screen_module, "_train_screener", lambda kind, *a, **k: trained.append(kind) or real(kind, *a, **k)
    )
    forest_only = TINY.model_copy(update={"models": ["forest"], "hit_windows": ["gt6"]})
    _run(inputs, copy, forest_only)
    assert trained == ["forest"] * 7  # hit windows are part of a group's fingerprint
    metrics = pd.read_parquet(copy / "metrics.parquet")
    hits = pd.read_parquet(copy / "hits.parquet")
    assert set(metrics["model"]) == {"forest"} and set(hits["gap_window"]) <= {"gt6"}
    assert not list((copy / "state" / "groups").glob("*roost*"))  # groups no longer planned are pruned


def test_a_changed_test_set_rescores_stored_groups_instead_of_training_them(
    first, inputs, tmp_path, monkeypatch
):
    """One training set gains a composition of the 'test' split, so the common test set loses it: that
    set's two models are trained again, a group whose stored test predictions are gone is trained again,
    and every other group is rescored from its stored predictions. The tables equal a fresh run's."""
    training = pd.read_parquet(inputs["training_sets"])
    prepared = pd.read_parquet(inputs["prepared"])
    test_keys = [formula_key(f) for f in prepared.loc[prepared["split"] == "test", "reduced_formula"]]
    taken = next(k for k in test_keys if k not in set(training["reduced_formula"]))
    chosen = (training.experiment == "Exp3") & (training.repeat == 1) & (training.training_set == "random")
    extra = training.loc[chosen].iloc[[0]].assign(reduced_formula=taken, band_gap=2.5)
    changed = inputs | {"training_sets": tmp_path / "training_sets.parquet"}
    pd.concat([training, extra], ignore_index=True).to_parquet(changed["training_sets"])

    copy = tmp_path / "out"
    shutil.copytree(first, copy)
    (copy / "state" / "groups" / f"{Group('Exp2', 0, 'BS', 'forest').name}.test.parquet").unlink()
    trained = []
    real = screen_module._train_screener
    monkeypatch.setattr(
        screen_module, "_train_screener", lambda kind, *a, **k: trained.append(kind) or real(kind, *a, **k)
    )
    _run(changed, copy)
    assert sorted(trained) == ["forest", "forest", "roost"]
    monkeypatch.setattr(screen_module, "_train_screener", real)
    _run(changed, tmp_path / "fresh")
    _assert_same(_outputs(tmp_path / "fresh"), _outputs(copy))

    before, after = _outputs(first), _outputs(copy)
    assert after["summary"]["test_set"]["rows"] == before["summary"]["test_set"]["rows"] - 1
    kept = after["metrics"]["experiment"] != "Exp3"  # groups whose rows did not change
    assert (after["metrics"].loc[kept, "r2_test"] != before["metrics"].loc[kept, "r2_test"]).all()
    pd.testing.assert_series_equal(
        after["metrics"].loc[kept, "recovery"], before["metrics"].loc[kept, "recovery"]
    )


def test_outputs_load_into_the_catalog(first, tmp_path):
    from agd.tracking.catalog import CatalogReader, load_table

    db = tmp_path / "catalog.duckdb"
    n_hits = load_table(db, "screening", first / "hits.parquet")
    n_metrics = load_table(db, "screening_metrics", first / "metrics.parquet")
    n_kept = load_table(db, "screening_labels_kept", first / "labels_kept.parquet")
    assert load_table(db, "screening_check", first / "check.parquet") == 0  # off: an empty table loads
    with CatalogReader(db) as reader:
        counts = reader.tables()
        top = reader.query(
            "SELECT model, count(*) AS n FROM screening WHERE gap_window = '2-4' GROUP BY model ORDER BY model"
        )
    assert counts["screening"] == n_hits == len(pd.read_parquet(first / "hits.parquet"))
    assert counts["screening_metrics"] == n_metrics == 28
    assert counts["screening_labels_kept"] == n_kept == 28  # every window stores its hits here
    assert list(top["model"]) == ["forest", "roost"]


def _params_file(folder: Path) -> Path:
    import yaml

    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"screening": TINY.model_dump()}, sort_keys=False))
    return path


def test_cli_help_and_missing_training_sets(tmp_path, capsys):
    from agd.cli import main

    with pytest.raises(SystemExit) as info:
        main(["screen", "--help"])
    assert info.value.code == 0
    assert "--training-sets" in capsys.readouterr().out
    missing = tmp_path / "nowhere" / "training_sets.parquet"
    code = main(
        ["--params", str(_params_file(tmp_path)), "screen", "--training-sets", str(missing), "--no-mlflow"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(missing) in err and "agd experiments" in err


def test_cli_run_writes_metrics_report_and_an_mlflow_run(first, inputs, tmp_path, monkeypatch, capsys):
    import mlflow

    from agd.cli import main

    monkeypatch.chdir(tmp_path)  # the MLflow artifact folder goes beside the params file
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "out"
    shutil.copytree(first, out)  # every group is stored: the CLI run only assembles and logs
    args = [
        "--params", str(_params_file(tmp_path)), "screen",
        "--training-sets", str(inputs["training_sets"]), "--candidates", str(inputs["candidates"]),
        "--prepared", str(inputs["prepared"]), "--oracle", str(inputs["oracle"]), "--out-dir", str(out),
        "--metrics", str(tmp_path / "metrics" / "screening.json"), "--report", str(tmp_path / "reports" / "table1.md"),
    ]  # fmt: skip
    assert main(args) == 0
    assert "Table 1 ->" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics" / "screening.json").read_text())
    assert set(metrics["table1"]) == {"Exp1", "Exp2", "Exp3"}
    assert metrics["table1"]["Exp3"]["random"]["forest"]["gt6"]["n_repeats"] == 2
    # AL minus BS, paired by repeat, where an experiment has both (Exp2); no experiment has AL and random
    assert set(metrics["paired"]) == {"AL-BS"} and set(metrics["paired"]["AL-BS"]) == {"Exp2"}
    assert metrics["paired"]["AL-BS"]["Exp2"]["forest"]["gt6"]["n_repeats"] == 1
    assert (tmp_path / "reports" / "table1.md").read_text() == (first / "table1.md").read_text()

    client = mlflow.MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name.endswith("-screening")]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert "table1.Exp2.AL.roost.gt6.recovery_mean" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "Exp3.random.forest.2-4.n_candidates")
    assert sorted(m.step for m in history) == [0, 1]  # one point per repeat
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["table1.md"]


def test_unknown_elements_are_predicted_or_left_out_by_config():
    model = train_forest(["NaCl", "KCl", "NaBr", "KBr", "KI"], [5.0, 6.0, 4.0, 5.0, 4.5], TINY.forest)
    formulas = ["NaCl", "LiF", "KBr", "Xx2"]  # LiF: elements the model never saw; Xx2: not a formula
    open_ = _Screener("forest", model, model.elements, TINY, (4.0, 6.0)).predict_formulas(formulas)
    assert np.isfinite(open_).tolist() == [True, True, True, False]
    strict = TINY.model_copy(update={"predict_unknown_elements": False})
    closed = _Screener("forest", model, model.elements, strict, (4.0, 6.0)).predict_formulas(formulas)
    assert np.isfinite(closed).tolist() == [True, False, True, False]
    np.testing.assert_allclose(closed[[0, 2]], open_[[0, 2]])


def test_model_limits_keep_a_slow_model_to_some_repeats_and_sets():
    from agd.config import ScreeningConfig
    from agd.screening.screen import plan_groups

    rows = [("Exp1", 0, "ALL")] + [
        (e, r, t) for e in ("Exp2", "Exp3") for r in range(3) for t in ("BS", "AL", "random")
    ]
    training = pd.DataFrame(rows, columns=["experiment", "repeat", "training_set"])
    cfg = ScreeningConfig(limits={"roost": {"repeats": 1, "training_sets": ["BS", "AL", "random"]}})
    groups = plan_groups(training, cfg)
    roost = [g for g in groups if g.model == "roost"]
    assert len([g for g in groups if g.model == "forest"]) == 19
    assert len(roost) == 6 and all(g.repeat == 0 and g.training_set != "ALL" for g in roost)


def test_labels_kept_replace_the_predictions_of_labelled_candidates(first, inputs):
    kept = pd.read_parquet(first / "labels_kept.parquet")
    out = _outputs(first)
    hits, metrics = out["hits"], out["metrics"]
    training, _ = read_training_sets(inputs["training_sets"])
    cands = pd.read_parquet(inputs["candidates"])
    screened = cands[cands["valid"]].reset_index(drop=True)
    oracle_gap = load_oracle(inputs["oracle"]).label(screened["formula"].tolist()).gaps
    keys = [formula_key(f) for f in screened["formula"]]
    windows = {name: TINY.windows[name] for name in TINY.hit_windows or TINY.windows}
    # one row per screener of a hit window, with the model's own counts beside it unchanged
    assert len(kept) == int(metrics["gap_window"].isin(list(windows)).sum())
    assert kept["n_labelled"].max() > 0  # some training sets label some candidates: the check means something
    for row in kept.itertuples(index=False):
        window = windows[row.gap_window]
        labels = training[
            (training.experiment == row.experiment)
            & (training.repeat == row.repeat)
            & (training.training_set == row.training_set)
        ]
        labels = labels[labels["key"].isin(keys)].groupby("key")["band_gap"].mean()
        truth = {k for k, g in zip(keys, oracle_gap, strict=True) if window_mask(np.array([g]), window)[0]}
        model = set(
            hits.loc[
                (hits.experiment == row.experiment)
                & (hits.repeat == row.repeat)
                & (hits.training_set == row.training_set)
                & (hits.model == row.model)
                & (hits.gap_window == row.gap_window),
                "reduced_formula",
            ]
        )
        called = {k for k, g in labels.items() if window_mask(np.array([g]), window)[0]}
        called |= model - set(labels.index)
        assert (row.n_labelled, row.n_candidates, row.n_recovered) == (
            len(labels),
            len(called),
            len(called & truth),
        )
        stated = metrics.set_index(["experiment", "repeat", "training_set", "model", "gap_window"]).loc[
            (row.experiment, row.repeat, row.training_set, row.model, row.gap_window)
        ]
        assert row.recovery_gain == pytest.approx(row.recovery - stated["recovery"], nan_ok=True)
    summary = out["summary"]["labels_kept"]
    assert set(summary["table1"]) == set(kept["experiment"])
    assert "## With the training sets' labels kept" in out["report"]


def test_a_check_of_the_near_misses_costs_labels_and_recovers_more(inputs, first, tmp_path):
    margins = [0.25, 0.5]
    out = tmp_path / "checked"
    shutil.copytree(first, out)  # stored groups lack near-misses: every screener trains again
    _run(inputs, out, TINY.model_copy(update={"check_margins": margins}))
    check = pd.read_parquet(out / "check.parquet")
    kept = pd.read_parquet(out / "labels_kept.parquet")
    hits = pd.read_parquet(out / "hits.parquet")
    assert len(check) == len(kept) * len(margins)
    # the screeners are the same models (the option does not enter their training): same hits as before
    pd.testing.assert_frame_equal(hits, pd.read_parquet(first / "hits.parquet"))
    state = out / "state" / "groups"
    near = pd.concat([pd.read_parquet(f) for f in sorted(state.glob("*.near.parquet"))], ignore_index=True)
    assert len(near) > 0
    windows = TINY.windows
    for name, window in windows.items():
        part = near[near.gap_window == name]["predicted_gap"].to_numpy()
        wide = window.model_copy(
            update={"low": window.low - 0.5, "high": None if window.high is None else window.high + 0.5}
        )
        assert window_mask(part, wide).all() and not window_mask(part, window).any()  # near, not inside

    training, _ = read_training_sets(inputs["training_sets"])
    cands = pd.read_parquet(inputs["candidates"])
    screened = cands[cands["valid"]].reset_index(drop=True)
    oracle_gap = load_oracle(inputs["oracle"]).label(screened["formula"].tolist()).gaps
    oracle_of = dict(zip([formula_key(f) for f in screened["formula"]], oracle_gap, strict=True))
    calls = pd.concat([hits, near], ignore_index=True)
    for row in check.itertuples(index=False):
        window = windows[row.gap_window]
        truth = {k for k, g in oracle_of.items() if window_mask(np.array([g]), window)[0]}
        own = training[(training.experiment == row.experiment) & (training.repeat == row.repeat)
                       & (training.training_set == row.training_set) & training["key"].isin(oracle_of)]  # fmt: skip
        labels = own.groupby("key")["band_gap"].mean()
        mine = calls[(calls.experiment == row.experiment) & (calls.repeat == row.repeat)
                     & (calls.training_set == row.training_set) & (calls.model == row.model)
                     & (calls.gap_window == row.gap_window)]  # fmt: skip
        low = window.low - row.margin
        high = None if window.high is None else window.high + row.margin
        inside = mine["predicted_gap"].gt(low) if not window.include_low else mine["predicted_gap"].ge(low)
        if high is not None:
            inside &= mine["predicted_gap"].le(high)
        checked = set(mine.loc[inside, "reduced_formula"]) - set(labels.index)
        listed = {k for k, g in labels.items() if window_mask(np.array([g]), window)[0]} | (checked & truth)
        assert (row.n_checked, row.n_candidates, row.n_recovered) == (
            len(checked),
            len(listed),
            len(listed & truth),
        )
    # a wider check costs more labels and never recovers less; both recover at least the labels-kept figure
    wide = check.pivot_table(index=[*kept.columns[:5]], columns="margin", values=["n_checked", "n_recovered"])
    assert (wide[("n_checked", 0.5)] >= wide[("n_checked", 0.25)]).all()
    assert (wide[("n_recovered", 0.5)] >= wide[("n_recovered", 0.25)]).all()
    assert (wide[("n_checked", 0.5)] > wide[("n_checked", 0.25)]).any()
    base = kept.set_index(list(kept.columns[:5]))["n_recovered"]
    assert (wide[("n_recovered", 0.25)] >= base.loc[wide.index]).all()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["check"]["Exp2"]["AL"]["forest"]["gt6"]) == {"0.25", "0.5"}
    assert "## After checking the near-misses" in (out / "table1.md").read_text()
    from agd.tracking.catalog import load_table

    assert load_table(tmp_path / "catalog.duckdb", "screening_check", out / "check.parquet") == len(check)
    # off again: the check table is empty, and the retrained screeners keep no near-misses of the old ones
    _run(inputs, out)
    assert pd.read_parquet(out / "check.parquet").empty and not list(state.glob("*.near.parquet"))
    for bad in ([0.0], [0.5, 0.5], [float("nan")]):
        with pytest.raises(ValueError, match="check_margins"):
            ScreeningConfig(check_margins=bad)


def test_the_element_domain_drops_calls_on_rare_elements_without_retraining(inputs, first, tmp_path):
    from pymatgen.core import Composition

    levels = [1, 40, 100_000]
    out = tmp_path / "domain"
    shutil.copytree(first, out)
    groups = out / "state" / "groups"
    stored = {p.name: p.read_bytes() for p in sorted(groups.glob("*.json"))}
    _run(inputs, out, TINY.model_copy(update={"domain_min_rows": levels}))
    # read from the stored hits: no screener trained again, and the stage's own tables are unchanged
    assert {p.name: p.read_bytes() for p in sorted(groups.glob("*.json"))} == stored
    for name in ("metrics.parquet", "hits.parquet", "labels_kept.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(first / name))
    domain = pd.read_parquet(out / "domain.parquet")
    kept = pd.read_parquet(out / "labels_kept.parquet")
    hits = pd.read_parquet(out / "hits.parquet")
    assert len(domain) == len(kept) * len(levels)

    # an independent recount: pymatgen's elements, the training rows' own keys
    training, _ = read_training_sets(inputs["training_sets"])
    cands = pd.read_parquet(inputs["candidates"])
    screened = cands[cands["valid"]].reset_index(drop=True)
    oracle_gap = load_oracle(inputs["oracle"]).label(screened["formula"].tolist()).gaps
    oracle_of = dict(zip([formula_key(f) for f in screened["formula"]], oracle_gap, strict=True))
    keys = ["experiment", "repeat", "training_set", "model", "gap_window"]
    for row in domain.itertuples(index=False):
        window = TINY.windows[row.gap_window]
        truth = {k for k, g in oracle_of.items() if window_mask(np.array([g]), window)[0]}
        own = training[(training.experiment == row.experiment) & (training.repeat == row.repeat)
                       & (training.training_set == row.training_set)]  # fmt: skip
        rows_with = {}
        for key in own["key"].unique():
            for element in Composition(key).elements:
                rows_with[str(element)] = rows_with.get(str(element), 0) + 1
        mine = hits[(hits[keys] == pd.Series(row._asdict())[keys]).all(axis=1)]["reduced_formula"]
        inside = {
            f for f in mine if min(rows_with.get(str(e), 0) for e in Composition(f).elements) >= row.min_rows
        }
        assert (row.n_dropped, row.n_candidates, row.n_recovered) == (
            len(set(mine)) - len(inside),
            len(inside),
            len(inside & truth),
        )
        labels = own[own["key"].isin(oracle_of)].groupby("key")["band_gap"].mean()
        listed = {k for k, g in labels.items() if window_mask(np.array([g]), window)[0]}
        listed |= inside - set(labels.index)
        assert (row.kept_n_candidates, row.kept_n_recovered) == (len(listed), len(listed & truth))
    # k = 1 drops only calls on elements the set never holds; a huge k drops every model call
    assert (domain[domain.min_rows == 100_000]["n_candidates"] == 0).all()
    assert domain[domain.min_rows == 1]["n_candidates"].sum() > 0
    per_level = domain.groupby("min_rows")["n_dropped"].sum()
    assert per_level.is_monotonic_increasing and per_level.iloc[-1] > per_level.iloc[0]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["domain"]["Exp2"]["AL"]["forest"]["gt6"]) == {"1", "40", "100000"}
    assert "## Within each screener's element domain" in (out / "table1.md").read_text()
    from agd.tracking.catalog import CatalogReader, load_table

    db = tmp_path / "catalog.duckdb"
    assert load_table(db, "screening_domain", out / "domain.parquet") == len(domain)
    with CatalogReader(db) as reader:
        loaded = reader.query(
            "SELECT min_rows, sum(n_dropped) AS n FROM screening_domain GROUP BY 1 ORDER BY 1"
        )
    assert list(loaded["n"]) == list(per_level)
    _run(inputs, out)  # off again: an empty table, and still nothing trained
    assert pd.read_parquet(out / "domain.parquet").empty
    assert {p.name: p.read_bytes() for p in sorted(groups.glob("*.json"))} == stored
    for bad in ([0], [3, 3], [-2]):
        with pytest.raises(ValueError, match="domain_min_rows"):
            ScreeningConfig(domain_min_rows=bad)
