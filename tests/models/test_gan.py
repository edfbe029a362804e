"""The composition WGAN-GP: training, sampling, trims, determinism and the resumable generate stage.

Tiny real configurations on a slice of the shared ICSD-like formula list; one thread so timings do not
depend on how busy the machine is.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from agd.chem.encoding import Vocabulary
from agd.chem.formula import formula_key, parse_formula, reduce_counts
from agd.config import GanConfig, GenerateConfig
from agd.models.gan import (
    CANDIDATE_COLUMNS,
    Critic,
    Generator,
    Trims,
    build_networks,
    generate_candidates,
    load_gan,
    read_training_compositions,
    sample_formulas,
    sample_quality,
    save_gan,
    train_gan,
)
from tests.conftest import read_shared_csv

TINY = GanConfig(
    epochs=6,
    batch_size=64,
    n_critic=2,
    noise_dim=16,
    generator_hidden=[64],
    critic_hidden=[64],
    learning_rate=2e-3,
    quality_samples=0,
)


@pytest.fixture(scope="module")
def training(shared_data):
    frame = read_shared_csv(shared_data / "formulas_icsd_in_mp_synthnn.csv").head(3000)
    compositions, summary = read_training_compositions(frame, TINY)
    vocab = Vocabulary.from_compositions(compositions, TINY.max_count)
    return compositions, vocab, summary["known_formulas"]


@pytest.fixture(scope="module")
def trained(training):
    compositions, vocab, known = training
    generator, critic, history = train_gan(compositions, vocab, TINY, known_formulas=known, progress=False)
    return generator, critic, history


@pytest.fixture(scope="module")
def gan_dir(tmp_path_factory, trained, training):
    generator, critic, history = trained
    _, vocab, known = training
    return save_gan(tmp_path_factory.mktemp("gan"), generator, critic, vocab, TINY, history, known)


def _fixed_generator(vocab: Vocabulary, counts: dict[str, int]) -> Generator:
    """A generator whose every sample decodes to ``counts`` (zero weights, biases pick the counts)."""
    n_elements, n_counts = vocab.shape
    generator = Generator(4, n_elements, n_counts, hidden=[8])
    with torch.no_grad():
        last = generator.net[-1]
        last.weight.zero_()
        bias = torch.zeros(n_elements, n_counts)
        bias[:, 0] = 50.0
        for element, count in counts.items():
            row = vocab.elements.index(element)
            bias[row, 0], bias[row, count] = 0.0, 50.0
        last.bias.copy_(bias.flatten())
    return generator.eval()


def test_training_data_is_reduced_deduplicated_and_trimmed():
    frame = pd.DataFrame(
        {"formula": ["Fe2O3", "Fe4O6", "NaN", "Fe8O", "LiNaKRbCsO3", "Fe7Ni7O5Cu2", "Xx2", "NaCl2", "Li6O3"]}
    )
    compositions, summary = read_training_compositions(frame, GanConfig(valid_only=False))
    assert compositions == [{"Fe": 2, "O": 3}, {"Na": 1, "N": 1}, {"Na": 1, "Cl": 2}, {"Li": 2, "O": 1}]
    assert summary["dropped"] == {
        "unparsable": 1,
        "duplicate": 1,
        "max_atoms_per_element": 1,
        "max_elements": 1,
        "max_atoms": 1,
        "invalid": 0,
    }
    # novelty is judged against every parsable formula, trimmed or not
    kept = ["Fe2O3", "NaN", "Fe8O", "LiNaKRbCsO3", "Fe7Ni7O5Cu2", "NaCl2", "Li2O"]
    assert set(summary["known_formulas"]) == {formula_key(f) for f in kept}
    valid_only, summary = read_training_compositions(frame, GanConfig(valid_only=True))
    assert {"Na": 1, "Cl": 2} not in valid_only and summary["dropped"]["invalid"] >= 1


def test_network_shapes_and_straight_through_output(training):
    _, vocab, _ = training
    generator, critic = build_networks(TINY, vocab)
    noise = generator.noise(5, torch.Generator().manual_seed(0))
    probs = generator(noise)
    assert probs.shape == (5, *vocab.shape)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(5, vocab.shape[0]))
    fake = generator.fake(noise)
    assert set(fake.detach().unique().tolist()) <= {0.0, 1.0} and torch.equal(
        fake.detach().sum(-1), torch.ones(5, vocab.shape[0])
    )
    critic(fake).sum().backward()  # the straight-through output passes gradients to the generator
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert critic(fake).shape == (5,)
    assert isinstance(generator, Generator) and isinstance(critic, Critic)


def test_losses_and_sample_quality_move_the_right_way(trained, training):
    generator, _, history = trained
    compositions, vocab, known = training
    assert [row["epoch"] for row in history] == list(range(TINY.epochs + 1))
    # the critic learns to tell real from fake: its loss drops below the untrained value
    assert history[-1]["critic_loss"] < history[0]["critic_loss"] - 1.0
    assert max(row["wasserstein"] for row in history[1:]) > history[0]["wasserstein"] + 0.5
    untrained, _ = build_networks(TINY, vocab)
    before = sample_quality(untrained, vocab, 300, seed=3, known_formulas=known)
    after = sample_quality(generator, vocab, 1000, seed=3, known_formulas=known)
    # an untrained generator switches on dozens of elements: nothing within the trims, nothing valid
    assert before["within_trims_rate"] < 0.05 and before["validity_rate"] < 0.05
    assert after["within_trims_rate"] > 0.4 and after["validity_rate"] > 0.15
    assert after["decodable_rate"] > 0.7 and after["novelty"] > 0.5


def test_sampling_streams_chunks_with_consistent_statistics(trained, training):
    generator, _, _ = trained
    _, vocab, _ = training
    chunks = list(sample_formulas(generator, vocab, 2500, seed=1, chunk_size=1000))
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    frame = pd.concat(chunks, ignore_index=True)
    assert frame["sample"].tolist() == list(range(2500))
    for row in frame.dropna(subset=["formula"]).head(300).itertuples():
        counts = parse_formula(row.formula)
        assert row.n_atoms == sum(counts.values()) and row.n_elements == len(counts)
        assert row.max_count == max(counts.values())
        assert row.divisor == math.gcd(*counts.values())
    assert (frame.loc[frame["formula"].isna(), "reason"] == "no element present").all()


def test_fixed_seed_gives_identical_samples_and_training(trained, training):
    generator, _, _ = trained
    compositions, vocab, _ = training
    first = pd.concat(sample_formulas(generator, vocab, 1500, seed=7, chunk_size=600))
    again = pd.concat(sample_formulas(generator, vocab, 1500, seed=7, chunk_size=600))
    other = pd.concat(sample_formulas(generator, vocab, 1500, seed=8, chunk_size=600))
    pd.testing.assert_frame_equal(first, again)
    assert (first["formula"].to_numpy() != other["formula"].to_numpy()).any()
    cfg = TINY.model_copy(update={"epochs": 1})
    a = train_gan(compositions[:500], vocab, cfg, progress=False)
    b = train_gan(compositions[:500], vocab, cfg, progress=False)
    for key, value in a[0].state_dict().items():
        assert torch.equal(value, b[0].state_dict()[key])
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in a[2]] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in b[2]
    ]


def test_save_and_load_round_trip(gan_dir, trained, training):
    generator, _, history = trained
    _, vocab, known = training
    bundle = load_gan(gan_dir)
    assert bundle.vocab == vocab and bundle.config == TINY and bundle.history == history
    assert set(bundle.known_formulas) == set(known)
    a = next(sample_formulas(generator, vocab, 300, seed=2))
    b = next(sample_formulas(bundle.generator, bundle.vocab, 300, seed=2))
    pd.testing.assert_frame_equal(a, b)


def test_generate_candidates_is_trimmed_unique_and_resumable(gan_dir, tmp_path):
    cfg = GenerateConfig(n_samples=3000, chunk_size=1000, metrics_samples=500)
    out = tmp_path / "candidates.parquet"
    metrics = generate_candidates(gan_dir, out, cfg, None, None, "run-1", progress=False)
    table = pd.read_parquet(out)
    assert list(table.columns) == CANDIDATE_COLUMNS
    assert table["reduced_formula"].is_unique and len(table) == metrics["n_unique"] > 0
    assert table["n_sampled"].sum() == metrics["n_within_trims"] <= metrics["n_decodable"] <= 3000
    assert (table["run_id"] == "run-1").all() and (table["source"] == "gan").all()
    # every candidate obeys the trims, judged on its reduced composition
    trims = Trims.from_generate_config(cfg)
    for row in table.itertuples():
        counts = reduce_counts(parse_formula(row.formula))
        assert trims.misfit(counts) is None
        assert (row.n_atoms, row.n_elements, row.max_count) == (
            sum(counts.values()),
            len(counts),
            max(counts.values()),
        )
    both = table["charge_neutral"] & table["electronegativity_balanced"]
    assert (table["valid"] == both & (table["n_elements"] >= 2)).all()  # pure elements are no compounds
    assert 0 <= metrics["quality"]["validity_rate"] <= 1 and metrics["chunks_resumed"] == 0

    parts = tmp_path / "candidates.parts"
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    (parts / "part-00001.parquet").unlink()
    again = generate_candidates(gan_dir, out, cfg, None, None, "run-1", progress=False)
    assert again["chunks_resumed"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(out), table)
    third = generate_candidates(gan_dir, out, cfg, None, None, "run-1", progress=False)
    assert third["chunks_resumed"] == 3
    pd.testing.assert_frame_equal(pd.read_parquet(out), table)
    # another seed invalidates the finished parts instead of mixing them in
    reseeded = generate_candidates(
        gan_dir, out, cfg.model_copy(update={"seed": 1}), None, None, "run-1", progress=False
    )
    assert reseeded["chunks_resumed"] == 0
    assert not pd.read_parquet(out)["reduced_formula"].equals(table["reduced_formula"])


def test_novelty_is_judged_by_reduced_formula(tmp_path):
    vocab = Vocabulary.from_symbols(["Na", "Cl", "K", "O"], 7)
    generator = _fixed_generator(vocab, {"Na": 2, "Cl": 2})
    critic = Critic(*vocab.shape, hidden=[8])
    cfg = TINY.model_copy(update={"noise_dim": 4, "generator_hidden": [8], "critic_hidden": [8]})
    gan_dir = save_gan(tmp_path / "gan", generator, critic, vocab, cfg)
    gen_cfg = GenerateConfig(n_samples=50, chunk_size=20, metrics_samples=50)
    out = tmp_path / "c.parquet"
    known = generate_candidates(gan_dir, out, gen_cfg, None, ["NaCl", "KCl"], "r", progress=False)
    table = pd.read_parquet(out)
    assert table[["formula", "reduced_formula", "n_sampled", "novel", "valid"]].to_dict("records") == [
        {"formula": "Na2Cl2", "reduced_formula": "NaCl", "n_sampled": 50, "novel": False, "valid": True}
    ]
    assert known["n_unique_novel"] == 0 and known["quality"]["novelty"] == 0.0
    assert known["quality"]["uniqueness"] == pytest.approx(1 / 50)
    generate_candidates(gan_dir, out, gen_cfg, None, ["Na3Cl3O", "KCl"], "r", progress=False)
    assert pd.read_parquet(out)["novel"].tolist() == [True]
    with pytest.raises(ValueError, match="known_formulas"):
        generate_candidates(gan_dir, out, gen_cfg, None, None, "r", progress=False)


def test_trims_mask_matches_misfit():
    trims = Trims(max_atoms=20, max_elements=5, max_atoms_per_element=7)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 9, size=(200, 7)) * (rng.random((200, 7)) < 0.5)
    counts = counts[counts.sum(axis=1) > 0]
    mask = trims.mask(counts.sum(axis=1), (counts > 0).sum(axis=1), counts.max(axis=1))
    expected = [trims.misfit({str(i): int(c) for i, c in enumerate(row) if c}) is None for row in counts]
    assert mask.tolist() == expected


def _two_way_generator(vocab: Vocabulary, element: str, p_one: float, temperature: float = 1.0) -> Generator:
    """Every sample has O once; ``element`` is absent or has count 1 with probability ``p_one``."""
    generator = _fixed_generator(vocab, {"O": 1})
    generator.sample_temperature = temperature
    with torch.no_grad():
        bias = generator.net[-1].bias.view(vocab.shape)
        row = vocab.elements.index(element)
        bias[row] = -50.0
        bias[row, 0], bias[row, 1] = math.log(1 - p_one), math.log(p_one)
    return generator


def test_sample_temperature_sharpens_the_count_draws():
    vocab = Vocabulary.from_symbols(["Na", "Cl", "K", "O"], 7)
    n = 4000

    def share_with_k(generator: Generator, **kwargs) -> float:
        frame = pd.concat(sample_formulas(generator, vocab, n, seed=5, chunk_size=1500, **kwargs))
        assert frame["formula"].notna().all()
        return float(frame["formula"].str.contains("K").mean())

    generator = _two_way_generator(vocab, "K", 0.7)
    assert share_with_k(generator) == pytest.approx(0.7, abs=0.03)
    # T = 0.5 draws from p ** 2 renormalised: 0.49 / (0.49 + 0.09)
    assert share_with_k(generator, temperature=0.5) == pytest.approx(0.49 / 0.58, abs=0.03)
    assert share_with_k(generator, temperature=0.0) == 1.0  # the most probable count, always
    # the generator's own setting is the default, and T = 1 reproduces the plain draws exactly
    cold = _two_way_generator(vocab, "K", 0.7, temperature=0.5)
    assert share_with_k(cold) == share_with_k(generator, temperature=0.5)
    plain = pd.concat(sample_formulas(generator, vocab, 500, seed=5))
    pd.testing.assert_frame_equal(
        plain, pd.concat(sample_formulas(generator, vocab, 500, seed=5, temperature=1.0))
    )
    with pytest.raises(ValueError, match="sample_temperature"):
        Generator(4, 4, 8, hidden=[8], sample_temperature=-1.0)


def test_sample_temperature_is_saved_with_the_generator(tmp_path):
    vocab = Vocabulary.from_symbols(["Na", "Cl", "K", "O"], 7)
    cfg = TINY.model_copy(
        update={"noise_dim": 4, "generator_hidden": [8], "critic_hidden": [8], "sample_temperature": 0.0}
    )
    generator, critic = build_networks(cfg, vocab)
    assert generator.sample_temperature == 0.0
    bundle = load_gan(save_gan(tmp_path / "gan", generator, critic, vocab, cfg))
    assert bundle.generator.sample_temperature == 0.0
    # at T = 0 a sample depends on the input noise only, so re-drawing the Gumbel noise changes nothing
    noise = bundle.generator.noise(64, torch.Generator().manual_seed(0))
    a = bundle.generator.fake(noise, torch.Generator().manual_seed(1), temperature=0.0)
    b = bundle.generator.fake(noise, torch.Generator().manual_seed(2), temperature=0.0)
    assert torch.equal(a, b)


def test_entropy_weight_makes_the_generator_rows_confident(training):
    compositions, vocab, _ = training
    cfg = TINY.model_copy(update={"epochs": 8})
    noise = torch.randn(512, cfg.noise_dim, generator=torch.Generator().manual_seed(0))

    def mean_row_entropy(generator: Generator) -> float:
        with torch.no_grad():
            probs = generator(noise)
        return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())

    plain, _, history_plain = train_gan(compositions[:1500], vocab, cfg, progress=False)
    sharp, _, history = train_gan(
        compositions[:1500], vocab, cfg.model_copy(update={"entropy_weight": 5.0}), progress=False
    )
    assert "row_entropy" not in history_plain[-1] and history[-1]["row_entropy"] > 0
    assert mean_row_entropy(sharp) < 0.5 * mean_row_entropy(plain)


def test_diversity_weight_spreads_the_outputs_of_different_noise(training):
    compositions, vocab, _ = training
    cfg = TINY.model_copy(update={"epochs": 4})
    noise = torch.randn(512, cfg.noise_dim, generator=torch.Generator().manual_seed(0))

    def spread(generator: Generator) -> float:
        with torch.no_grad():
            probs = generator(noise)
        return float((probs[:256] - probs[256:]).abs().mean())

    plain, _, history_plain = train_gan(compositions[:1500], vocab, cfg, progress=False)
    diverse, _, history = train_gan(
        compositions[:1500], vocab, cfg.model_copy(update={"diversity_weight": 20.0}), progress=False
    )
    assert "diversity" not in history_plain[-1] and history[-1]["diversity"] > 0
    assert spread(diverse) > 1.2 * spread(plain)
