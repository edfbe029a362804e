"""Magpie descriptors: matminer's ElementProperty.from_preset("magpie") is the reference."""

import warnings

import numpy as np
import pytest
from matminer.featurizers.composition import ElementProperty
from pymatgen.core import Composition, Element

from agd.chem.magpie import MAGPIE_STATS, MagpieFeaturizer, MagpieResult, feature_labels
from tests.conftest import read_shared_csv

# Parity tolerance. Every feature is built from the same float64 table values with the same
# operations as matminer, so results agree to rounding (in practice bit for bit). rtol=1e-6 leaves
# room for a different summation order on features up to ~4000 (melting points in K); atol=1e-9
# covers features that are exactly 0 on one side and rounding noise (~1e-13) on the other
# (range and avg_dev of one-element compositions).
RTOL, ATOL = 1e-6, 1e-9


@pytest.fixture(scope="module")
def ours() -> MagpieFeaturizer:
    return MagpieFeaturizer()


def _matminer(impute_nan: bool = True) -> ElementProperty:
    featurizer = ElementProperty.from_preset("magpie", impute_nan=impute_nan)
    featurizer.set_n_jobs(1)
    return featurizer


@pytest.fixture(scope="module")
def reference() -> ElementProperty:
    return _matminer()


def matminer_features(featurizer: ElementProperty, compositions) -> np.ndarray:
    """matminer's features, one Composition (built from a formula or a dict) at a time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns on noble-gas electronegativities
        return np.array([featurizer.featurize(Composition(c)) for c in compositions], dtype=np.float64)


def column(name: str) -> int:
    return feature_labels().index(name)


def test_labels_and_default_match_matminer(ours, reference):
    assert feature_labels() == reference.feature_labels()
    assert ours.feature_labels() == reference.feature_labels()
    assert len(feature_labels()) == 132
    assert reference.impute_nan is True and ours.impute_nan is True  # matminer 0.10 imputes by default
    assert any("10.1038/npjcompumats" in c for c in ours.citations())


def test_parity_on_real_formulas(ours, reference, shared_data):
    table = read_shared_csv(shared_data / "mp_gap_by_composition.csv")
    formulas = table["formula"].sample(n=2_000, random_state=20_240_601).tolist() + ["NaN"]  # sodium nitride
    result = ours.featurize_formulas(formulas)
    assert result.errors == []
    assert result.features.shape == (len(formulas), 132) and result.features.dtype == np.float64
    np.testing.assert_allclose(result.features, matminer_features(reference, formulas), rtol=RTOL, atol=ATOL)
    # pymatgen Compositions are valid rows too (element keys), for a like-for-like comparison
    compositions = [Composition(f) for f in formulas[:200]]
    np.testing.assert_allclose(
        ours.featurize_counts(compositions).features, result.features[:200], rtol=RTOL, atol=ATOL
    )


def test_fractional_and_single_element_compositions(ours, reference):
    formulas = [
        "Fe",
        "O2",
        "Og",
        "He",
        "Li0.5Fe0.5PO4",
        "Fe0.25Ni0.75",
        "Ba0.6Sr0.4TiO3",
        "(Mg0.9Fe0.1)2SiO4",
    ]
    result = ours.featurize_formulas(formulas)
    assert result.errors == []
    np.testing.assert_allclose(result.features, matminer_features(reference, formulas), rtol=RTOL, atol=ATOL)
    single = result.features[:4].reshape(4, 22, len(MAGPIE_STATS))
    for stat in ("maximum", "mean", "mode"):  # one element: every location statistic is its value
        np.testing.assert_array_equal(single[:, :, MAGPIE_STATS.index(stat)], single[:, :, 0])
    assert not single[:, :, [MAGPIE_STATS.index("range"), MAGPIE_STATS.index("avg_dev")]].any()

    # arbitrary real-valued amounts through featurize_counts, on random element sets
    rng = np.random.default_rng(7)
    symbols = np.array([e.symbol for e in Element])
    counts = []
    for _ in range(300):
        chosen = rng.choice(symbols, size=rng.integers(1, 7), replace=False)
        counts.append(dict(zip(chosen.tolist(), rng.dirichlet(np.ones(len(chosen))).tolist(), strict=True)))
    result = ours.featurize_counts(counts)
    assert result.errors == []
    np.testing.assert_allclose(result.features, matminer_features(reference, counts), rtol=RTOL, atol=ATOL)


def test_mode_ties_take_the_smallest_value_like_matminer(ours, reference):
    counts = [
        {"Na": 1, "Cl": 1},  # exact tie: the smaller property value wins, per property
        {"Fe": 1.0, "O": 1.0 + 5e-6},  # within np.isclose(rtol=1e-5): still a tie
        {"Fe": 1.0, "O": 1.001},  # O is the most abundant
        {"Fe": 2, "O": 3, "Ni": 3},
    ]
    result = ours.featurize_counts(counts)
    np.testing.assert_allclose(result.features, matminer_features(reference, counts), rtol=RTOL, atol=ATOL)
    mode_number = result.features[:, column("MagpieData mode Number")]
    np.testing.assert_array_equal(mode_number, [11, 8, 8, 8])


def test_nan_handling_matches_matminer(reference):
    # Elements with gaps in Magpie's tables: noble gases (electronegativity), He (melting point),
    # Nh..Og (even the atomic number), many actinides (covalent radius, space group).
    formulas = ["XeF4", "HeNa2", "Og", "KrF2", "FrCl", "Cf2O3", "NaCl", "Fe2O3", "Mc3Na", "RnO3"]
    raw = MagpieFeaturizer(impute_nan=False).featurize_formulas(formulas)
    expected = matminer_features(_matminer(impute_nan=False), formulas)
    assert np.isnan(expected).any() and raw.errors == []  # gaps give NaN features, not failed rows
    np.testing.assert_allclose(raw.features, expected, rtol=RTOL, atol=ATOL)  # NaN where matminer has NaN

    imputed = MagpieFeaturizer().featurize_formulas(formulas)
    assert not np.isnan(imputed.features).any()
    np.testing.assert_allclose(imputed.features, matminer_features(reference, formulas), rtol=RTOL, atol=ATOL)
    # matminer's imputation fills gaps with the mean over elements, atomic number included:
    og_number = imputed.features[formulas.index("Og"), column("MagpieData mean Number")]
    assert 50 < og_number < 60


def test_bad_rows_are_nan_with_reasons_and_do_not_disturb_good_rows(ours):
    good = ["Fe2O3", "NaCl", "LiFePO4", "NaN"]
    mixed = ["Fe2O3", "Xx2O", "NaCl", "", None, "LiFePO4", "Fe0O", "NaN", "((("]
    result = ours.featurize_formulas(mixed)
    bad_rows = [1, 3, 4, 6, 8]
    assert [e.row for e in result.errors] == bad_rows
    assert all(e.reason for e in result.errors)
    assert np.isnan(result.features[bad_rows]).all()
    np.testing.assert_array_equal(result.ok, [i not in bad_rows for i in range(len(mixed))])
    np.testing.assert_array_equal(result.features[result.ok], ours.featurize_formulas(good).features)

    counts = [{"Fe": 2, "O": 3}, {"Xx": 1, "O": 1}, {"Fe": -1}, {"Fe": "two"}, {}, {"Fe": 0}, "FeO", {"O": 1}]
    result = ours.featurize_counts(counts)
    reasons = dict(result.errors)
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6]
    assert "Xx" in reasons[1] and "mapping" in reasons[6]
    assert np.isnan(result.features[sorted(reasons)]).all()
    np.testing.assert_array_equal(
        result.features[[0, 7]], ours.featurize_counts([{"Fe": 2, "O": 3}, {"O": 1}]).features
    )
    # zero amounts are dropped, as pymatgen does
    np.testing.assert_array_equal(
        ours.featurize_counts([{"Fe": 0, "O": 2}]).features, ours.featurize_counts([{"O": 2}]).features
    )


def test_chunks_equal_one_shot(ours, shared_data):
    table = read_shared_csv(shared_data / "mp_gap_by_composition.csv")
    formulas = table["formula"].sample(n=2_500, random_state=3).tolist()
    formulas[10] = formulas[1_000] = formulas[2_499] = "not a formula"
    whole = ours.featurize_formulas(formulas)
    chunks = list(ours.featurize_chunks(iter(formulas), chunk_size=333))
    assert [c.start for c in chunks] == list(range(0, 2_500, 333))
    assert all(isinstance(c, MagpieResult) for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.features for c in chunks]), whole.features)
    assert [e for c in chunks for e in c.errors] == whole.errors
    assert [e.row for e in whole.errors] == [10, 1_000, 2_499]
    last = chunks[-1]
    assert not last.ok[2_499 - last.start]
    frame = last.to_frame()
    assert frame.index[0] == last.start and list(frame.columns) == feature_labels()


def test_empty_input(ours):
    assert ours.featurize_formulas([]).features.shape == (0, 132)
    assert list(ours.featurize_chunks([])) == []
    with pytest.raises(ValueError):
        next(ours.featurize_chunks(["NaCl"], chunk_size=0))
