"""Chemical systems of formulas: what the campaign's per-system cap and the spread figures count."""

from __future__ import annotations

import pytest

from agd.chem.systems import chemical_system, system_counts, system_spread


def test_a_system_is_the_element_set_and_bad_formulas_have_none():
    assert chemical_system("Na2O") == chemical_system("NaO3") == frozenset({"Na", "O"})
    assert chemical_system("Qq2O") == chemical_system(None) == chemical_system("") == frozenset()


def test_counts_and_spread_agree_with_a_hand_count():
    formulas = ["Na2O", "NaO3", "MgO", "Qq2O", None, "Na2O2", "MgF2"]
    high = [True, False, True, True, False, True, False]
    counts = system_counts(formulas)
    assert counts == {frozenset({"Na", "O"}): 3, frozenset({"Mg", "O"}): 1, frozenset({"Mg", "F"}): 1}
    assert system_spread(formulas, high) == {
        "finds": 7,  # the two without a system are still finds
        "systems": 3,
        "high_gap": 4,
        "high_gap_systems": 2,  # Na-O twice and Mg-O; Qq2O has no system
        "most_in_one_system": 3,
    }
    assert system_spread([], []) == {
        "finds": 0, "systems": 0, "high_gap": 0, "high_gap_systems": 0, "most_in_one_system": 0
    }  # fmt: skip


def test_spread_needs_one_flag_per_formula():
    with pytest.raises(ValueError, match="3 formulas but 2 high-gap flags"):
        system_spread(["MgO", "NaCl", "KCl"], [True, False])
