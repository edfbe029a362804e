import json

import numpy as np
import pandas as pd
import pytest
import torch

from agd.chem.encoding import Vocabulary
from agd.chem.formula import parse_formula
from agd.config import AutoencoderConfig, EncodingConfig, PrepareConfig
from agd.data.prepare import prepare_dataset, write_prepared
from agd.models.autoencoder import (
    CompositionAutoencoder,
    _loss,
    count_weights,
    latent_bounds,
    load_autoencoder,
    reconstruction_metrics,
    run_autoencoder_stage,
    save_autoencoder,
    train_autoencoder,
)
from tests.conftest import read_shared_csv

TINY = AutoencoderConfig(
    latent_dim=24,
    channels=[16, 32],
    epochs=10,
    batch_size=32,
    learning_rate=1e-2,
    loss="categorical",
    nonzero_weight=10,
    patience=None,
)
N_ROWS = 3000


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """The first rows of the paper's Exp1 set, prepared and split as the pipeline does."""
    df = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv", nrows=N_ROWS)
    raw = pd.DataFrame(
        {"row": np.arange(1, len(df) + 1), "formula": df["composition"], "band_gap": df["band_gap"]}
    )
    out = prepare_dataset(raw, PrepareConfig(seed=0))
    paths = write_prepared(out, tmp_path_factory.mktemp("prepared"))
    return paths["dataset"], out.dataset


@pytest.fixture(scope="module")
def splits(prepared):
    table = prepared[1]
    return {
        s: [parse_formula(f) for f in table.loc[table["split"] == s, "reduced_formula"]]
        for s in ("train", "val", "test")
    }


@pytest.fixture(scope="module")
def vocab(splits):
    return Vocabulary.from_compositions(splits["train"] + splits["val"] + splits["test"], max_count=20)


@pytest.fixture(scope="module")
def trained(splits, vocab):
    seen = []
    model, history, metrics = train_autoencoder(
        splits["train"], splits["val"], vocab, TINY, on_epoch=lambda e, m: seen.append((e, m))
    )
    return model, history, metrics, seen


def test_shapes_and_output_range():
    vocab = Vocabulary.from_symbols(["H", "O", "Na", "Cl", "Fe"], max_count=4)
    x = torch.as_tensor(vocab.encode([{"Na": 1, "Cl": 1}, {"Fe": 2, "O": 3}, {"H": 2, "O": 1}]))
    for loss in ("bce", "categorical"):
        model = CompositionAutoencoder.from_config(
            vocab, AutoencoderConfig(latent_dim=7, channels=[4, 6], loss=loss)
        )
        z = model.encode(x)
        probs = model.decode(z)
        assert z.shape == (3, 7) and probs.shape == (3, 5, 5) and torch.equal(model(x), probs)
        assert float(probs.detach().min()) >= 0 and float(probs.detach().max()) <= 1
    assert torch.allclose(probs.sum(dim=-1), torch.ones(3, 5))  # softmax per element row


def test_training_lowers_the_loss_and_reports_every_epoch(trained):
    _, history, metrics, seen = trained
    assert [e for e, _ in seen] == list(range(1, TINY.epochs + 1)) == [h["epoch"] for h in history]
    assert set(seen[0][1]) == {"train_loss", "val_loss", "val_exact"}
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert metrics["epochs_run"] == TINY.epochs and metrics["seconds_per_epoch"] > 0


def test_round_trip_beats_trivial_floors(trained, splits, vocab):
    model, _, metrics, _ = trained
    held_out = reconstruction_metrics(model, splits["test"], vocab)
    assert held_out["n"] == len(splits["test"])
    # floors: an empty matrix gets no formula right; the most common count of a present element
    counts = np.concatenate([list(c.values()) for c in splits["train"]])
    majority = np.bincount(counts).max() / len(counts)
    absent = 1 - np.mean([len(c) for c in splits["test"]]) / len(vocab.elements)
    assert metrics["train"]["exact"] > 0.1 and held_out["exact"] > 0.05
    assert held_out["present_element_accuracy"] > majority
    assert held_out["element_accuracy"] > absent


def test_training_is_deterministic_for_a_seed(splits, vocab):
    cfg = TINY.model_copy(update={"epochs": 2})
    train, val = splits["train"][:500], splits["val"][:100]
    a, history_a, _ = train_autoencoder(train, val, vocab, cfg)
    b, history_b, _ = train_autoencoder(train, val, vocab, cfg)
    c, _, _ = train_autoencoder(train, val, vocab, cfg.model_copy(update={"seed": 1}))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert [h["val_loss"] for h in history_a] == [h["val_loss"] for h in history_b]
    assert not torch.equal(a.encoder_fc.weight, c.encoder_fc.weight)


def test_early_stopping_keeps_the_best_epoch(splits, vocab):
    # a constant rate, so that a shorter run follows the same path
    cfg = TINY.model_copy(
        update={"epochs": 40, "learning_rate": 0.05, "patience": 2, "lr_schedule": "constant"}
    )
    model, history, metrics = train_autoencoder(splits["train"][:300], splits["val"][:100], vocab, cfg)
    val_losses = [h["val_loss"] for h in history]
    assert metrics["epochs_run"] < cfg.epochs
    assert metrics["best_epoch"] == 1 + int(np.argmin(val_losses))
    assert metrics["epochs_run"] == metrics["best_epoch"] + cfg.patience
    # the returned weights are those of the best epoch
    again, _, _ = train_autoencoder(
        splits["train"][:300],
        splits["val"][:100],
        vocab,
        cfg.model_copy(update={"epochs": metrics["best_epoch"], "patience": None}),
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_save_load_gives_identical_latents_decodes_and_bounds(trained, splits, vocab, tmp_path):
    model, history, metrics, _ = trained
    bounds = latent_bounds(model, splits["train"], vocab)
    assert bounds.lower.shape == bounds.upper.shape == (TINY.latent_dim,)
    assert (bounds.lower <= bounds.upper).all() and bounds.as_array().shape == (TINY.latent_dim, 2)
    paths = save_autoencoder(tmp_path, model, vocab, TINY, bounds, metrics, history)
    assert {p.name for p in paths.values()} == {
        "model.pt",
        "vocab.json",
        "config.json",
        "bounds.json",
        "metrics.json",
        "history.csv",
    }
    loaded = load_autoencoder(tmp_path)
    assert loaded.vocab == vocab and loaded.cfg == TINY and loaded.metrics == json.loads(json.dumps(metrics))
    np.testing.assert_array_equal(loaded.bounds.lower, bounds.lower)
    np.testing.assert_array_equal(loaded.bounds.upper, bounds.upper)

    formulas = [_formula(c) for c in splits["test"][:50]]
    z = loaded.encode_formulas(formulas)
    x = torch.as_tensor(vocab.encode(splits["test"][:50]))
    with torch.no_grad():
        expected = model.encode(x).numpy()
    np.testing.assert_array_equal(z, expected)
    assert z.shape == (len(formulas), TINY.latent_dim)
    decoded = loaded.decode_latents(z)
    with torch.no_grad():
        direct = vocab.decode_probabilities(model.decode(torch.as_tensor(expected)).numpy())
    assert decoded.formulas == direct.formulas and np.array_equal(decoded.counts, direct.counts)
    # formulas are reduced before encoding
    assert np.array_equal(loaded.encode_formulas(["Zn2O2", "Zn3O3"]), loaded.encode_formulas(["ZnO", "ZnO"]))
    train_z = loaded.encode_formulas([_formula(c) for c in splits["train"][:200]])
    assert (train_z >= bounds.lower - 1e-6).all() and (train_z <= bounds.upper + 1e-6).all()


def _formula(counts):
    return "".join(f"{e}{c}" for e, c in counts.items())


def test_formulas_that_do_not_fit_are_reported_not_crashed_on(trained, vocab, tmp_path, caplog):
    model, history, metrics, _ = trained
    absent = next(e for e in ("Og", "Ts", "Lv", "Fl", "Rn", "Xe", "Fr") if e not in vocab.elements)
    save_autoencoder(
        tmp_path, model, vocab, TINY, latent_bounds(model, [{vocab.elements[0]: 1}], vocab), metrics
    )
    loaded = load_autoencoder(tmp_path)
    fits = _formula({vocab.elements[0]: 1, vocab.elements[1]: 2})
    formulas = [fits, f"{absent}Cl", "NaCl21", "Xx2O"]
    with caplog.at_level("WARNING"):
        z = loaded.encode_formulas(formulas)
    assert "3 of 4 formulas cannot be encoded" in caplog.text
    assert np.isfinite(z[0]).all() and np.isnan(z[1:]).all()
    reasons = loaded.check_formulas(formulas)
    assert reasons[0] is None
    assert f"element {absent} is not in the vocabulary" in reasons[1]
    assert "count 21 of Cl is outside 1..20" in reasons[2]
    assert "unknown element" in reasons[3]


def test_stage_writes_everything_and_skips_what_does_not_fit(prepared, tmp_path):
    parquet, table = prepared
    cfg = TINY.model_copy(update={"epochs": 3})
    epochs = []
    metrics = run_autoencoder_stage(
        parquet, tmp_path / "ae", EncodingConfig(max_count=6), cfg, lambda e, m: epochs.append(e)
    )
    assert epochs == [1, 2, 3]
    train = table[table["split"] == "train"]
    too_big = int((train["max_count"] > 6).sum())
    assert too_big > 0 and metrics["skipped"]["train"] == {"total": too_big, "count_above_max": too_big}
    assert metrics["train"]["n"] == len(train) - too_big
    assert metrics["skipped"]["test"]["total"] >= int(
        (table.loc[table["split"] == "test", "max_count"] > 6).sum()
    )
    for split in ("val", "test"):
        assert metrics[split]["n"] + metrics["skipped"][split]["total"] == int(
            (table["split"] == split).sum()
        )
        assert 0 <= metrics[split]["exact"] <= 1
    assert metrics["encoding"]["max_count"] == 6
    loaded = load_autoencoder(tmp_path / "ae")
    assert loaded.vocab.max_count == 6 and loaded.metrics == json.loads(json.dumps(metrics))
    assert len(pd.read_csv(tmp_path / "ae" / "history.csv")) == 3
    assert loaded.bounds.lower.shape == (cfg.latent_dim,)


def test_the_papers_sigmoid_loss_trains_too(splits, vocab):
    for weight in (1.0, 30.0):
        cfg = TINY.model_copy(update={"loss": "bce", "nonzero_weight": weight, "epochs": 3})
        model, history, _ = train_autoencoder(splits["train"][:600], splits["val"][:100], vocab, cfg)
        assert model.output == "sigmoid"
        assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_stage_with_a_fixed_element_list_skips_other_elements(prepared, tmp_path):
    parquet, table = prepared
    elements = ["H", "Li", "C", "N", "O", "F", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "K", "Ca"]
    cfg = TINY.model_copy(update={"epochs": 1})
    metrics = run_autoencoder_stage(
        parquet, tmp_path / "ae", EncodingConfig(max_count=20, elements=elements), cfg
    )
    in_list = table["reduced_formula"].map(lambda f: set(parse_formula(f)) <= set(elements))
    for split in ("train", "val", "test"):
        rows = table["split"] == split
        assert metrics[split]["n"] == int((rows & in_list).sum())
        assert metrics["skipped"][split] == {
            "total": int((rows & ~in_list).sum()),
            "element_not_in_vocabulary": int((rows & ~in_list).sum()),
        }
    assert load_autoencoder(tmp_path / "ae").vocab.elements == tuple(elements)


def test_count_weights_favour_rare_counts_and_scale_the_loss():
    counts = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 2, 0], [4, 0, 0, 0, 1]])
    assert count_weights(counts, 5, 0.0) is None
    # training cells: count 1 six times, 2 once, 3 never (taken as once), 4 once
    weights = count_weights(counts, 5, 0.5)
    assert weights.tolist() == pytest.approx([1.0, 1.0, 6**0.5, 6**0.5, 6**0.5])
    logits = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(0))
    cfg = AutoencoderConfig(loss="categorical", nonzero_weight=2.0)
    per_row = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), counts.reshape(-1), reduction="none")
    base = torch.where(counts.reshape(-1) > 0, 2.0, 1.0)
    expected = (per_row * base * weights[counts.reshape(-1)]).mean()
    assert torch.allclose(_loss(logits, counts, cfg, weights), expected)
    assert not torch.allclose(_loss(logits, counts, cfg, weights), _loss(logits, counts, cfg))
    # BCE: the whole row of a present element is scaled; absent rows (weight 1) are unchanged
    bce = AutoencoderConfig(loss="bce")
    ones = torch.ones(5)
    only_rare = ones.clone()
    only_rare[4] = 10.0
    diff = _loss(logits, counts, bce, only_rare) - _loss(logits, counts, bce, ones)
    target = torch.nn.functional.one_hot(counts, 5).float()
    cells = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    assert torch.allclose(diff, 9.0 * cells[counts == 4].sum() / cells.numel())


def test_rare_count_weighting_and_latent_noise_train_deterministically(splits, vocab):
    train, val = splits["train"][:600], splits["val"][:150]
    cfg = TINY.model_copy(update={"epochs": 4})
    plain, history_plain, _ = train_autoencoder(train, val, vocab, cfg)
    for update in ({"count_weight_power": 0.5}, {"latent_noise": 0.2}):
        option = cfg.model_copy(update=update)
        a, history_a, metrics_a = train_autoencoder(train, val, vocab, option)
        b, history_b, metrics_b = train_autoencoder(train, val, vocab, option)
        assert [h["val_loss"] for h in history_a] == [h["val_loss"] for h in history_b], update
        assert torch.equal(a.encoder_fc.weight, b.encoder_fc.weight)
        assert not torch.equal(a.encoder_fc.weight, plain.encoder_fc.weight), update
        assert history_a[-1]["train_loss"] < 0.9 * history_a[0]["train_loss"]
        assert history_a[-1]["val_loss"] < history_a[0]["val_loss"]
        # the noise is for training only: evaluation of the returned model is deterministic
        again = reconstruction_metrics(a, val, vocab)
        assert again == reconstruction_metrics(a, val, vocab) == metrics_a["val"]


def test_thermometer_inputs_and_ordinal_probabilities():
    vocab = Vocabulary.from_symbols(["H", "O", "Na", "Cl", "Fe"], max_count=4)
    counts = torch.tensor([[0, 0, 1, 1, 0], [0, 3, 0, 0, 2], [2, 1, 0, 0, 0]])
    cfg = AutoencoderConfig(latent_dim=7, channels=[4, 6], loss="ordinal", input_code="thermometer")
    model = CompositionAutoencoder.from_config(vocab, cfg)
    assert model.output == "ordinal" and model.input_code == "thermometer"
    x = model.inputs(counts)
    # Fe2: absent column off, count >= 1 and >= 2 on; absent H: only column 0
    assert x[1, 4].tolist() == [0, 1, 1, 0, 0] and x[0, 0].tolist() == [1, 0, 0, 0, 0]
    assert torch.equal(x.sum(dim=-1), torch.where(counts > 0, counts, 1).float())
    logits = model.decode_logits(model.encode_counts(counts))
    assert logits.shape == (3, 5, 4)  # one threshold per count 1..4
    # the probabilities sum to 1 per row even when the thresholds' sigmoids are not ordered
    scores = torch.tensor([[[2.0, 3.0, -1.0, 0.5]]])
    probs = model.probabilities(scores)
    exceed = torch.sigmoid(torch.tensor([2.0, 2.0, -1.0, -1.0]))  # running minimum of the sigmoids
    expected = torch.cat([1 - exceed[:1], exceed[:-1] - exceed[1:], exceed[-1:]])
    assert torch.allclose(probs[0, 0], expected) and (probs >= 0).all()
    assert torch.allclose(model.decode(model.encode_counts(counts)).sum(dim=-1), torch.ones(3, 5))
    # the one-hot default is the paper's matrix
    plain = CompositionAutoencoder.from_config(vocab, AutoencoderConfig(latent_dim=7, channels=[4, 6]))
    assert torch.equal(plain.inputs(counts), torch.nn.functional.one_hot(counts, 5).float())


def test_ordinal_loss_is_the_cross_entropy_of_every_threshold():
    counts = torch.tensor([[0, 2, 1]])
    logits = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(1))
    exceed = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    cells = torch.nn.functional.binary_cross_entropy_with_logits(logits, exceed, reduction="none")
    assert torch.allclose(_loss(logits, counts, AutoencoderConfig(loss="ordinal")), cells.mean())
    weighted = _loss(logits, counts, AutoencoderConfig(loss="ordinal", nonzero_weight=3.0))
    rows = torch.tensor([1.0, 3.0, 3.0]).view(1, 3, 1)
    assert torch.allclose(weighted, (cells * rows).mean())


def test_ordinal_thermometer_model_trains_saves_and_decodes_its_own_codes(splits, vocab, tmp_path):
    cfg = TINY.model_copy(update={"loss": "ordinal", "input_code": "thermometer", "nonzero_weight": 1.0})
    model, history, metrics = train_autoencoder(splits["train"], splits["val"], vocab, cfg)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert metrics["train"]["exact"] > 0.1
    assert reconstruction_metrics(model, splits["test"], vocab)["present_element_accuracy"] > 0.3
    bounds = latent_bounds(model, splits["train"], vocab)
    save_autoencoder(tmp_path, model, vocab, cfg, bounds, metrics, history)
    loaded = load_autoencoder(tmp_path)
    assert loaded.cfg.loss == "ordinal" and loaded.model.input_code == "thermometer"
    formulas = [_formula(c) for c in splits["train"][:200]]
    z = loaded.encode_formulas(formulas)
    with torch.no_grad():
        expected = model.encode(model.inputs(torch.as_tensor(vocab.counts_matrix(splits["train"][:200]))))
    np.testing.assert_array_equal(z, expected.numpy())
    # the campaigns' decode path (probabilities -> argmax per row) agrees with the training metrics
    decoded = loaded.decode_latents(z).counts
    right = (decoded == vocab.counts_matrix(splits["train"][:200])).all(axis=1).mean()
    assert right == pytest.approx(reconstruction_metrics(model, splits["train"][:200], vocab)["exact"])
