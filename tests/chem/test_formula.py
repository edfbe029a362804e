import pytest

from agd.chem.formula import FormulaError, FormulaRules, formula_key, parse_formula, reduced_formula
from tests.conftest import read_shared_csv


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("NaCl", {"Na": 1, "Cl": 1}),
        ("Fe2O3", {"Fe": 2, "O": 3}),
        (" Mg1Mn6O12 ", {"Mg": 1, "Mn": 6, "O": 12}),
        ("Ag(AuS)2", {"Ag": 1, "Au": 2, "S": 2}),
        ("Na1 Cl1", {"Na": 1, "Cl": 1}),
        ("Fe0.5O", {"Fe": 1, "O": 2}),
        ("Li0.25CoO2", {"Li": 1, "Co": 4, "O": 8}),
        ("NaN", {"Na": 1, "N": 1}),
        ("D2O", {"H": 2, "O": 1}),
    ],
)
def test_parse_good(text, counts):
    assert parse_formula(text) == counts


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Xx2O", "unknown_element"),
        ("Fe0.333O", "fractional"),
        ("Fe0O", "zero_amount"),
        ("Fe-1O", "unparsable"),
        ("abc", "unparsable"),
        (None, "empty"),
        (float("nan"), "empty"),
        (3.0, "not_text"),
    ],
)
def test_parse_bad_gives_reason(text, code):
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    assert info.value.code == code
    assert str(info.value)


def test_tolerance_and_multiplier_are_respected():
    assert parse_formula("Fe0.333O", FormulaRules(integer_tolerance=0.01)) == {"Fe": 1, "O": 3}
    with pytest.raises(FormulaError):
        parse_formula("Fe0.04O", FormulaRules(max_multiplier=20))
    assert parse_formula("Fe0.04O", FormulaRules(max_multiplier=25)) == {"Fe": 1, "O": 25}


def test_keys_match_the_shared_data_convention(shared_data):
    """Our composition key equals the `reduced_formula` column of every shared table."""
    for name, column in (("mp_gap_by_composition.csv", "formula"), ("mp_gap_agd_exp1.csv", "composition")):
        df = read_shared_csv(shared_data / name)
        mismatches = [
            (f, k) for f, k in zip(df[column], df["reduced_formula"], strict=True) if formula_key(f) != k
        ]
        assert mismatches == [], mismatches[:5]


def test_reduced_formula_special_cases():
    assert reduced_formula({"K": 4, "Mn": 4, "O": 8}) == "KMnO2"
    assert reduced_formula({"O": 1}) == "O2"  # pymatgen's diatomic convention, as in the data
    assert reduced_formula({"H": 2, "O": 2}) == "H2O2"
    assert reduced_formula({"He": 1}) == "He"
