"""The dashboard's data layer on the fixture catalog: parameterised filters, element search, CSV, DVC status."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from dashboard import data


def test_filters_are_bound_parameters_not_sql(fixture_catalog, fixture_tables):
    hostile = "'; DROP TABLE screening; --"
    rows, total = data.search_candidates(fixture_catalog, data.CandidateQuery(formula_text=hostile))
    assert total == 0 and rows.empty
    rows, total = data.search_candidates(
        fixture_catalog, data.CandidateQuery(experiments=(hostile,), models=("roost' OR '1'='1",))
    )
    assert total == 0
    # LIKE wildcards typed by a user are literal characters
    assert data.search_candidates(fixture_catalog, data.CandidateQuery(formula_text="%"))[1] == 0
    assert data.search_candidates(fixture_catalog, data.CandidateQuery(formula_text="_"))[1] == 0
    assert data.catalog_status(fixture_catalog).counts["screening"] == len(fixture_tables["screening"])


def test_element_search_matches_whole_symbols(fixture_catalog, fixture_tables):
    candidates = fixture_tables["candidates"]
    for symbol in ("N", "Na", "S", "Sr", "B", "Br"):
        _, total = data.search_candidates(
            fixture_catalog, data.CandidateQuery(source="generated", elements=(symbol,), limit=1)
        )
        expected = candidates.formula.str.contains(rf"{symbol}(?![a-z])", regex=True).sum()
        assert total == expected, symbol
    both = data.search_candidates(
        fixture_catalog, data.CandidateQuery(source="generated", elements=("Mg", "O"), limit=10_000)
    )[0]
    assert len(both) and all("Mg" in f and ("O" in f) for f in both.formula)


def test_parse_elements_and_sort_whitelist():
    assert data.parse_elements(" ga, O;mg ") == ("Ga", "O", "Mg")
    assert data.parse_elements("") == ()
    with pytest.raises(ValueError, match="'Qq' is not an element symbol"):
        data.parse_elements("O Qq")
    with pytest.raises(ValueError, match="cannot sort by"):
        data.search_candidates(Path("unused"), data.CandidateQuery(sort_by="formula; DROP TABLE x"))


def test_csv_download_holds_every_matching_row(fixture_catalog, fixture_tables):
    query = data.CandidateQuery(windows=("gt6",), sort_by="predicted_gap", descending=True, limit=5)
    text = data.candidates_csv(fixture_catalog, query).decode()
    frame = pd.read_csv(io.StringIO(text), keep_default_na=False)
    hits = fixture_tables["screening"]
    assert len(frame) == (hits.gap_window == "gt6").sum()
    assert list(frame.columns) == data.HIT_COLUMNS
    assert frame.predicted_gap.is_monotonic_decreasing


def test_table1_std_is_over_repeats(fixture_catalog, fixture_tables):
    table = data.table1(fixture_catalog, experiments=("Exp4",), models=("forest",), windows=("2-4",))
    metrics = fixture_tables["screening_metrics"]
    rows = metrics[
        (metrics.experiment == "Exp4") & (metrics.model == "forest") & (metrics.gap_window == "2-4")
    ]
    assert table.training_set.tolist() == ["BS", "AL", "random"]
    expected = rows.groupby("training_set").recovery.agg(["mean", "std"]).loc[["BS", "AL", "random"]]
    assert table.recovery_mean.round(12).tolist() == expected["mean"].round(12).tolist()
    assert table.recovery_std.round(12).tolist() == expected["std"].round(12).tolist()
    assert data.format_pm(0.5, float("nan"), "percent") == "50.0"
    assert data.format_pm(None, None, "ratio") == "–"


def test_dvc_status_messages(tmp_path):
    assert "No DVC pipeline file" in data.dvc_status(tmp_path / "dvc.yaml").error
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert "not inside a DVC repository" in data.dvc_status(tmp_path / "dvc.yaml").error


def test_structure_summary_rejects_bad_cif(fixture_tables):
    info, sites = data.structure_summary(fixture_tables["structures"].cif[0])
    assert info["formula"] == "MgO" and len(sites) == 8
    with pytest.raises(ValueError, match="unreadable CIF"):
        data.structure_summary("data_broken\n_cell_length_a nonsense\n")


def test_verify_views_aggregate_each_level_over_repeats(fixture_catalog, fixture_tables):
    for table, level in (("screening_check", "margin"), ("screening_domain", "min_rows")):
        frame = data.verify_table(fixture_catalog, table, experiments=("Exp2",), models=("roost",))
        rows = fixture_tables[table]
        rows = rows[(rows.experiment == "Exp2") & (rows.model == "roost")]
        groups = rows.groupby(["training_set", "gap_window", level])
        assert len(frame) == groups.ngroups and set(frame[level]) == set(rows[level])
        expected = groups.recovery.agg(["mean", "std"])
        got = frame.set_index(["training_set", "gap_window", level])
        assert (
            got.loc[expected.index, "recovery_mean"].round(12).tolist() == expected["mean"].round(12).tolist()
        )
        assert (
            got.loc[expected.index, "recovery_std"].round(12).tolist() == expected["std"].round(12).tolist()
        )
        shown = data.verify_display(frame, table)
        label = data.VERIFY_VIEWS[table][1]
        assert shown.index.names[-1] == label and len(shown) == len(frame)
        first = frame.iloc[0]
        assert shown.iloc[0]["Recovery (%)"] == data.format_pm(
            first.recovery_mean, first.recovery_std, "percent"
        )
