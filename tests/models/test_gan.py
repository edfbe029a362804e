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
    SlotGenerator,
    Trims,
    _sample_chunk,
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


# ---------------------------------------------------------------------------------------------
# generator_design: slots
SLOTS = TINY.model_copy(update={"generator_design": "slots", "slots": 4})


def test_default_design_is_the_element_row_generator(training):
    _, vocab, _ = training
    assert GanConfig().generator_design == "matrix"
    generator, _ = build_networks(TINY, vocab)
    assert type(generator) is Generator


def test_slot_generator_builds_one_hot_compositions_of_1_to_slots_elements(training):
    _, vocab, _ = training
    generator, critic = build_networks(SLOTS, vocab)
    assert isinstance(generator, SlotGenerator) and generator.slots == 4
    rng = torch.Generator().manual_seed(0)
    fake = generator.fake(generator.noise(400, rng), rng)
    assert fake.shape == (400, *vocab.shape)
    values = fake.detach()
    assert set(values.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(values.sum(-1), torch.ones(400, vocab.shape[0]))
    n_present = (values[:, :, 0] == 0).sum(1)
    # min_slots = 2: never fewer than two elements; an untrained generator seldom stops early
    assert n_present.min() >= 2 and n_present.max() <= 4
    assert (n_present == 4).float().mean() > 0.8
    critic(fake).sum().backward()  # straight-through: every part of the generator gets a gradient
    for name, p in generator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(TypeError):
        generator(generator.noise(2))


def test_slot_generator_temperature_zero_ignores_the_draws(training):
    _, vocab, _ = training
    generator, _ = build_networks(SLOTS, vocab)
    noise = generator.noise(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        cold = [generator.fake(noise, torch.Generator().manual_seed(s), temperature=0.0) for s in (1, 2)]
        warm = [generator.fake(noise, torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(cold[0], cold[1]) and not torch.equal(warm[0], warm[1])


@pytest.fixture(scope="module")
def trained_slots(training):
    compositions, vocab, known = training
    cfg = SLOTS.model_copy(update={"epochs": 25, "n_critic": 2})
    return train_gan(compositions, vocab, cfg, known_formulas=known, progress=False)


def test_slot_training_is_deterministic_and_round_trips(trained_slots, training, tmp_path):
    compositions, vocab, known = training
    generator, critic, history = trained_slots
    cfg = SLOTS.model_copy(update={"epochs": 1})
    a = train_gan(compositions[:500], vocab, cfg, progress=False)[0]
    b = train_gan(compositions[:500], vocab, cfg, progress=False)[0]
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    first = pd.concat(sample_formulas(generator, vocab, 1500, seed=7, chunk_size=600), ignore_index=True)
    # the second chunk drawn on its own (as a resumed generate stage does) is the same
    alone = _sample_chunk(generator, vocab, 7, 1, 600, 600)
    pd.testing.assert_frame_equal(first.iloc[600:1200].reset_index(drop=True), alone)
    bundle = load_gan(save_gan(tmp_path / "gan", generator, critic, vocab, SLOTS, history, known))
    assert isinstance(bundle.generator, SlotGenerator) and bundle.config.generator_design == "slots"
    loaded = pd.concat(
        sample_formulas(bundle.generator, bundle.vocab, 1500, seed=7, chunk_size=600), ignore_index=True
    )
    pd.testing.assert_frame_equal(first, loaded)
    assert first["formula"].notna().all() and first["n_elements"].between(2, 4).all()


def test_slot_training_learns_the_data_sizes_and_beats_the_untrained_generator(trained_slots, training):
    compositions, vocab, known = training
    generator, _, history = trained_slots
    untrained, _ = build_networks(SLOTS, vocab)
    before = pd.concat(sample_formulas(untrained, vocab, 2000, seed=3))
    after = pd.concat(sample_formulas(generator, vocab, 2000, seed=3))
    sizes = np.arange(1, 6)

    def size_shares(n_elements) -> np.ndarray:
        return np.array([(np.asarray(n_elements) == k).mean() for k in sizes])

    data = size_shares([len(c) for c in compositions])
    gap_before = 0.5 * np.abs(size_shares(before["n_elements"]) - data).sum()
    gap_after = 0.5 * np.abs(size_shares(after["n_elements"]) - data).sum()
    # the number of elements is learnt: its distribution moves toward the data's (total variation)
    assert data[0] == 0 and gap_after < 0.75 * gap_before
    q_before = sample_quality(untrained, vocab, 2000, seed=3, known_formulas=known)
    q_after = sample_quality(generator, vocab, 2000, seed=3, known_formulas=known)
    assert q_after["validity_rate"] > q_before["validity_rate"] + 0.1
    assert q_after["decodable_rate"] == 1.0 and q_after["novelty"] > 0.5


def test_slot_design_refuses_the_element_row_losses(training):
    compositions, vocab, _ = training
    for key in ("entropy_weight", "diversity_weight"):
        with pytest.raises(ValueError, match="slots"):
            train_gan(compositions[:200], vocab, SLOTS.model_copy(update={key: 1.0}), progress=False)


def test_slot_options_min_slots_and_relaxation(training):
    _, vocab, _ = training
    n_elements, n_counts = vocab.shape
    with pytest.raises(ValueError, match="min_slots"):
        SlotGenerator(4, n_elements, n_counts, hidden=[8], slots=2, min_slots=3)
    torch.manual_seed(0)
    one = SlotGenerator(4, n_elements, n_counts, hidden=[8], slots=3, min_slots=1)
    with torch.no_grad():  # make "stop" the likeliest pick: with min_slots 1 most samples hold one element
        one.pick.bias[-1] = 20.0
    rng = torch.Generator().manual_seed(0)
    sizes = (one.fake(one.noise(200, rng), rng).detach()[:, :, 0] == 0).sum(1)
    assert (sizes == 1).all()
    # relaxation changes the gradient only: same draws, other gradients
    relaxed = SlotGenerator(4, n_elements, n_counts, hidden=[8], slots=3, relaxation=0.5)
    plain = SlotGenerator(4, n_elements, n_counts, hidden=[8], slots=3)
    plain.load_state_dict(relaxed.state_dict())
    critic = Critic(n_elements, n_counts, [8])
    grads = []
    outputs = []
    for generator in (relaxed, plain):
        rng = torch.Generator().manual_seed(1)
        fake = generator.fake(generator.noise(64, rng), rng)
        critic(fake).sum().backward()
        outputs.append(fake.detach())
        grads.append(generator.pick.weight.grad.clone())
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(grads[0], grads[1])


def test_generator_ema_returns_the_averaged_weights_without_changing_training(training):
    compositions, vocab, _ = training
    cfg = SLOTS.model_copy(update={"epochs": 2})
    _, critic, _ = plain = train_gan(compositions[:600], vocab, cfg, progress=False)
    averaged = train_gan(
        compositions[:600], vocab, cfg.model_copy(update={"generator_ema": 0.9}), progress=False
    )
    # the average is only read: the training run (and so the critic) is the same
    for key, value in critic.state_dict().items():
        assert torch.equal(value, averaged[1].state_dict()[key])
    assert any(
        not torch.equal(value, averaged[0].state_dict()[key]) for key, value in plain[0].state_dict().items()
    )
    # a decay of ~0 follows the last weights
    follow = train_gan(
        compositions[:600], vocab, cfg.model_copy(update={"generator_ema": 1e-9}), progress=False
    )
    for key, value in plain[0].state_dict().items():
        assert torch.allclose(value, follow[0].state_dict()[key], atol=1e-6)


def _track(samples: list[dict[str, int]], elements: list[str], slots: int, balance: bool):
    """A tracker fed the compositions ``samples`` element by element (the validity check's chemistry)."""
    from agd.chem.validity import ValidityChecker
    from agd.models.gan import _ChargeTracker, _eneg_ranks, _state_table

    data = [ValidityChecker().element(e) for e in elements]
    states, known = _state_table([d.oxidation_states for d in data])
    rank = None
    if balance:
        rank, has_eneg = _eneg_ranks([d.electronegativity for d in data])
        known &= has_eneg.unsqueeze(-1)
    tracker = _ChargeTracker(states, known, 7, slots, len(samples), rank)
    for slot in range(slots):
        element = torch.zeros(len(samples), dtype=torch.long)
        count = torch.ones(len(samples), dtype=torch.long)
        rows = torch.zeros(len(samples), dtype=torch.bool)
        for b, c in enumerate(samples):
            items = list(c.items())
            if slot < len(items):
                element[b] = elements.index(items[slot][0])
                count[b], rows[b] = items[slot][1], True
        tracker.add(element, count, rows)
    return tracker


def test_charge_tracker_agrees_with_the_validity_check(training):
    """The generator's running charge bookkeeping says 'neutral' exactly where smact's check does."""
    from agd.chem.validity import ValidityChecker

    compositions, vocab, _ = training
    checker = ValidityChecker()
    rng = np.random.default_rng(0)
    # real (valid) formulas and random ones (mostly not neutral), up to 4 elements
    samples = [dict(list(c.items())[:4]) for c in compositions[:150]]
    for _ in range(250):
        picks = rng.choice(len(vocab.elements), size=rng.integers(2, 5), replace=False)
        samples.append({vocab.elements[i]: int(rng.integers(1, 8)) for i in picks})
    samples = [c for c in samples if max(c.values()) <= 7]
    tracker = _track(samples, list(vocab.elements), 4, balance=False)
    expected = checker.check_counts(samples)["charge_neutral"].to_numpy()
    assert 0.2 < expected.mean() < 0.8  # both kinds are present
    np.testing.assert_array_equal(tracker.neutral().numpy(), expected)


def test_balance_tracker_agrees_with_smacts_pauling_test(training):
    """With electronegativity ranks the tracker says 'can be valid' exactly where the validity check
    (smact's neutral_ratios and pauling_test) says valid: for whole compositions, and for every
    element and count that could complete a partial one."""
    from agd.chem.validity import ValidityChecker

    _, vocab, _ = training
    checker = ValidityChecker()
    elements = list(vocab.elements)
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(1500):
        picks = rng.choice(len(elements), size=rng.integers(2, 6), replace=False)
        samples.append({elements[i]: int(rng.integers(1, 8)) for i in picks})
    checked = checker.check_counts(samples)
    valid, neutral = checked["valid"].to_numpy(), checked["charge_neutral"].to_numpy()
    assert 0.1 < valid.mean() < neutral.mean() - 0.05  # neutral but unbalanced rows are among them
    np.testing.assert_array_equal(_track(samples, elements, 5, balance=True).neutral().numpy(), valid)
    np.testing.assert_array_equal(_track(samples, elements, 5, balance=False).neutral().numpy(), neutral)

    partial = [dict(list(c.items())[: int(rng.integers(1, 4))]) for c in samples[:40]]
    completes = _track(partial, elements, 3, balance=True).completions().numpy()
    extended, where = [], []
    for b, c in enumerate(partial):
        for e, symbol in enumerate(elements):
            if symbol not in c:
                for n in range(1, 8):
                    extended.append({**c, symbol: n})
                    where.append((b, e, n - 1))
    expected = checker.check_counts(extended)["valid"].to_numpy()
    assert 0.05 < expected.mean() < 0.95
    np.testing.assert_array_equal(completes[tuple(np.array(where).T)], expected)


def test_charge_guide_valid_makes_samples_valid_and_round_trips(training, tmp_path):
    from agd.chem.validity import ValidityChecker
    from agd.config import ValidityConfig

    compositions, vocab, known = training
    checker = ValidityChecker()
    rates = {}
    for guide in ("mask", "valid"):
        generator, _ = build_networks(SLOTS.model_copy(update={"charge_guide": guide}), vocab)
        frame = pd.concat(sample_formulas(generator, vocab, 1500, seed=3))
        rates[guide] = checker.check(frame["formula"])["valid"].mean()
    # untrained: the mask makes samples neutral, the balance guide makes them valid (bar the rows
    # whose last slot can no longer make them valid)
    assert rates["mask"] < 0.8 and rates["valid"] > 0.95
    cfg = SLOTS.model_copy(update={"charge_guide": "valid", "epochs": 2})
    generator, critic, history = train_gan(compositions[:600], vocab, cfg, progress=False)
    first = pd.concat(sample_formulas(generator, vocab, 800, seed=7))
    assert checker.check(first["formula"])["valid"].mean() > 0.95
    bundle = load_gan(save_gan(tmp_path / "gan", generator, critic, vocab, cfg, history, known))
    assert torch.equal(bundle.generator.eneg_rank, generator.eneg_rank)
    pd.testing.assert_frame_equal(
        first, pd.concat(sample_formulas(bundle.generator, bundle.vocab, 800, seed=7))
    )
    with pytest.raises(ValueError, match="use_pauling_test"):
        build_networks(cfg, vocab, ValidityConfig(use_pauling_test=False))


def test_charge_guide_mask_makes_samples_neutral_and_round_trips(training, tmp_path):
    from agd.chem.validity import ValidityChecker

    compositions, vocab, known = training
    with pytest.raises(ValueError, match="slots"):
        GanConfig(charge_guide="mask")
    checker = ValidityChecker()
    neutral = {}
    for guide in ("off", "input", "mask"):
        generator, _ = build_networks(SLOTS.model_copy(update={"charge_guide": guide}), vocab)
        frame = pd.concat(sample_formulas(generator, vocab, 1500, seed=3))
        neutral[guide] = checker.check(frame["formula"])["charge_neutral"].mean()
    # untrained: the mask alone makes nearly every sample neutral; without it about a third are
    assert neutral["off"] < 0.6 and neutral["input"] < 0.6 and neutral["mask"] > 0.9
    cfg = SLOTS.model_copy(update={"charge_guide": "mask", "epochs": 2})
    generator, critic, history = train_gan(compositions[:600], vocab, cfg, progress=False)
    assert generator.completion_weight.abs().sum() > 0  # the learnt bonuses moved
    first = pd.concat(sample_formulas(generator, vocab, 800, seed=7))
    bundle = load_gan(save_gan(tmp_path / "gan", generator, critic, vocab, cfg, history, known))
    assert torch.equal(bundle.generator.oxidation_states, generator.oxidation_states)
    pd.testing.assert_frame_equal(
        first, pd.concat(sample_formulas(bundle.generator, bundle.vocab, 800, seed=7))
    )
