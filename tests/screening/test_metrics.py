"""Screening arithmetic on hand-made examples whose answers are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from agd.chem.formula import formula_key
from agd.config import ConfigError, GapWindowConfig, params_from_dict
from agd.screening.metrics import (
    PAPER_CANDIDATE_FILES,
    PAPER_TABLE1,
    aggregate_table1,
    counts_metrics,
    describe_window,
    paired_differences,
    paired_json,
    recovery_metrics,
    table1_json,
    table1_markdown,
    window_mask,
)
from tests.conftest import read_shared_csv

GT6 = GapWindowConfig(low=6.0, include_low=False)
MID = GapWindowConfig(low=2.0, high=4.0)


def test_recovery_from_masks():
    # model hits rows 0, 1, 3; oracle hits rows 0, 3, 4 -> both: rows 0 and 3
    model = np.array([True, True, False, True, False])
    oracle = np.array([True, False, False, True, True])
    m = recovery_metrics(model, oracle)
    assert (m["n_candidates"], m["n_oracle"], m["n_recovered"]) == (3, 3, 2)
    assert m["recovery"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)


def test_recovery_from_formula_sets():
    # 4 model hits, 2 oracle hits, 1 shared: recovery 1/2, precision 1/4, F1 = 2*(1/2*1/4)/(3/4) = 1/3
    m = recovery_metrics(["AlF3", "HoF3", "MgO", "LiF"], {"AlF3", "BN"})
    assert (m["n_candidates"], m["n_oracle"], m["n_recovered"]) == (4, 2, 1)
    assert m["recovery"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.25)
    assert m["f1"] == pytest.approx(1 / 3)


def test_recovery_edge_cases():
    # the oracle finds nothing: recovery undefined, precision and F1 zero
    m = counts_metrics(5, 0, 0)
    assert math.isnan(m["recovery"]) and m["precision"] == 0 and m["f1"] == 0
    # the model finds nothing: precision undefined, recovery and F1 zero
    m = counts_metrics(0, 4, 0)
    assert math.isnan(m["precision"]) and m["recovery"] == 0 and m["f1"] == 0
    m = counts_metrics(0, 0, 0)
    assert all(math.isnan(m[k]) for k in ("recovery", "precision", "f1"))
    assert counts_metrics(3, 3, 3)["f1"] == 1.0
    with pytest.raises(ValueError, match="inconsistent"):
        counts_metrics(2, 5, 3)
    with pytest.raises(ValueError, match="shape"):
        recovery_metrics(np.zeros(3, bool), np.zeros(4, bool))
    with pytest.raises(TypeError):
        recovery_metrics("NaCl", {"NaCl"})


def test_window_bounds_and_nan():
    gaps = np.array([np.nan, 6.0, 6.0001, 2.0, 4.0, 4.0001, 1.999, 7.5])
    assert window_mask(gaps, GT6).tolist() == [False, False, True, False, False, False, False, True]
    assert window_mask(gaps, MID).tolist() == [False, False, False, True, True, False, False, False]
    half_open = GapWindowConfig(low=2.0, high=4.0, include_low=False, include_high=False)
    assert window_mask(np.array([2.0, 3.0, 4.0]), half_open).tolist() == [False, True, False]
    assert describe_window(GT6) == "(6, inf) eV"
    assert describe_window(MID) == "[2, 4] eV"
    assert describe_window(GapWindowConfig(high=1.0)) == "(-inf, 1] eV"


def test_screening_config_is_validated():
    with pytest.raises(ConfigError, match="low"):
        params_from_dict({"screening": {"windows": {"bad": {"low": 5, "high": 2}}}})
    with pytest.raises(ConfigError, match="hit_windows"):
        params_from_dict({"screening": {"hit_windows": ["gt7"]}})
    with pytest.raises(ConfigError, match="window name"):
        params_from_dict({"screening": {"windows": {"a b": {"low": 1}}}})
    with pytest.raises(ConfigError, match="screening.windows.x"):
        params_from_dict({"screening": {"windows": {"x": {}}}})
    params = params_from_dict({"screening": {"windows": {"gt5": {"low": 5, "include_low": False}}}})
    assert list(params.screening.windows) == ["gt5"]


def _row(experiment, repeat, tset, model, window, recovery, n_cand, r2=0.5):
    return {
        "experiment": experiment, "repeat": repeat, "training_set": tset, "model": model,
        "gap_window": window, "recovery": recovery, "n_candidates": n_cand, "r2_test": r2,
    }  # fmt: skip


def test_aggregate_mean_and_sample_std():
    frame = pd.DataFrame(
        [
            _row("Exp10", 0, "BS", "roost", "gt6", 0.2, 10),
            _row("Exp2", 0, "random", "roost", "gt6", 0.3, 10),
            _row("Exp2", 0, "AL", "roost", "gt6", 0.5, 10, r2=0.4),
            _row("Exp2", 1, "AL", "roost", "gt6", 1.0, 20, r2=0.6),
            _row("Exp2", 0, "BS", "roost", "gt6", 0.1, 5),
            _row("Exp2", 0, "AL", "roost", "2-4", 0.9, 100),
            _row("Exp1", 0, "ALL", "forest", "gt6", 0.7, 7),
        ]
    )
    table = aggregate_table1(frame, windows=["gt6", "2-4"])
    order = list(zip(table["experiment"], table["training_set"], table["gap_window"], strict=True))
    # experiments naturally (Exp2 before Exp10), sets ALL/BS/AL/random, windows in the given order
    assert order == [
        ("Exp1", "ALL", "gt6"),
        ("Exp2", "BS", "gt6"),
        ("Exp2", "AL", "gt6"),
        ("Exp2", "AL", "2-4"),
        ("Exp2", "random", "gt6"),
        ("Exp10", "BS", "gt6"),
    ]
    al = table[(table.training_set == "AL") & (table.gap_window == "gt6")].iloc[0]
    # repeats 0.5 and 1.0: mean 0.75, sample std sqrt(2 * 0.25**2 / 1) = 0.353553...
    assert al["n_repeats"] == 2
    assert al["recovery_mean"] == pytest.approx(0.75)
    assert al["recovery_std"] == pytest.approx(math.sqrt(0.125))
    assert al["n_candidates_mean"] == 15 and al["n_candidates_std"] == pytest.approx(math.sqrt(50))
    assert al["r2_test_mean"] == pytest.approx(0.5)
    single = table[table.training_set == "ALL"].iloc[0]
    assert single["n_repeats"] == 1 and math.isnan(single["recovery_std"])

    nested = table1_json(table)
    assert nested["Exp2"]["AL"]["roost"]["gt6"]["recovery_mean"] == pytest.approx(0.75)
    assert nested["Exp1"]["ALL"]["forest"]["gt6"]["recovery_std"] is None

    md = table1_markdown(table, {"gt6": GT6, "2-4": MID}, {"gt6": 12, "2-4": 300})
    assert "75.0 ± 35.4%" in md  # recovery of Exp2 AL roost gt6
    assert "171 cand., 80 rec. (78.4% / 46.8%)" in md  # the paper's Exp2 AL Roost, beside ours
    assert "`gt6`: (6, inf) eV, 12 oracle hits" in md
    assert md.count("\n| Exp") == len(table)

    with pytest.raises(ValueError, match="duplicate"):
        aggregate_table1(pd.concat([frame, frame.iloc[:1]]))


def test_sets_are_compared_repeat_by_repeat():
    nan = math.nan
    rows = []
    for training_set, recovery, precision in (
        ("AL", [0.6, 0.5, 0.7], [0.4, 0.3, 0.5]),
        ("random", [0.4, 0.5, 0.5], [0.2, nan, 0.1]),  # repeat 1: no hits, so no precision
        ("BS", [0.3, 0.2, 0.4], [0.1, 0.1, 0.1]),
    ):
        for repeat in range(3):
            rows.append(("Exp2", repeat, training_set, recovery[repeat], precision[repeat]))
    rows += [("Exp3", 0, "AL", 0.5, 0.5), ("Exp3", 0, "BS", 0.1, 0.2), ("Exp1", 0, "ALL", 0.8, 0.7)]
    frame = pd.DataFrame(rows, columns=["experiment", "repeat", "training_set", "recovery", "precision"])
    frame = frame.assign(model="roost", gap_window="gt6")

    paired = paired_differences(frame)
    assert [tuple(r) for r in paired[["pair", "experiment"]].itertuples(index=False)] == [
        ("AL-random", "Exp2"),
        ("AL-BS", "Exp2"),
        ("AL-BS", "Exp3"),  # Exp3 has no random set here, Exp1 no pair at all
    ]
    exp2 = paired.iloc[0]
    # recovery: +0.2, 0, +0.2 -> mean 2/15, sample std sqrt(((1/15)^2 * 2 + (2/15)^2) / 2)
    assert exp2["n_repeats"] == 3 and exp2["recovery_ahead"] == 2 and exp2["recovery_n"] == 3
    assert exp2["recovery_diff_mean"] == pytest.approx(2 / 15)
    assert exp2["recovery_diff_std"] == pytest.approx(math.sqrt(((1 / 15) ** 2 * 2 + (2 / 15) ** 2) / 2))
    # precision: +0.2, undefined, +0.4 -> the two defined repeats
    assert exp2["precision_diff_mean"] == pytest.approx(0.3) and exp2["precision_n"] == 2
    single = paired.iloc[2]
    assert single["n_repeats"] == 1 and math.isnan(single["recovery_diff_std"])

    nested = paired_json(paired)
    assert nested["AL-random"]["Exp2"]["roost"]["gt6"]["precision_ahead"] == 2
    assert nested["AL-BS"]["Exp3"]["roost"]["gt6"]["recovery_diff_std"] is None

    table = aggregate_table1(frame)
    md = table1_markdown(table, paired=paired)
    assert "| AL − random | Exp2 | roost | gt6 | 3 | +13.3 ± 11.5 | 2 of 3 | +30.0 ± 14.1 | 2 of 2 |" in md
    assert "| AL − BS | Exp3 | roost | gt6 | 1 | +40.0 | 1 of 1 | +30.0 | 1 of 1 |" in md
    assert "Paired by repeat" not in table1_markdown(table)


def test_paper_figures_match_the_papers_candidate_lists(shared_data):
    folder = shared_data / "agd_paper"
    lists = {
        key: {formula_key(f) for f in read_shared_csv(folder / name)["composition"]}
        for key, name in PAPER_CANDIDATE_FILES.items()
    }
    reference = lists[("Exp1", "ALL")]
    for key, figures in PAPER_TABLE1.items():
        found = recovery_metrics(lists[key], reference)
        assert found["n_candidates"] == figures["n_candidates"], key
        assert found["n_recovered"] == figures["n_recovered"], key
        assert found["recovery"] == pytest.approx(figures["recovery"]), key
        assert found["precision"] == pytest.approx(figures["precision"]), key
    assert PAPER_TABLE1[("Exp2", "AL")]["recovery"] == pytest.approx(0.7843, abs=1e-4)  # the paper's 78.43%
    assert PAPER_TABLE1[("Exp3", "AL")]["recovery"] == pytest.approx(0.5784, abs=1e-4)  # the paper's 57.84%


def test_labels_kept_table_averages_repeats_and_counts_the_repeats_it_helps():
    from agd.screening.metrics import aggregate_labels_kept, labels_kept_frame, labels_kept_markdown

    keys = {"experiment": "Exp2", "training_set": "AL", "model": "roost", "gap_window": "gt6"}
    scores = pd.DataFrame(
        [
            keys | {"repeat": 0, "n_labelled": 10, "n_labelled_hits": 4, "n_labelled_truth": 4,
                    "model_recovery": 0.5, "model_precision": 0.5, "labelled_n_candidates": 10,
                    "labelled_n_oracle": 20, "labelled_n_recovered": 12, "labelled_recovery": 0.6,
                    "labelled_precision": 0.6, "labelled_f1": 0.4},
            keys | {"repeat": 1, "n_labelled": 20, "n_labelled_hits": 2, "n_labelled_truth": 2,
                    "model_recovery": 0.4, "model_precision": 0.8, "labelled_n_candidates": 8,
                    "labelled_n_oracle": 20, "labelled_n_recovered": 8, "labelled_recovery": 0.4,
                    "labelled_precision": 1.0, "labelled_f1": 0.3},
        ]
    )  # fmt: skip
    frame = labels_kept_frame(scores)
    assert frame["recovery_gain"].round(12).tolist() == [0.1, 0.0]
    table = aggregate_labels_kept(frame)
    (row,) = table.to_dict("records")
    assert row["n_repeats"] == 2 and row["recovery_mean"] == pytest.approx(0.5)
    assert row["n_labelled_mean"] == 15 and row["recovery_gain_mean"] == pytest.approx(0.05)
    # a gain of zero is not ahead; precision rose in both repeats
    assert (row["recovery_gain_ahead"], row["recovery_gain_n"]) == (1, 2)
    assert (row["precision_gain_ahead"], row["precision_gain_n"]) == (2, 2)
    (line,) = [x for x in labels_kept_markdown(table) if x.startswith("| Exp2 |")]
    assert line == (
        "| Exp2 | AL | roost | gt6 | 2 | 15.0 ± 7.1 | 3.0 ± 1.4 | 9.0 ± 1.4 | 10.0 ± 2.8 | 50.0 ± 14.1% | +5.0 ± 7.1 "
        "| 1 of 2 | 80.0 ± 28.3% | +15.0 ± 7.1 | 2 of 2 |"
    )
    assert labels_kept_markdown(table.iloc[:0]) == []


def test_the_element_domain_drops_calls_on_elements_the_set_seldom_holds() -> None:
    from agd.screening.metrics import aggregate_domain, domain_json, domain_markdown, domain_scores

    windows = {"gt6": GapWindowConfig(low=6.0, high=None, include_low=False, include_high=True)}
    oracle = pd.Series({"NaF": 7.0, "InF3": 1.0, "LiCl": 6.5, "KCl": 6.2, "CsF": 8.0})  # 4 oracle hits
    # elements in the AL set's formulas: F 3, Na 2, Li 1, K 1, Cl 1 (In, Cs: none)
    sets = pd.DataFrame(
        {"experiment": "Exp3", "repeat": 0, "training_set": "AL",
         "reduced_formula": ["NaF", "LiF", "KF", "NaCl"], "band_gap": [7.0, 6.0, 6.1, 5.0]}
    )  # fmt: skip
    hits = pd.DataFrame(
        {"experiment": "Exp3", "repeat": 0, "training_set": "AL", "model": "roost", "gap_window": "gt6",
         "reduced_formula": ["NaF", "InF3", "LiCl", "KCl"]}
    )  # fmt: skip
    metrics = pd.DataFrame(
        {"experiment": "Exp3", "repeat": 0, "training_set": ["AL"], "model": "roost", "gap_window": "gt6",
         "n_candidates": [4], "n_recovered": [3], "n_oracle": [4]}
    )  # fmt: skip
    domain = domain_scores(metrics, hits, sets, oracle, windows, [2, 1]).set_index("min_rows")
    one, two = domain.loc[1], domain.loc[2]
    # k = 1 drops InF3 (no In in the set): three calls, all oracle hits
    assert (one.n_dropped, one.n_candidates, one.n_recovered) == (1, 3, 3)
    assert (one.recovery, one.precision) == (0.75, 1.0)
    # k = 2 keeps NaF alone (Li, K and Cl occur once); the set's own label of NaF lists it either way
    assert (two.n_dropped, two.n_candidates, two.n_recovered) == (3, 1, 1)
    assert (two.kept_n_candidates, two.kept_n_recovered) == (1, 1)
    assert (one.kept_n_candidates, one.kept_n_recovered, one.kept_precision) == (3, 3, 1.0)
    table = aggregate_domain(domain.reset_index())
    assert list(table["min_rows"]) == [1, 2] and (table["n_repeats"] == 1).all()
    assert domain_json(table)["Exp3"]["AL"]["roost"]["gt6"]["2"]["n_dropped_mean"] == 3
    assert (
        "| Exp3 | AL | roost | gt6 | 2 | 1 | 3 | 1 | 25.0% | 100.0% | 1 | 25.0% | 100.0% |"
        in domain_markdown(table)
    )
    assert domain_scores(metrics, hits, sets, oracle, windows, []).empty
