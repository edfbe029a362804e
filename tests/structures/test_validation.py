"""The leave-one-out validation's bookkeeping (the CHGNet runs themselves are exercised in test_energy)."""

from __future__ import annotations

import pandas as pd
import pytest

from agd.structures.validation import reference_table, summarise


def test_summarise_rates_and_errors():
    rows = pd.DataFrame(
        [
            {
                "status": "ok",
                "match_substituted": True,
                "match_relaxed": True,
                "elmd_distance": 0.0,
                "fe_template": -1.0,
                "fe_true_structure": -1.1,
                "fe_mp": -1.2,
                "converged": True,
                "seconds": 1.0,
            },
            {
                "status": "ok",
                "match_substituted": False,
                "match_relaxed": True,
                "elmd_distance": 0.5,
                "fe_template": -0.5,
                "fe_true_structure": -0.9,
                "fe_mp": None,
                "converged": False,
                "seconds": 3.0,
            },
            {"status": "no_template", "seconds": 2.0},
        ]
    )
    summary = summarise(rows)
    assert summary["template_found"] == pytest.approx(2 / 3)
    assert summary["recovered_substituted_of_all"] == pytest.approx(1 / 3)
    assert summary["recovered_substituted_of_found"] == pytest.approx(0.5)
    assert summary["recovered_relaxed_of_found"] == 1.0
    assert summary["formation_energy_template_vs_mp"] == {
        "n": 1,
        "mae": pytest.approx(0.2),
        "median_abs_error": pytest.approx(0.2),
        "mean_signed_error": pytest.approx(0.2),
    }
    assert summary["formation_energy_template_vs_true_structure"]["mae"] == pytest.approx(0.25)


def test_reference_table_joins_mp_formation_energies(shared_data):
    table = reference_table(shared_data)
    assert len(table) == 1800 + 2861
    chemeleon = table[table["source"] == "structures_mp40_chemeleon.csv.gz"]
    # the chemeleon file has no formation energies of its own; most come from the 2019 MP snapshot
    assert chemeleon["formation_energy_per_atom"].notna().mean() > 0.5
