"""smact validity: known answers, agreement with plain smact_validity, caching, bad input."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Composition
from smact.screening import smact_validity

from agd.chem import validity
from agd.chem.validity import COLUMNS, ValidityChecker, check_counts, check_formulas, is_valid
from agd.config import ConfigError, ValidityConfig
from tests.conftest import read_shared_csv

KNOWN_VALID = ["NaCl", "Fe2O3", "LiFePO4", "MgO", "TiO2", "CaCO3", "GaN", "Al2O3", "ZnS", "BaTiO3", "Li2O2"]
KNOWN_INVALID = ["NaCl2", "LiO2", "KO2", "Fe3O4", "Na3Cl"]


def smact_reference(formula: str, config: ValidityConfig) -> bool:
    """Plain smact_validity under the same settings as the checker, and at least min_elements elements."""
    if len(Composition(formula).elements) < config.min_elements:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the wiki set warns on every call
        return smact_validity(
            formula,
            use_pauling_test=config.use_pauling_test,
            include_alloys=config.include_alloys,
            oxidation_states_set=config.oxidation_states_set,
        )


@pytest.fixture
def checker() -> ValidityChecker:
    return ValidityChecker()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Record every composition handed to the smact evaluation."""
    calls: list[tuple] = []
    real = validity.evaluate_composition

    def counting(counts, elements, set_name):
        calls.append(tuple(counts))
        return real(counts, elements, set_name)

    monkeypatch.setattr(validity, "evaluate_composition", counting)
    return calls


def test_known_valid_and_invalid(checker: ValidityChecker) -> None:
    result = checker.check(KNOWN_VALID + KNOWN_INVALID)
    assert list(result.columns) == COLUMNS
    assert result["valid"].tolist() == [True] * len(KNOWN_VALID) + [False] * len(KNOWN_INVALID)
    good = result.iloc[: len(KNOWN_VALID)]
    assert good["charge_neutral"].all() and good["electronegativity_balanced"].all()
    assert good["reason"].isna().all()
    bad = result.iloc[len(KNOWN_VALID) :]
    assert (bad["reason"] == "not charge neutral").all()
    assert not bad["charge_neutral"].any()
    for dtype_column in ("charge_neutral", "electronegativity_balanced", "valid"):
        assert result[dtype_column].dtype == bool
    # the default set agrees with plain smact on every one of these
    default = ValidityConfig()
    assert [smact_reference(f, default) for f in KNOWN_VALID + KNOWN_INVALID] == result["valid"].tolist()


def test_checks_are_reported_separately() -> None:
    # Ag3Bi balances only as Ag(-1) Bi(+3), which puts the anion below the cation in electronegativity
    strict = ValidityChecker().check(["Ag3Bi"]).iloc[0]
    assert strict["charge_neutral"] and not strict["electronegativity_balanced"] and not strict["valid"]
    assert strict["reason"] == "charge neutral but electronegativity not balanced"
    loose = ValidityChecker(ValidityConfig(use_pauling_test=False)).check(["Ag3Bi", "NaCl2"])
    assert loose["valid"].tolist() == [True, False]
    assert not loose["electronegativity_balanced"].iat[0]  # still reported, just not required
    assert smact_validity("Ag3Bi", include_alloys=False, oxidation_states_set="icsd24") is False
    assert smact_validity("Ag3Bi", False, include_alloys=False, oxidation_states_set="icsd24") is True


def test_alloys_follow_config() -> None:
    formulas = ["CuZn", "Ni3Al", "NaCl2"]
    strict = ValidityChecker().check(formulas)
    assert strict["valid"].tolist() == [False, False, False]
    alloys = ValidityChecker(ValidityConfig(include_alloys=True)).check(formulas)
    assert alloys["valid"].tolist() == [True, True, False]
    assert alloys["valid"].tolist() == [
        smact_reference(f, ValidityConfig(include_alloys=True)) for f in formulas
    ]
    # the checks themselves are not faked for alloys: CuZn is still not charge neutral
    assert not alloys["charge_neutral"].iat[0] and alloys["reason"].iat[0] is None


def test_pure_elements_are_not_compounds() -> None:
    formulas = ["Mg", "O2", "C", "MgO", "Si"]
    default = ValidityChecker().check(formulas)
    assert default["valid"].tolist() == [False, False, False, True, False]
    # smact itself passes them (oxidation state 0): both checks stay as smact reports them
    assert default["charge_neutral"].all() and default["electronegativity_balanced"].all()
    assert default["reason"].tolist() == ["a single element, fewer than validity.min_elements (2)"] * 3 + [
        None,
        "a single element, fewer than validity.min_elements (2)",
    ]
    smact_parity = ValidityChecker(ValidityConfig(min_elements=1)).check(formulas)
    assert smact_parity["valid"].tolist() == [
        smact_validity(f, oxidation_states_set="icsd24") for f in formulas
    ]
    assert smact_parity["valid"].all()
    ternaries = ValidityChecker(ValidityConfig(min_elements=3)).check(["MgO", "LiFePO4", "CaCO3"])
    assert ternaries["valid"].tolist() == [False, True, True]
    assert ternaries["reason"].iat[0] == "2 elements, fewer than validity.min_elements (3)"
    with pytest.raises(ValueError, match="min_elements"):
        ValidityConfig(min_elements=0)


def test_elements_without_data() -> None:
    result = ValidityChecker(ValidityConfig(min_elements=1)).check(
        ["He", "O2", "HeO", "ArF2", "PmCl3", "XeF2", "RfO2"]
    )
    assert result["valid"].tolist() == [True, True, False, False, False, True, False]
    assert result["reason"].tolist()[2:] == [
        "element He has no oxidation states in set icsd24",
        "element Ar has no oxidation states in set icsd24",
        "element Pm has no oxidation states in set icsd24",
        None,
        "element Rf has no data in smact",  # plain smact_validity raises KeyError here
    ]
    with pytest.raises(KeyError):
        smact_validity("RfO2", oxidation_states_set="icsd24")
    # smact14 knows radon's states but not its electronegativity
    radon = ValidityChecker(ValidityConfig(oxidation_states_set="smact14")).check(["RnF2"]).iloc[0]
    assert radon["charge_neutral"] and not radon["valid"]
    assert radon["reason"].endswith("(element Rn has no Pauling electronegativity)")


def test_bad_formulas_are_reported_not_raised(checker: ValidityChecker) -> None:
    inputs = ["NaCl", "", "Xx2O", None, float("nan"), 5, "Fe2O3", ["Na"], "NaCl"]
    result = checker.check(inputs)
    assert len(result) == len(inputs)
    assert result["formula"].tolist()[:4] == ["NaCl", "", "Xx2O", None]
    assert result["valid"].tolist() == [True, False, False, False, False, False, True, False, True]
    reasons = result["reason"].tolist()
    assert reasons[1] == "unparsable: empty formula"
    assert reasons[2].startswith("unparsable:") and "Xx" in reasons[2]
    assert reasons[3] == reasons[4] == "unparsable: no formula"
    assert reasons[5].startswith("unparsable:") and reasons[7].startswith("unparsable:")
    assert result["reduced_formula"].tolist() == ["NaCl", None, None, None, None, None, "Fe2O3", None, "NaCl"]


def test_one_smact_evaluation_per_composition(spy: list[tuple]) -> None:
    checker = ValidityChecker()
    result = checker.check(["Fe2O3", "Fe4O6", "Fe2O3"])
    assert result["valid"].all() and set(result["reduced_formula"]) == {"Fe2O3"}
    assert len(spy) == 1
    checker.check(["Fe6O9", "NaCl"])  # cache reused across calls: only NaCl is new
    assert len(spy) == 2 and len(checker) == 2
    checker.check_counts([{"Fe": 2, "O": 3}, {"Cl": 1, "Na": 1}])
    assert len(spy) == 2
    ValidityChecker().check(["Fe2O3"])  # a new checker has its own cache
    assert len(spy) == 3


def test_many_duplicates_map_back(checker: ValidityChecker, spy: list[tuple]) -> None:
    rng = np.random.default_rng(0)
    pool = np.array(KNOWN_VALID + KNOWN_INVALID + ["", "Xx"], dtype=object)
    formulas = pd.Series(pool[rng.integers(0, len(pool), 20_000)])
    result = checker.check(formulas)
    expected = checker.check(pool).set_index("formula")["valid"]
    assert result["valid"].tolist() == expected.loc[formulas].tolist()
    assert len(spy) == len(KNOWN_VALID) + len(KNOWN_INVALID)
    shifted = checker.check(pd.Series(["MgO", "NaCl2"], index=[10, 20]))
    assert shifted.index.tolist() == [10, 20]


def test_check_counts_matches_text(checker: ValidityChecker) -> None:
    counts = [
        {"Fe": 4, "O": 6},
        {"Na": 1, "Cl": 2},
        None,
        {"Xx": 1},
        {"Na": 0, "Cl": 1},
        {"Na": 1.5},
        {"D": 2, "O": 1},
    ]
    result = checker.check_counts(counts)
    assert result["formula"].tolist()[:2] == ["Fe4O6", "NaCl2"]
    assert result["reduced_formula"].tolist() == ["Fe2O3", "NaCl2", None, None, None, None, "H2O"]
    assert result["valid"].tolist() == [True, False, False, False, False, False, True]
    assert all(r.startswith("unparsable:") for r in result["reason"].iloc[2:6])
    assert check_counts([{"Li": 1, "Fe": 1, "P": 1, "O": 4}])["valid"].iat[0]


def test_agrees_with_plain_smact_on_real_formulas(shared_data) -> None:
    table = read_shared_csv(shared_data / "mp_gap_by_composition.csv", usecols=["formula"])
    sample = table["formula"].sample(500, random_state=3).tolist()
    for config in (ValidityConfig(), ValidityConfig(include_alloys=True, use_pauling_test=False)):
        ours = ValidityChecker(config).check(sample)["valid"].tolist()
        assert ours == [smact_reference(f, config) for f in sample], config


@pytest.mark.parametrize("set_name", ["smact14", "icsd16", "pymatgen_sp", "wiki"])
def test_other_sets_agree_with_plain_smact(set_name: str) -> None:
    config = ValidityConfig(oxidation_states_set=set_name)
    formulas = KNOWN_VALID + KNOWN_INVALID + ["XeF2", "Li2O2", "BaO2", "Ag3Bi", "CuZn", "TcO2", "KrF2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ValidityChecker(config).check(formulas)["valid"].tolist()
    assert ours == [smact_reference(f, config) for f in formulas]


def test_oxidation_state_set_is_validated_up_front(tmp_path) -> None:
    with pytest.raises(ConfigError, match="icsd24, icsd16, smact14, pymatgen_sp, wiki"):
        ValidityChecker(ValidityConfig(oxidation_states_set="icsd2024"))
    with pytest.warns(UserWarning, match="Wikipedia"):
        ValidityChecker(ValidityConfig(oxidation_states_set="wiki"))
    custom = tmp_path / "states.txt"
    custom.write_text("# two elements only\nNa 1\nCl -1 1\n")
    checker = ValidityChecker(ValidityConfig(oxidation_states_set=str(custom)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smact warns about elements missing from the file
        result = checker.check(["NaCl", "NaCl2", "MgO"])
    assert result["valid"].tolist() == [True, False, False]
    assert result["reason"].iat[2] == f"element Mg has no oxidation states in set {custom}"


def test_cache_pickles_and_persists(tmp_path, spy: list[tuple]) -> None:
    checker = ValidityChecker()
    first = checker.check(["NaCl", "NaCl2", "HeO", "Ag3Bi"])
    clone = pickle.loads(pickle.dumps(checker))
    pd.testing.assert_frame_equal(clone.check(["NaCl", "NaCl2", "HeO", "Ag3Bi"]), first)
    path = tmp_path / "validity_cache.parquet"
    checker.save_cache(path)
    fresh = ValidityChecker()
    assert fresh.load_cache(path) == 4
    pd.testing.assert_frame_equal(fresh.check(["NaCl", "NaCl2", "HeO", "Ag3Bi"]), first)
    assert len(spy) == 4  # neither the clone nor the loaded checker went back to smact
    with pytest.raises(ValueError, match="validity cache was made with"):
        ValidityChecker(ValidityConfig(include_alloys=True)).load_cache(path)


def test_process_pool_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validity, "_MIN_PARALLEL", 1)
    monkeypatch.setattr(validity, "_BATCH", 3)  # several batches per call
    formulas = KNOWN_VALID + KNOWN_INVALID + ["Ag3Bi", "HeO", "RfO2", "", "CuZn"]
    serial = ValidityChecker().check(formulas)
    parallel = ValidityChecker(n_jobs=2).check(formulas)
    pd.testing.assert_frame_equal(parallel, serial)


def test_convenience_functions() -> None:
    assert is_valid("LiFePO4") and not is_valid("NaCl2") and not is_valid("")
    assert ValidityChecker().is_valid("GaN")
    frame = check_formulas(["MgO", "Fe4O6"])
    assert frame["reduced_formula"].tolist() == ["MgO", "Fe2O3"]
    assert math.isclose(frame["valid"].mean(), 1.0)


def test_many_element_compositions_neither_crash_nor_blow_up_memory():
    """A 23-element decode once made the zero-charge search allocate tens of GiB; now it is walked lazily."""
    import itertools

    from agd.chem.validity import _neutral_depth_first

    rng = np.random.default_rng(0)
    for _ in range(200):  # the lazy walk yields exactly the zero-charge combinations, in product order
        k = int(rng.integers(2, 6))
        states = [
            tuple(int(s) for s in rng.choice(np.arange(-4, 8), size=int(rng.integers(1, 4)), replace=False))
            for _ in range(k)
        ]
        counts = [int(c) for c in rng.integers(1, 6, size=k)]
        dense = [
            c for c in itertools.product(*states) if sum(a * b for a, b in zip(c, counts, strict=True)) == 0
        ]
        assert list(_neutral_depth_first(states, counts)) == dense
    result = ValidityChecker().check(
        ["LiBeBNaMgAlSiPSClKCaScTiVCrMnFeCoNiCuZnGaO", "LiBeBNaMgAlSiPSClKCaScO", "NaCl"]
    )
    assert result["reason"].iloc[0] == "not charge neutral"
    assert result["valid"].tolist() == [False, True, True]
