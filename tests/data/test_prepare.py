import numpy as np
import pandas as pd
import pytest

from agd.config import FilterConfig, PrepareConfig
from agd.data.prepare import prepare_dataset, write_prepared
from tests.conftest import read_shared_csv


def _raw(formulas, gaps, energies=None):
    raw = pd.DataFrame({"row": np.arange(1, len(formulas) + 1), "formula": formulas, "band_gap": gaps})
    if energies is not None:
        raw["formation_energy_per_atom"] = energies
    return raw


def test_bad_rows_are_rejected_with_row_and_reason_and_good_rows_kept():
    raw = _raw(
        ["", "Xx2O", "NaCl", "KCl", "Fe0.333O", "GaN", "ZnO", "Zn2O2", None, "MgO", "NaCl"],
        [1.0, 1.0, -1.0, np.nan, 1.0, 1.9, 1.0, 3.0, 2.0, "not a number", 5.0],
    )
    out = prepare_dataset(raw, PrepareConfig())
    rejects = out.rejects.set_index("row")
    assert rejects.loc[1, "code"] == "empty"
    assert rejects.loc[2, "code"] == "unknown_element" and "Xx" in rejects.loc[2, "reason"]
    assert rejects.loc[3, "code"] == "negative_gap"
    assert rejects.loc[4, "code"] == "bad_gap"
    assert rejects.loc[5, "code"] == "fractional"
    assert rejects.loc[9, "code"] == "empty" and rejects.loc[9, "reason"] == "missing formula"
    assert rejects.loc[10, "code"] == "bad_gap" and "not a number" in rejects.loc[10, "reason"]
    assert set(rejects.index) == {1, 2, 3, 4, 5, 9, 10}
    kept = out.dataset.set_index("reduced_formula")
    assert sorted(kept.index) == ["GaN", "NaCl", "ZnO"]
    # ZnO and Zn2O2 are one composition: without energies the median gap is kept
    assert kept.loc["ZnO", "band_gap"] == pytest.approx(2.0)
    assert kept.loc["ZnO", "n_merged"] == 2
    assert kept.loc["NaCl", "band_gap"] == 5.0 and kept.loc["NaCl", "row"] == 11
    s = out.summary
    assert (s["rows_in"], s["rejected"], s["duplicates_merged"], s["rows_out"]) == (11, 7, 1, 3)
    assert s["rejected_by_code"] == {
        "bad_gap": 2,
        "empty": 2,
        "fractional": 1,
        "negative_gap": 1,
        "unknown_element": 1,
    }
    assert sum(s["split"].values()) == 3


def test_lowest_formation_energy_wins_when_energies_exist():
    raw = _raw(["TiO2", "Ti2O4", "Ti3O6"], [3.0, 2.0, 1.0], energies=[-3.0, -3.5, np.nan])
    out = prepare_dataset(raw, PrepareConfig(dedup="auto"))
    assert out.summary["dedup_policy"] == "lowest_formation_energy"
    assert out.dataset["band_gap"].tolist() == [2.0] and out.dataset["row"].tolist() == [2]
    median = prepare_dataset(raw, PrepareConfig(dedup="median_gap"))
    assert median.dataset["band_gap"].tolist() == [2.0]
    first = prepare_dataset(raw, PrepareConfig(dedup="first"))
    assert first.dataset["band_gap"].tolist() == [3.0]


def test_filters_drop_and_report():
    raw = _raw(["Cu", "NaCl", "Li7La3Zr2O12", "BaTiO3", "PbS", "KMgAlSiPO8"], [0.0, 5.0, 4.0, 3.0, 0.4, 5.0])
    cfg = PrepareConfig(
        filters=FilterConfig(
            gap_positive_only=True,
            exclude_elements=["Pb"],
            max_elements=4,
            max_atoms=20,
            max_atoms_per_element=7,
        )
    )
    out = prepare_dataset(raw, cfg)
    assert sorted(out.dataset["reduced_formula"]) == ["BaTiO3", "NaCl"]
    codes = dict(zip(out.rejects["row"], out.rejects["code"], strict=True))
    assert codes == {
        1: "gap_not_positive",
        3: "too_many_atoms",
        5: "excluded_element",
        6: "too_many_elements",
    }
    assert set(out.rejects["stage"]) == {"filter"}
    assert out.summary["filtered"] == 4 and out.summary["rejected"] == 0


def test_split_is_seeded_and_independent_of_row_order():
    formulas = [f"Li{i}O" if i > 1 else "LiO" for i in range(1, 301)]
    raw = _raw(formulas, np.linspace(0.1, 5, 300))
    a = prepare_dataset(raw, PrepareConfig(seed=1)).dataset.set_index("reduced_formula")["split"]
    shuffled = raw.sample(frac=1, random_state=3)
    b = prepare_dataset(shuffled, PrepareConfig(seed=1)).dataset.set_index("reduced_formula")["split"]
    c = prepare_dataset(raw, PrepareConfig(seed=2)).dataset.set_index("reduced_formula")["split"]
    assert a.sort_index().equals(b.sort_index())
    assert not a.sort_index().equals(c.sort_index())
    assert a.value_counts().to_dict() == {"train": 180, "val": 60, "test": 60}


def test_paper_exp1_file_keeps_every_row(shared_data, tmp_path):
    df = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv")
    raw = pd.DataFrame(
        {
            "row": np.arange(1, len(df) + 1),
            "formula": df["composition"],
            "band_gap": df["band_gap"],
            "in_agd_bd_test": df["in_agd_bd_test"],
        }
    )
    out = prepare_dataset(raw, PrepareConfig())
    assert (
        out.summary["rows_in"] == 42_669
        and out.summary["rejected"] == 0
        and out.summary["rows_out"] == 42_669
    )
    assert out.dataset["reduced_formula"].tolist() == df["reduced_formula"].tolist()
    assert out.dataset["in_agd_bd_test"].sum() == 500
    hist = out.summary["band_gap"]["histogram"]
    assert sum(hist["counts"]) == 42_669
    paths = write_prepared(out, tmp_path / "prepared", tmp_path / "metrics.json")
    back = pd.read_parquet(paths["dataset"])
    assert len(back) == 42_669 and (tmp_path / "metrics.json").read_text() == paths["summary"].read_text()
