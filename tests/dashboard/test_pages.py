"""Every dashboard page run by Streamlit's AppTest on the fixture catalog; shown numbers equal the catalog's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agd.tracking.catalog import TABLES, CatalogReader, build_catalog
from tests.dashboard.conftest import make_app

pytestmark = pytest.mark.timeout(300)


def _vega(at, index: int) -> tuple[dict, pd.DataFrame]:
    """The Vega-Lite spec of the index-th such chart on the page and its data (Streamlit ships it as Arrow)."""
    import pyarrow as pa

    element = at.get("vega_lite_chart")[index]
    return json.loads(element.proto.spec), pa.ipc.open_stream(element.proto.data.data).read_all().to_pandas()


def _no_failure(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _pm(mean: float, std: float, digits: int, scale: float = 1.0) -> str:
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


# ---------------------------------------------------------------------------------------------
def test_experiments_table1_equals_catalog(app_env, fixture_tables):
    at = make_app().run()
    _no_failure(at)
    assert at.title[0].value.startswith("Experiments")
    # the headline window (> 6 eV) is shown first; the table follows the selection
    assert at.multiselect(key="exp_windows").value == ["gt6"]
    assert set(at.table[0].value.index.get_level_values("Window")) == {"gt6"}
    at.multiselect(key="exp_windows").set_value(["2-4", "gt6"]).run()
    _no_failure(at)
    shown = at.table[0].value
    metrics = fixture_tables["screening_metrics"]
    groups = metrics.groupby(["experiment", "model", "training_set", "gap_window"])
    assert len(shown) == groups.ngroups == 4 * 2 * 3 * 2
    for (experiment, model, training_set, window), rows in groups:
        row = shown.loc[(experiment, model, training_set, window)]
        assert int(row["Repeats"]) == len(rows)
        assert row["Recovery (%)"] == _pm(rows.recovery.mean(), rows.recovery.std(), 1, 100)
        assert row["Precision (%)"] == _pm(rows.precision.mean(), rows.precision.std(), 1, 100)
        assert row["R² test"] == _pm(rows.r2_test.mean(), rows.r2_test.std(), 3)
        assert row["R² hold-out"] == _pm(rows.r2_holdout.mean(), rows.r2_holdout.std(), 3)
        assert row["MAE test (eV)"] == _pm(rows.mae_test.mean(), rows.mae_test.std(), 3)
        assert row["Candidates (n)"] == _pm(rows.n_candidates.mean(), rows.n_candidates.std(), 0)

    # AL minus random and AL minus BS, paired by repeat
    paired = at.table[1].value
    for second in ("random", "BS"):
        for (experiment, model, window), rows in metrics.groupby(["experiment", "model", "gap_window"]):
            by_set = rows.set_index(["training_set", "repeat"])
            diff = 100 * (by_set.loc["AL", "recovery"] - by_set.loc[second, "recovery"]).dropna()
            row = paired.loc[(f"AL − {second}", experiment, model, window)]
            assert row["Recovery (points)"] == f"{diff.mean():+.1f} ± {diff.std():.1f}"
            assert row["Recovery: ahead"] == f"{int((diff > 0).sum())} of {len(diff)}"

    # the recovery bar chart: a bar per experiment and training set, faceted by model and window;
    # heights are the means in percent, error bars one standard deviation either side
    spec, bars = _vega(at, 0)
    assert spec["title"] == "Recovery (%)" and set(spec["facet"]) == {"column", "row"}
    assert len(bars) == groups.ngroups
    for (experiment, model, training_set, window), rows in groups:
        bar = bars[(bars.experiment == experiment) & (bars.model == model)
                   & (bars.training_set == training_set) & (bars.window == window)]  # fmt: skip
        assert len(bar) == 1
        np.testing.assert_allclose(bar["mean"], rows.recovery.mean() * 100)
        np.testing.assert_allclose(bar["high"] - bar["mean"], rows.recovery.std() * 100)
        np.testing.assert_allclose(bar["mean"] - bar["low"], rows.recovery.std() * 100)


def test_experiments_labels_kept_reads_its_own_table(app_env, fixture_tables):
    at = make_app().run()
    at.multiselect(key="exp_metrics").set_value(["r2_test", "recovery", "precision"])
    at.toggle(key="exp_labels_kept").set_value(True).run()
    _no_failure(at)
    shown = at.table[0].value
    # R² does not change with the labels, so it is not offered; the labelled count comes first
    assert list(shown.columns) == ["Repeats", "Labelled candidates (n)", "Recovery (%)", "Precision (%)"]
    kept = fixture_tables["screening_labels_kept"]
    kept = kept[kept.gap_window == "gt6"]
    groups = kept.groupby(["experiment", "model", "training_set", "gap_window"])
    assert len(shown) == groups.ngroups
    for key, rows in groups:
        row = shown.loc[key]
        assert row["Recovery (%)"] == _pm(rows.recovery.mean(), rows.recovery.std(), 1, 100)
        assert row["Labelled candidates (n)"] == _pm(rows.n_labelled.mean(), rows.n_labelled.std(), 0)
    # the model's own Table 1 differs: keeping the labels raised the AL sets' recovery in the fixture
    at.toggle(key="exp_labels_kept").set_value(False).run()
    own = at.table[0].value
    al = ("Exp2", "roost", "AL", "gt6")
    assert own.loc[al, "Recovery (%)"] != shown.loc[al, "Recovery (%)"]
    # the pairs are computed from the same table
    at.toggle(key="exp_labels_kept").set_value(True).run()
    paired = at.table[1].value
    rows = kept[(kept.experiment == "Exp2") & (kept.model == "roost")].set_index(["training_set", "repeat"])
    diff = 100 * (rows.loc["AL", "recovery"] - rows.loc["random", "recovery"])
    assert paired.loc[("AL − random", "Exp2", "roost", "gt6"), "Recovery (points)"] == (
        f"{diff.mean():+.1f} ± {diff.std():.1f}"
    )


def test_experiments_shows_the_check_and_the_element_domain(app_env, fixture_tables):
    at = make_app().run()
    _no_failure(at)
    titles = [h.value for h in at.subheader]
    assert titles.index("After a check of the near-misses") < titles.index(
        "Within each screener's element domain"
    )
    check, domain = at.table[2].value, at.table[3].value
    rows = fixture_tables["screening_domain"]
    rows = rows[(rows.gap_window == "gt6") & (rows.experiment == "Exp3") & (rows.model == "roost")]
    al = rows[(rows.training_set == "AL") & (rows.min_rows == 20)]
    cell = domain.loc[("Exp3", "roost", "AL", "gt6", "20")]
    assert cell["Precision, labels kept (%)"] == _pm(
        al.kept_precision.mean(), al.kept_precision.std(), 1, 100
    )
    assert cell["Calls left out (n)"] == _pm(al.n_dropped.mean(), al.n_dropped.std(), 0)
    assert set(check.index.get_level_values("Margin (eV)")) == {"0.25", "0.5"}
    assert (
        len(domain)
        == fixture_tables["screening_domain"]
        .query("gap_window == 'gt6'")
        .groupby(["experiment", "model", "training_set", "min_rows"])
        .ngroups
    )


def test_experiments_selection_narrows_table(app_env, fixture_tables):
    at = make_app().run()
    at.multiselect(key="exp_experiments").set_value(["Exp2", "Exp3"])
    at.multiselect(key="exp_models").set_value(["roost"])
    at.multiselect(key="exp_metrics").set_value(["recovery"])
    at.multiselect(key="exp_charts").set_value(["recovery", "precision", "f1"])
    at.run()
    _no_failure(at)
    shown = at.table[0].value
    assert set(shown.index.get_level_values("Experiment")) == {"Exp2", "Exp3"}
    assert set(shown.index.get_level_values("Model")) == {"roost"}
    assert list(shown.columns) == ["Repeats", "Recovery (%)"]
    assert [_vega(at, i)[0]["title"] for i in range(3)] == ["Recovery (%)", "Precision (%)", "F1 (%)"]
    assert not at.get("plotly_chart")  # the first page keeps plotly's 4.7 MB of browser code out


# ---------------------------------------------------------------------------------------------
def _expected_rounds(al: pd.DataFrame, campaign: str, repeat: int) -> pd.DataFrame:
    rows = al[(al.campaign == campaign) & (al.repeat == repeat)]
    per = rows.groupby("round").agg(
        n_suggested=("idx", "size"),
        n_valid=("valid", lambda v: int((v == True).sum())),  # noqa: E712 (None is not valid)
        max_gap=("label", "max"),
    )
    per["valid_rate"] = per.n_valid / per.n_suggested
    per["best_so_far"] = per.max_gap.cummax()
    return per


def _expected_sweep(al: pd.DataFrame, threshold: float) -> pd.Series:
    """Total new formulas above threshold per kappa over all rounds, mean over repeats."""
    rows = al[(al.experiment == "kappa") & (al["round"] >= 1)]
    hits = rows[(rows.label > threshold) & (rows.fate == "registered")]
    per_repeat = (
        hits.groupby(["kappa", "campaign", "repeat", "round"])
        .formula.nunique()
        .groupby(["kappa", "repeat"])
        .sum()
    )
    repeats = rows.groupby("kappa").repeat.nunique()
    return (per_repeat.groupby("kappa").sum() / repeats).reindex(repeats.index, fill_value=0)


def test_campaigns_rounds_sweep_and_valid_rate(app_env, fixture_tables):
    al = fixture_tables["al_samples"]
    at = make_app().run()
    at.switch_page("views/campaigns.py").run()
    _no_failure(at)
    assert at.selectbox(key="camp_experiment").value == "Exp2"
    assert at.selectbox(key="camp_campaign").value == "Exp2-bo"
    at.selectbox(key="camp_repeat").set_value(1).run()
    _no_failure(at)

    shown = at.dataframe[0].value.set_index("round")
    expected = _expected_rounds(al, "Exp2-bo", 1)
    assert list(shown.index) == list(expected.index) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(shown.n_suggested, expected.n_suggested)
    np.testing.assert_array_equal(shown.n_valid, expected.n_valid)
    np.testing.assert_allclose(shown.valid_rate, expected.valid_rate)
    np.testing.assert_allclose(shown.best_so_far, expected.best_so_far)
    # Fig. 5a: the scatter holds every labelled sample of the repeat, the line is best so far
    spec, points = _vega(at, 0)
    labelled = al[(al.campaign == "Exp2-bo") & (al.repeat == 1) & al.label.notna()]
    sampled, best = points[points.series == "sampled formulas"], points[points.series == "best so far"]
    assert len(sampled) == len(labelled)
    assert sorted(sampled.formula) == sorted(labelled.formula)
    np.testing.assert_allclose(np.sort(sampled.band_gap), np.sort(labelled.label))
    np.testing.assert_allclose(best.band_gap, expected.best_so_far)
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["circle", "line"]
    # only the open tab is computed and drawn
    assert [t.label for t in at.tabs] == [
        "Rounds (Fig. 5a)",
        "Valid decodes",
        "Kappa sweep (Fig. 5b)",
        "Chemical spread",
        "MLflow runs",
    ]
    assert len(at.get("vega_lite_chart")) == 1 and len(at.dataframe) == 1 and not at.table

    # the valid-decode chart draws the same numbers as its table
    at.session_state["camp_tab"] = "Valid decodes"
    at.run()
    _no_failure(at)
    assert len(at.get("vega_lite_chart")) == 1 and not at.dataframe
    _, rate_points = _vega(at, 0)
    per_campaign = rate_points.groupby("campaign").valid_rate.mean()
    assert set(per_campaign.index) == set(al.loc[al["round"] >= 1, "campaign"])
    assert not at.get("plotly_chart")  # Vega-Lite only: no 4.7 MB plotly bundle for the browser to load

    # valid rate per campaign over the suggestion rounds (an experiment's bo and random campaigns apart)
    rates = at.table[0].value
    suggested = al[al["round"] >= 1]
    assert {"Exp2-bo", "Exp2-random"} <= set(rates.index)
    for campaign, rows in suggested.groupby("campaign"):
        assert rates.loc[campaign, "suggestions"] == len(rows)
        assert rates.loc[campaign, "valid formulas"] == int((rows.valid == True).sum())  # noqa: E712
        assert rates.loc[campaign, "valid rate"] == f"{(rows.valid == True).mean():.1%}"  # noqa: E712

    # the kappa sweep table, at the default 6 eV and at a selected threshold
    at.session_state["camp_tab"] = "Kappa sweep (Fig. 5b)"
    at.run()
    _no_failure(at)
    assert at.selectbox(key="sweep_experiment").value == "kappa"
    for threshold in (6.0, 3.0):
        at.number_input(key="sweep_threshold").set_value(threshold).run()
        _no_failure(at)
        table = at.dataframe[0].value
        expected_total = _expected_sweep(al, threshold)
        _, sweep_points = _vega(at, 0)
        last = sweep_points.sort_values("round").groupby("kappa").cum_high.last()
        np.testing.assert_allclose(
            last.rename(index=float).reindex(expected_total.index).to_numpy(), expected_total.to_numpy()
        )
        assert [float(k) for k in table.index] == list(expected_total.index)
        np.testing.assert_allclose(table["total"].to_numpy(), expected_total.round(2).to_numpy(), atol=0.011)
    at.session_state["camp_tab"] = "MLflow runs"
    at.run()
    _no_failure(at)
    assert "No runs tagged" in " ".join(i.value for i in at.info) or "No MLflow store" in " ".join(
        i.value for i in at.info
    )


def test_campaigns_chemical_spread_equals_the_catalog(app_env, fixture_tables):
    from agd.chem.systems import chemical_system

    al = fixture_tables["al_samples"]
    finds = al[(al["round"] > 0) & (al["fate"] == "registered")]
    assert finds["formula"].map(chemical_system).map(len).gt(0).all()
    at = make_app().run()
    at.switch_page("views/campaigns.py").run()
    at.session_state["camp_tab"] = "Chemical spread"
    at.run()
    _no_failure(at)
    at.number_input(key="spread_threshold").set_value(3.0).run()
    _no_failure(at)
    shown = at.dataframe[0].value.set_index("campaign")
    assert set(shown.index) == set(finds["campaign"])
    columns = ["finds", "systems", "high_gap", "high_gap_systems", "most_in_one_system"]
    for campaign, rows in finds.groupby("campaign"):
        per_repeat = []
        for _, one in rows.groupby("repeat"):
            systems = one["formula"].map(chemical_system)
            high = one.loc[one["label"] > 3.0, "formula"].map(chemical_system)
            per_repeat.append(
                [len(one), systems.nunique(), len(high), high.nunique(), systems.value_counts().max()]
            )
        np.testing.assert_allclose(shown.loc[campaign, columns].to_numpy(float), np.mean(per_repeat, axis=0))
        assert shown.loc[campaign, "repeats"] == rows["repeat"].nunique()
    assert (shown["high_gap"] > 0).any()  # the threshold leaves something to count
    # no experiment chosen: a message, not an empty table
    at.multiselect(key="spread_experiments").set_value([]).run()
    _no_failure(at)
    assert not at.dataframe and "No registered finds" in at.info[0].value


def test_campaigns_link_mlflow_runs(app_env, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(
        "agd-experiments", artifact_location=(tmp_path / "mlruns").as_uri()
    )
    tagged = {}
    for repeat in (0, 1):
        run = client.create_run(
            experiment_id,
            run_name=f"Exp2-r{repeat}",
            tags={"experiment": "Exp2", "repeat": str(repeat), "kappa": "2"},
        )
        client.set_terminated(run.info.run_id)
        tagged[str(repeat)] = run.info.run_id
    client.create_run(experiment_id, run_name="untagged")  # no experiment tag: not listed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("AGD_MLFLOW_UI", "http://127.0.0.1:5055")

    at = make_app().run()
    at.switch_page("views/campaigns.py").run()
    at.session_state["camp_tab"] = "MLflow runs"
    at.run()
    _no_failure(at)
    runs = at.dataframe[-1].value
    assert sorted(runs["run_name"]) == ["Exp2-r0", "Exp2-r1"]
    for _, row in runs.iterrows():
        assert (
            row["link"] == f"http://127.0.0.1:5055/#/experiments/{experiment_id}/runs/{tagged[row['repeat']]}"
        )


# ---------------------------------------------------------------------------------------------
def test_design_space_counts_and_embedding(app_env, fixture_tables, monkeypatch):
    al = fixture_tables["al_samples"]
    from agd.tracking import design_map

    # the first view must be the map the catalog stage embedded: computing one now would fail
    def no_live_embedding(*args, **kwargs):
        raise AssertionError("the default view embedded live instead of reading the catalog's design_map")

    live_embedding = design_map.embed_tsne
    monkeypatch.setattr(design_map, "embed_tsne", no_live_embedding)
    at = make_app().run()
    at.switch_page("views/design_space.py").run()
    _no_failure(at)
    chosen = at.multiselect(key="ds_experiments").value
    assert "kappa" not in chosen and "Exp2" in chosen
    labelled = al[al.experiment.isin(chosen) & al.label.notna()]
    n_training = min(500, int((labelled["round"] == 0).sum()))
    n_active = min(500, int((labelled["round"] > 0).sum()))
    text = " ".join(m.value for m in at.markdown)
    assert f"**{n_training}** training samples (round 0) and **{n_active}** active-learning samples" in text
    summary = at.dataframe[0].value
    assert summary.loc["training (round 0)", "count"] == n_training
    assert summary.loc["active learning", "count"] == n_active
    spec, shown = _vega(at, 0)
    assert len(shown) == n_training + n_active
    assert shown["sample"].value_counts().to_dict() == {
        "training (round 0)": n_training,
        "active learning": n_active,
    }
    assert spec["facet"]["column"]["field"] == "sample"
    # colour is the band gap of each point: the colour values are labels of the fixture
    assert spec["spec"]["encoding"]["color"]["field"] == "band_gap"
    assert set(np.round(shown.band_gap, 3)) <= set(np.round(labelled.label, 3))
    with CatalogReader(app_env) as reader:
        stored = reader.query("SELECT tsne_1 FROM design_map")
    assert np.allclose(np.sort(shown.tsne_1), np.sort(stored["tsne_1"].to_numpy()))
    assert not at.get("plotly_chart")

    # other settings are embedded live; the cap applies per group
    monkeypatch.setattr(design_map, "embed_tsne", live_embedding)
    at.select_slider(key="ds_points").set_value(200).run()
    _no_failure(at)
    assert "**100** training samples (round 0) and **100** active-learning samples" in " ".join(
        m.value for m in at.markdown
    )


# ---------------------------------------------------------------------------------------------
def _expected_hits(tables, windows=None, validity="any", elements=(), text=""):
    hits = tables["screening"]
    valid = tables["candidates"].groupby("formula").valid.any()
    hits = hits.assign(valid=hits.formula.map(valid))
    if windows is not None:
        hits = hits[hits.gap_window.isin(windows)]
    if validity == "valid":
        hits = hits[hits.valid == True]  # noqa: E712
    for symbol in elements:
        hits = hits[hits.formula.str.contains(rf"{symbol}(?![a-z])", regex=True)]
    if text:
        hits = hits[hits.formula.str.lower().str.contains(text.lower(), regex=False)]
    return hits


def test_candidates_filters_sort_and_detail(app_env, fixture_tables):
    at = make_app().run()
    at.switch_page("views/candidates.py").run()
    _no_failure(at)
    hits = fixture_tables["screening"]
    assert f"**{len(hits):,}** matching rows" in at.markdown[0].value
    shown = at.dataframe[0].value
    assert len(shown) == len(hits)
    # default sort: predicted gap, highest first
    np.testing.assert_allclose(shown.predicted_gap, np.sort(hits.predicted_gap.to_numpy())[::-1])

    at.multiselect(key="cand_windows").set_value(["gt6"])
    at.selectbox(key="cand_validity").set_value("valid")
    at.text_input(key="cand_elements").set_value("o")  # lower case is accepted
    at.run()
    _no_failure(at)
    expected = _expected_hits(fixture_tables, windows=["gt6"], validity="valid", elements=["O"])
    assert 0 < len(expected) < len(hits)
    shown = at.dataframe[0].value
    assert f"**{len(expected):,}** matching rows" in at.markdown[0].value
    assert sorted(shown.formula) == sorted(expected.formula)
    assert shown.valid.all() and (shown.gap_window == "gt6").all()

    at.text_input(key="cand_elements").set_value("Xx").run()
    assert any("'Xx' is not an element symbol" in w.value for w in at.warning)

    # formation-energy filter keeps only hits with a relaxed structure at or below it
    at.text_input(key="cand_elements").set_value("")
    at.multiselect(key="cand_windows").set_value(["gt6", "2-4"])
    at.selectbox(key="cand_validity").set_value("any")
    at.number_input(key="cand_fe_max").set_value(-2.5).run()
    _no_failure(at)
    structures = fixture_tables["structures"]
    low = set(structures[structures.formation_energy_per_atom <= -2.5].formula)
    shown = at.dataframe[0].value
    assert set(shown.formula) == low and len(shown) == hits.formula.isin(low).sum()

    # the detail panel of MgO: lattice from its CIF, template, DFT gap
    at.number_input(key="cand_fe_max").set_value(None)
    at.text_input(key="cand_formula").set_value("MgO").run()
    _no_failure(at)
    assert at.selectbox(key="cand_detail").value == "MgO"
    text = " ".join(m.value for m in at.markdown)
    assert "Template **CaO** (`mp-2000`)" in text
    lattice = at.table[0].value["lattice"].tolist()
    assert lattice[0] == "a=4.210 Å, b=4.210 Å, c=4.210 Å"
    assert "Fm-3m (225)" in lattice[2] and "8 sites" in lattice[2]
    sites = at.dataframe[1].value
    assert sorted(sites.species) == ["Mg"] * 4 + ["O"] * 4
    dft = at.dataframe[2].value
    assert dft.band_gap.tolist() == [4.45]


def test_candidates_generated_source(app_env, fixture_tables):
    at = make_app().run()
    at.switch_page("views/candidates.py").run()
    at.radio(key="cand_source").set_value("generated").run()
    _no_failure(at)
    candidates = fixture_tables["candidates"]
    assert f"**{len(candidates):,}** matching rows" in at.markdown[0].value
    at.selectbox(key="cand_validity").set_value("invalid")
    at.text_input(key="cand_formula").set_value("mg").run()
    _no_failure(at)
    expected = candidates[(candidates.valid != True) & candidates.formula.str.contains("Mg")]  # noqa: E712
    assert f"**{len(expected):,}** matching rows" in at.markdown[0].value
    assert at.get("download_button")


# ---------------------------------------------------------------------------------------------
def _tiny_dvc_repo(folder: Path) -> Path:
    folder.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=folder, check=True)
    (folder / "input.txt").write_text("1\n")
    (folder / "dvc.yaml").write_text(
        "stages:\n  double:\n    cmd: cp input.txt output.txt\n    deps: [input.txt]\n    outs: [output.txt]\n"
    )
    return folder / "dvc.yaml"


def test_run_status_counts_and_dvc(app_env, fixture_tables, tmp_path, monkeypatch):
    monkeypatch.setenv("AGD_DVC_FILE", str(_tiny_dvc_repo(tmp_path / "repo")))
    at = make_app().run()
    at.switch_page("views/run_status.py").run()
    assert not at.exception
    counts = at.table[0].value
    shown = counts["rows"].to_dict()
    assert shown.pop("design_map") > 0  # embedded by the catalog build, not a fixture table
    assert shown == {name: len(frame) for name, frame in fixture_tables.items()}
    stages = at.dataframe[0].value
    assert stages["stage"].tolist() == ["double"]
    assert stages["state"].tolist() == ["changed"]  # never run: its output is missing
    assert "1 of 1 stages need" in at.warning[0].value


def test_run_status_reports_dvc_failure(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AGD_DVC_FILE", str(tmp_path / "missing" / "dvc.yaml"))
    at = make_app().run()
    at.switch_page("views/run_status.py").run()
    assert not at.exception
    assert any("DVC status unavailable: No DVC pipeline file" in w.value for w in at.warning)


# ---------------------------------------------------------------------------------------------
def _assert_setup_page(at, reason: str) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "No catalog data yet"
    message = at.error[0].value
    assert reason in message
    assert "dvc repro pipelines/dvc.yaml" in message and "agd catalog" in message


def test_missing_catalog_page(monkeypatch, tmp_path):
    monkeypatch.setenv("AGD_CATALOG", str(tmp_path / "absent.duckdb"))
    at = make_app().run()
    _assert_setup_page(at, f"No catalog at {tmp_path / 'absent.duckdb'}")
    # the data pages are not offered, the run status still is
    at.switch_page("views/run_status.py").run()
    assert not at.exception and at.title[0].value == "Run status"
    with pytest.raises(ValueError):
        at.switch_page("views/experiments.py")


def test_empty_and_unreadable_catalog_pages(monkeypatch, tmp_path):
    empty = tmp_path / "empty.parquet"
    columns = [c.name for c in TABLES["datasets"] if c.name not in ("source_file", "loaded_at")]
    pd.DataFrame({name: pd.Series(dtype="object") for name in columns}).to_parquet(empty)
    build_catalog(tmp_path / "empty.duckdb", empty, "none")
    monkeypatch.setenv("AGD_CATALOG", str(tmp_path / "empty.duckdb"))
    _assert_setup_page(make_app().run(), "every table is empty")

    (tmp_path / "broken.duckdb").write_text("not a database")
    monkeypatch.setenv("AGD_CATALOG", str(tmp_path / "broken.duckdb"))
    at = make_app().run()
    assert not at.exception
    assert at.title[0].value == "No catalog data yet"
    assert "cannot be read" in at.error[0].value and "agd catalog" in at.error[0].value


def test_catalog_of_an_older_schema(monkeypatch, tmp_path):
    import duckdb

    from agd.tracking.catalog import SCHEMA_SQL

    with duckdb.connect(str(tmp_path / "old.duckdb")) as con:
        con.execute(SCHEMA_SQL)
        con.execute("ALTER TABLE al_samples DROP COLUMN kappa")
    monkeypatch.setenv("AGD_CATALOG", str(tmp_path / "old.duckdb"))
    at = make_app().run()
    assert not at.exception
    assert at.title[0].value == "No catalog data yet"
    assert "older schema (al_samples: lacks kappa)" in at.error[0].value
    assert "agd catalog" in at.error[0].value


def test_empty_table_names_its_command(monkeypatch, tmp_path, fixture_tables):
    """A catalog with data but no screening yet: each page says which command fills its table."""
    path = tmp_path / "datasets.parquet"
    fixture_tables["datasets"].to_parquet(path)
    build_catalog(tmp_path / "partial.duckdb", path, "synthetic")
    monkeypatch.setenv("AGD_CATALOG", str(tmp_path / "partial.duckdb"))
    at = make_app().run()
    assert not at.exception
    assert re.search(r"`screening_metrics` table is empty\. It is produced by `agd screen`", at.info[0].value)
    for page, command in (
        ("campaigns", "agd experiments"),
        ("design_space", "agd experiments"),
        ("candidates", "agd screen"),
    ):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception
        assert command in " ".join(i.value for i in at.info), page
