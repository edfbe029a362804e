"""Campaigns that search the generator's candidates (``search: candidates``) on tiny real models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import agd.active.library as library_module
from agd.active.acquisition import BatchOptimizer
from agd.active.campaign import INITIAL, REGISTERED, Campaign, CampaignSpec, LatentChemistry
from agd.active.experiments import draw_initial, run_experiments
from agd.active.library import CandidateLibrary, LibraryChemistry, LibrarySource, load_library
from agd.chem.validity import ValidityChecker
from agd.config import AcquisitionConfig, CampaignConfig, ExperimentSpec, params_from_dict
from agd.models.autoencoder import load_autoencoder
from agd.models.oracle import load_oracle
from tests.active.test_campaign import ACQ, TIMING

LIBRARY_ACQ = ACQ | {"n_random": 64, "n_local": 120, "local_centres": 6, "n_refine": 0}


def _cfg(**changes) -> CampaignConfig:
    base = {"batch_size": 5, "random_draws": 3000, "search": "candidates", "acquisition": LIBRARY_ACQ}
    return CampaignConfig.model_validate(base | changes)


@pytest.fixture(scope="module")
def candidates(campaign_models, tmp_path_factory):
    """A candidate table: the prepared test split's formulas (valid per smact or not) and three junk rows."""
    prepared = pd.read_parquet(campaign_models.prepared)
    formulas = prepared.loc[prepared["split"] == "test", "reduced_formula"].tolist()
    checked = ValidityChecker().check(formulas)
    table = pd.DataFrame({"reduced_formula": formulas, "valid": checked["valid"].to_numpy(dtype=bool)})
    table = pd.concat(
        [table, pd.DataFrame({"reduced_formula": ["Xx2O", "NaCl", None], "valid": [True, True, False]})]
    )
    path = tmp_path_factory.mktemp("candidates") / "candidates.parquet"
    table.to_parquet(path, index=False)
    return path, table


@pytest.fixture(scope="module")
def parts(campaign_models, candidates):
    autoencoder = load_autoencoder(campaign_models.autoencoder)
    library = load_library(candidates[0], autoencoder, progress=False)
    chemistry = LibraryChemistry(autoencoder, ValidityChecker(), library)
    prepared = pd.read_parquet(campaign_models.prepared)
    initial = draw_initial(prepared, ExperimentSpec(name="T", n_initial=40, budget=15), seed=3)
    return chemistry, load_oracle(campaign_models.oracle), initial


def _campaign(parts, path, method="bo", cfg=None, seed=7) -> Campaign:
    chemistry, oracle, initial = parts
    spec = CampaignSpec(f"T-{method}", "T", 0, method, 15, 2.576, seed)
    return Campaign(spec, cfg or _cfg(), chemistry, oracle, initial, path)


def _cut_and_resume(parts, path, cfg: CampaignConfig) -> pd.DataFrame:
    """A campaign stopped after its first round, then run again to its end: the resumed table."""

    class Stop(Exception):
        pass

    def stop(round_, _table):
        if round_ == 1:
            raise Stop

    with pytest.raises(Stop):
        _campaign(parts, path, cfg=cfg).run(on_round=stop, progress=False)
    return _campaign(parts, path, cfg=cfg).run(progress=False)


def test_nearest_members_match_a_full_sort_across_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1000, 6)).astype(np.float32)
    library = CandidateLibrary(np.array([f"F{i}" for i in range(1000)], dtype=object), latents, "x")
    centres = rng.standard_normal((3, 6))
    monkeypatch.setattr(library_module, "_NEAREST_BLOCK", 128)  # the search runs over eight blocks
    got = library.nearest(centres, 7)
    dist = np.linalg.norm(latents[None, :, :] - centres[:, None, :].astype(np.float32), axis=2)
    expected = pd.unique(np.argsort(dist, axis=1, kind="stable")[:, :7].ravel())
    assert np.array_equal(got, expected)
    # members are found again exactly; a nudged latent is no member
    assert np.array_equal(library.lookup(latents[[5, 900]]), [5, 900])
    nudged = latents[[5]].astype(np.float64) + 1e-3
    assert library.lookup(nudged).tolist() == [-1]


def test_the_library_keeps_valid_encodable_candidates_and_is_cached(campaign_models, candidates, tmp_path):
    path, table = candidates
    autoencoder = load_autoencoder(campaign_models.autoencoder)
    library = load_library(path, autoencoder, cache_dir=tmp_path, progress=False)
    valid = table[table["valid"]]["reduced_formula"].tolist()
    fits = {f for f, why in zip(valid, autoencoder.check_formulas(valid), strict=True) if why is None}
    # 'Xx2O' has no element Xx, so it does not fit the autoencoder; the invalid rows are left out
    assert "Xx2O" in valid and "Xx2O" not in fits and len(fits) > 500
    assert set(library.formulas) == fits and len(library) == len(fits)
    assert np.allclose(library.latents, autoencoder.encode_formulas(list(library.formulas)), atol=1e-6)
    (tmp_path / "library-0000.npz").write_bytes(b"stale")  # another table's library: pruned below
    (cached,) = [p for p in tmp_path.glob("library-*.npz") if p.name != "library-0000.npz"]
    again = load_library(path, autoencoder, cache_dir=tmp_path, progress=False)
    assert again.digest == library.digest and np.array_equal(again.latents, library.latents)
    assert list(again.formulas) == list(library.formulas)
    every = load_library(path, autoencoder, valid_only=False, cache_dir=tmp_path, progress=False)
    assert every.digest != library.digest and len(every) > len(library)
    assert [p.name for p in tmp_path.glob("library-*.npz")] == [f"library-{every.digest}.npz"]
    with pytest.raises(FileNotFoundError, match="agd generate"):
        load_library(tmp_path / "missing.parquet", autoencoder)


def test_a_library_campaign_suggests_only_new_valid_members(parts, tmp_path):
    chemistry = parts[0]
    table = _campaign(parts, tmp_path / "a.parquet").run(progress=False)
    suggested = table[table["round"] > 0]
    assert len(suggested) == 15 and (suggested["fate"] == REGISTERED).all()
    members = set(chemistry.library.formulas)
    assert set(suggested["formula"]) <= members and suggested["valid"].all()
    assert suggested["reduced_formula"].is_unique
    assert not suggested["reduced_formula"].isin(table.loc[table["fate"] == INITIAL, "reduced_formula"]).any()
    # each suggestion's latent is its member's latent: the formula was looked up, not decoded
    index = chemistry.library.lookup(np.stack(suggested["latent"].to_numpy()))
    assert (index >= 0).all()
    assert list(chemistry.library.formulas[index]) == suggested["formula"].tolist()
    assert np.isfinite(suggested["acquisition"]).all()


def test_a_library_campaign_resumes_to_the_same_table_and_its_control_draws_members(parts, tmp_path):
    whole = _campaign(parts, tmp_path / "whole.parquet").run(progress=False)
    resumed = _cut_and_resume(parts, tmp_path / "cut.parquet", _cfg())
    a, b = whole.drop(columns=TIMING), resumed.drop(columns=TIMING)
    assert a.drop(columns="latent").equals(b.drop(columns="latent"))

    control = _campaign(parts, tmp_path / "r.parquet", method="random").run(progress=False)
    picked = control[control["round"] > 0]
    assert len(picked) == 15 and set(picked["formula"]) <= set(parts[0].library.formulas)
    assert picked["acquisition"].isna().all()
    assert set(picked["formula"]) != set(whole.loc[whole["round"] > 0, "formula"])


def test_search_and_chemistry_must_agree(parts, campaign_models, tmp_path):
    chemistry, oracle, initial = parts
    spec = CampaignSpec("T-bo", "T", 0, "bo", 5, 2.576, 1)
    with pytest.raises(ValueError, match="search: candidates"):
        Campaign(spec, _cfg(search="latent"), chemistry, oracle, initial, tmp_path / "x.parquet")
    plain = LatentChemistry(chemistry.autoencoder, chemistry.checker)
    with pytest.raises(ValueError, match="search: candidates"):
        Campaign(spec, _cfg(), plain, oracle, initial, tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="batch"):
        _cfg(acquisition=LIBRARY_ACQ | {"method": "stock"})


def test_the_optimiser_finds_the_best_member_of_a_finite_set():
    """On a smooth function over a finite set, the library pool walks to the best member within a few rounds."""
    rng = np.random.default_rng(1)
    points = rng.uniform(-1, 1, size=(4000, 3)).astype(np.float32)
    values = -np.sum((points.astype(np.float64) - 0.6) ** 2, axis=1)
    library = CandidateLibrary(np.arange(4000).astype(str).astype(object), points, "f")
    start = rng.choice(4000, 10, replace=False)
    cfg = AcquisitionConfig(n_random=100, n_local=200, local_centres=5, n_refine=0, kappa=1.0, seed=0)
    bounds = np.stack([points.min(axis=0), points.max(axis=0)], axis=1)
    optimizer = BatchOptimizer.from_points(
        bounds, points[start], values[start], cfg, source=LibrarySource(library)
    )
    for _ in range(8):
        x = optimizer.suggest(10).x
        index = library.lookup(x)
        assert (index >= 0).all()  # every suggestion is a member
        optimizer.register(x, values[index])
    assert optimizer.registered_y.max() == values.max()


def test_the_straddle_labels_the_boundary_where_ucb_labels_the_top():
    """On a finite set, the straddle's picks lie near its level; UCB's climb to the largest values."""
    rng = np.random.default_rng(2)
    points = rng.uniform(-1, 1, size=(4000, 3)).astype(np.float32)
    values = 4.0 * points[:, 0].astype(np.float64) + np.sin(3.0 * points[:, 1])  # from -5 to 5
    library = CandidateLibrary(np.arange(4000).astype(str).astype(object), points, "s")
    start = rng.choice(4000, 20, replace=False)
    bounds = np.stack([points.min(axis=0), points.max(axis=0)], axis=1)
    picked = {}
    for function in ("straddle", "ucb"):
        cfg = AcquisitionConfig(
            function=function, level=3.0, kappa=1.0, n_random=100, n_local=200, local_centres=5, n_refine=0
        )
        optimizer = BatchOptimizer.from_points(
            bounds, points[start], values[start], cfg, source=LibrarySource(library)
        )
        for _ in range(6):
            x = optimizer.suggest(10).x
            optimizer.register(x, values[library.lookup(x)])
        picked[function] = optimizer.registered_y[20:]
    near = {f: float(np.mean(np.abs(y - 3.0) < 0.5)) for f, y in picked.items()}
    assert near["straddle"] > 0.6 and near["straddle"] > 2 * near["ucb"]
    assert picked["ucb"].mean() > picked["straddle"].mean()
    with pytest.raises(ValueError, match="batch"):
        from agd.active.acquisition import make_optimizer

        make_optimizer(bounds, AcquisitionConfig(function="straddle", method="stock"))


def test_experiments_in_worker_processes_equal_one_process_and_share_the_cached_library(
    campaign_models, candidates, tmp_path
):
    raw = {
        "experiments": {
            "repeats": 1,
            "random_control": True,
            "experiments": [{"name": "Exp2", "n_initial": 30, "budget": 10}],
            "kappa_sweep": [],
            "campaign": {"batch_size": 5, "search": "candidates", "acquisition": LIBRARY_ACQ},
        },
    }
    args = (campaign_models.prepared, campaign_models.autoencoder, campaign_models.oracle)
    tables = {}
    for jobs in (1, 2):
        params = params_from_dict(raw | {"experiments": raw["experiments"] | {"jobs": jobs}})
        out = tmp_path / f"jobs{jobs}"
        run_experiments(*args, out, params, track=False, progress=False, candidates=candidates[0])
        assert len(list((out / "library").glob("library-*.npz"))) == 1
        tables[jobs] = pd.read_parquet(out / "samples.parquet").drop(columns=TIMING + ["latent"])
    assert tables[1].equals(tables[2])
    found = tables[1][tables[1]["round"] > 0]
    assert set(found["campaign"]) == {"Exp2-bo", "Exp2-random"}
    assert set(found["formula"]) <= set(candidates[1]["reduced_formula"].dropna())
    params = params_from_dict(raw)
    with pytest.raises(ValueError, match="--candidates"):
        run_experiments(*args, tmp_path / "none", params, track=False, progress=False)


FOREST = {"surrogate": "forest", "surrogate_forest": {"n_estimators": 20}}


def test_a_forest_campaign_suggests_new_valid_members_and_resumes_to_the_same_table(parts, tmp_path):
    chemistry = parts[0]
    cfg = _cfg(**FOREST)
    whole = _campaign(parts, tmp_path / "whole.parquet", cfg=cfg).run(progress=False)
    suggested = whole[whole["round"] > 0]
    assert len(suggested) == 15 and (suggested["fate"] == REGISTERED).all() and suggested["valid"].all()
    assert suggested["reduced_formula"].is_unique
    assert not suggested["reduced_formula"].isin(whole.loc[whole["fate"] == INITIAL, "reduced_formula"]).any()
    index = chemistry.library.lookup(np.stack(suggested["latent"].to_numpy()))
    assert (index >= 0).all() and list(chemistry.library.formulas[index]) == suggested["formula"].tolist()
    # UCB over the trees: the value at which each was picked is mean + kappa * spread
    assert np.allclose(suggested["acquisition"], suggested["gp_mean"] + 2.576 * suggested["gp_std"])
    assert (suggested["gp_std"] > 0).any()
    resumed = _cut_and_resume(parts, tmp_path / "cut.parquet", cfg)
    assert whole.drop(columns=TIMING + ["latent"]).equals(resumed.drop(columns=TIMING + ["latent"]))
    gp = _campaign(parts, tmp_path / "gp.parquet").run(progress=False)
    assert set(gp.loc[gp["round"] > 0, "formula"]) != set(suggested["formula"])
    # the random control of a forest experiment draws members as any control does
    control = _campaign(parts, tmp_path / "r.parquet", method="random", cfg=cfg).run(progress=False)
    drawn = control[control["round"] > 0]
    assert len(drawn) == 15 and set(drawn["formula"]) <= set(chemistry.library.formulas)
    assert drawn["acquisition"].isna().all()


def test_the_forest_ranks_the_library_by_its_prediction_and_beats_a_random_pick(parts):
    """With kappa 0 the picks are the members of largest forest mean; those have larger oracle gaps than
    the library's average (the forest learned something from 40 labels)."""
    from agd.active.surrogate import ForestOptimizer

    chemistry, oracle, initial = parts
    library = chemistry.library
    x = chemistry.autoencoder.encode_formulas(initial["reduced_formula"].tolist())
    forest = _cfg(**FOREST).surrogate_forest
    acq = AcquisitionConfig(kappa=0.0, seed=5)
    args = (
        None,
        library,
        forest,
        acq,
        x,
        initial["band_gap"].to_numpy(),
        initial["reduced_formula"].tolist(),
    )
    optimizer = ForestOptimizer(*args)
    picked = optimizer.suggest(10)
    features, ok = library.features()
    mean, _ = optimizer.predict(optimizer.fit(), features)  # the same seed: the same forest
    mean[~ok | np.isin(library.formulas, initial["reduced_formula"])] = -np.inf
    assert np.array_equal(library.lookup(picked.x), np.argsort(-mean, kind="stable")[:10])
    assert np.allclose(picked.mean, picked.acquisition)
    gaps = oracle.label(list(library.formulas)).gaps
    assert np.nanmean(gaps[library.lookup(picked.x)]) > np.nanmean(gaps) + 0.5
    # registering the picks takes them out of the next round, and a non-member cannot be registered
    optimizer.register(picked.x, gaps[library.lookup(picked.x)])
    again = optimizer.suggest(10)
    assert not set(library.lookup(again.x)) & set(library.lookup(picked.x)) and len(optimizer) == len(x) + 10
    with pytest.raises(ValueError, match="not library members"):
        optimizer.register(x[:1] + 1.0, [1.0])


def test_the_forest_surrogate_needs_the_library_and_leaves_gp_fingerprints_alone(parts):
    with pytest.raises(ValueError, match="search: candidates"):
        CampaignConfig.model_validate({"surrogate": "forest"})
    initial = parts[2]
    spec = CampaignSpec("T-bo", "T", 0, "bo", 5, 2.576, 1)
    gp = spec.fingerprint(_cfg(), initial, "lib")
    # a GP campaign's fingerprint ignores the forest's settings (stored tables stay valid) ...
    assert spec.fingerprint(_cfg(surrogate_forest={"n_estimators": 7}), initial, "lib") == gp
    # ... and a forest campaign's depends on them
    forest = spec.fingerprint(_cfg(**FOREST), initial, "lib")
    assert forest != gp
    assert (
        spec.fingerprint(_cfg(**FOREST | {"surrogate_forest": {"n_estimators": 7}}), initial, "lib") != forest
    )


def test_a_shortlist_of_the_whole_library_changes_nothing_and_a_short_one_resumes_exactly(parts, tmp_path):
    """shortlist >= the library is the full ranking; a short list, refreshed every 5 points, is a pure
    function of the registered points: a resumed campaign equals an uninterrupted one."""
    chemistry = parts[0]
    full = _campaign(parts, tmp_path / "full.parquet", cfg=_cfg(**FOREST)).run(progress=False)
    whole_library = _cfg(**FOREST | {"surrogate_forest": {"n_estimators": 20, "shortlist": 10**6}})
    same = _campaign(parts, tmp_path / "same.parquet", cfg=whole_library).run(progress=False)
    assert full.drop(columns=TIMING + ["latent"]).equals(same.drop(columns=TIMING + ["latent"]))

    # one list of 12 for the whole budget of 15: rounds 1-2 take from it, round 3 finds it short
    short = _cfg(**FOREST | {"surrogate_forest": {"n_estimators": 20, "shortlist": 12, "refresh": 15}})
    whole = _campaign(parts, tmp_path / "whole.parquet", cfg=short).run(progress=False)
    resumed = _cut_and_resume(parts, tmp_path / "cut.parquet", short)
    assert whole.drop(columns=TIMING + ["latent"]).equals(resumed.drop(columns=TIMING + ["latent"]))
    assert (whole["round"] > 0).sum() == 15 and whole["round"].max() == 3
    assert set(whole["formula"]) != set(full["formula"])  # a stale list is a real restriction
    # the picks of rounds 1-2 lie in the list: the best 12 unregistered members by the initial forest
    from agd.active.surrogate import ForestOptimizer

    initial = whole[whole["round"] == 0]
    suggested = whole[whole["round"] > 0]
    x, y = np.stack(whole["latent"].to_numpy()), whole["registered_value"].to_numpy()
    acq = AcquisitionConfig.model_validate(LIBRARY_ACQ | {"seed": 7})
    optimizer = ForestOptimizer(
        None, chemistry.library, short.surrogate_forest, acq, x[: len(initial)], y[: len(initial)],
        initial["reduced_formula"].tolist(), n_initial=len(initial),
    )  # fmt: skip
    listed = set(optimizer.shortlist())
    picked = chemistry.library.lookup(np.stack(suggested["latent"].to_numpy()))
    rounds = suggested["round"].to_numpy()
    assert len(listed) == 12 and set(picked[rounds <= 2]) <= listed
    assert not set(picked[rounds == 3]) <= listed  # the short round ranked the whole library


def test_the_shortlist_settings_stay_out_of_a_full_ranking_fingerprint(parts):
    spec, initial = CampaignSpec("T-bo", "T", 0, "bo", 5, 2.576, 1), parts[2]
    full = spec.fingerprint(_cfg(**FOREST), initial, "lib")
    refresh_only = _cfg(**FOREST | {"surrogate_forest": {"n_estimators": 20, "refresh": 7}})
    assert spec.fingerprint(refresh_only, initial, "lib") == full  # no shortlist: refresh is moot
    listed = _cfg(**FOREST | {"surrogate_forest": {"n_estimators": 20, "shortlist": 50}})
    assert spec.fingerprint(listed, initial, "lib") != full
