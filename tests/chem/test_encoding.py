import numpy as np
import pytest

from agd.chem.encoding import EncodingError, Vocabulary
from agd.chem.formula import formula_key, parse_formula, reduce_counts
from tests.conftest import read_shared_csv


@pytest.fixture
def vocab():
    return Vocabulary.from_symbols(["H", "O", "Na", "Cl", "Fe"], max_count=4)


def test_round_trip_on_every_fitting_formula(shared_data):
    """encode -> decode is exact on every composition of the MP table that fits the vocabulary."""
    exp1 = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv")
    vocab = Vocabulary.from_compositions((parse_formula(f) for f in exp1["composition"]), max_count=20)
    table = read_shared_csv(shared_data / "mp_gap_by_composition.csv")
    compositions = [reduce_counts(parse_formula(f)) for f in table["formula"]]
    fitting = [
        (c, k) for c, k in zip(compositions, table["reduced_formula"], strict=True) if vocab.misfit(c) is None
    ]
    assert len(fitting) > 0.9 * len(table)  # the vocabulary is not trivially small
    for start in range(0, len(fitting), 10_000):
        chunk = fitting[start : start + 10_000]
        matrices = vocab.encode([c for c, _ in chunk], dtype=np.uint8)
        assert matrices.shape == (len(chunk), *vocab.shape)
        result = vocab.decode(matrices)
        assert all(r is None for r in result.reasons)
        for (counts, key), decoded, row in zip(chunk, result.formulas, result.counts, strict=True):
            assert parse_formula(decoded) == counts
            assert formula_key(decoded) == key
            assert dict(zip(vocab.elements, row.tolist(), strict=True)) == {
                e: counts.get(e, 0) for e in vocab.elements
            }


def test_decode_reports_why_a_matrix_is_not_a_formula(vocab):
    good = vocab.encode([{"Fe": 2, "O": 3}])[0]
    several = good.copy()
    several[vocab.elements.index("Na"), 2] = 1  # Na both absent (col 0) and count 2
    missing = good.copy()
    missing[vocab.elements.index("Cl"), :] = 0
    empty = vocab.one_hot(np.zeros((1, 5), dtype=int))[0]
    out_of_range = good.copy()
    out_of_range[0, 0] = 1.5
    not_finite = good.copy()
    not_finite[0, 0] = np.nan
    result = vocab.decode(np.stack([good, several, missing, empty, out_of_range, not_finite]))
    assert result.formulas[0] == "Fe2O3"
    assert result.formulas[1:] == [None] * 5
    assert result.reasons[1] == "several counts set for Na"
    assert result.reasons[2] == "no count set for Cl"
    assert result.reasons[3] == "no element present"
    assert "outside [0, 1]" in result.reasons[4]
    assert "not finite" in result.reasons[5]
    assert result.ok.tolist() == [True, False, False, False, False, False]


def test_decode_probabilities_takes_the_most_likely_count(vocab):
    rng = np.random.default_rng(0)
    probs = rng.random((50, *vocab.shape)) * 0.1
    counts = rng.integers(0, vocab.max_count + 1, size=(50, len(vocab.elements)))
    counts[0] = 0
    for i, row in enumerate(counts):
        probs[i, np.arange(len(row)), row] = 0.9
    result = vocab.decode_probabilities(probs)
    assert np.array_equal(result.counts[1:], counts[1:])
    assert result.formulas[0] is None and result.reasons[0] == "no element present"


def test_encode_rejects_what_does_not_fit(vocab):
    assert vocab.misfit({"Fe": 5}) == "count 5 of Fe is outside 1..4"
    assert vocab.misfit({"K": 1}) == "element K is not in the vocabulary"
    with pytest.raises(EncodingError, match="composition 1"):
        vocab.encode([{"Fe": 1}, {"Au": 1}])
    with pytest.raises(EncodingError, match="shape"):
        vocab.decode(np.zeros((2, 3, 3)))


def test_vocabulary_saves_and_loads(tmp_path, vocab):
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab
    assert loaded.elements == ("H", "O", "Na", "Cl", "Fe")
    with pytest.raises(EncodingError):
        Vocabulary.from_symbols(["Fe", "Fe"], 3)
    with pytest.raises(EncodingError):
        Vocabulary.from_symbols(["Qq"], 3)


def test_vocabulary_from_data_is_in_atomic_number_order():
    vocab = Vocabulary.from_compositions([{"O": 1, "Fe": 2}, {"Na": 1, "H": 1}], max_count=3)
    assert vocab.elements == ("H", "O", "Na", "Fe")
