"""The campaign loop on tiny real models: fates, policies, determinism, resume, MLflow steps, experiments."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from agd.active.acquisition import Quota
from agd.active.campaign import (
    FATES,
    INITIAL,
    REGISTERED,
    Campaign,
    CampaignSpec,
    CampaignStateError,
    LatentChemistry,
    campaign_summary,
    chemical_system,
    round_metrics,
)
from agd.active.experiments import (
    draw_initial,
    kappa_curve,
    plan_campaigns,
    run_experiments,
    settings_key,
)
from agd.chem.validity import ValidityChecker
from agd.config import CampaignConfig, ExperimentsConfig, ExperimentSpec, params_from_dict
from agd.models.autoencoder import load_autoencoder
from agd.models.oracle import load_oracle
from tests.conftest import REPO_ROOT

TIMING = ["gp_fit_s", "acquisition_s", "round_s"]
ACQ = {"n_random": 64, "n_local": 256, "local_centres": 10, "local_radius": (0.5, 1.5), "local_scale": 0.05, "n_refine": 4,
       "refine_maxiter": 10, "accept_chunk": 64, "max_extra_pools": 2}  # fmt: skip


def _cfg(**changes) -> CampaignConfig:
    base = {"batch_size": 5, "random_draws": 3000, "acquisition": ACQ}
    return CampaignConfig.model_validate(base | changes)


@pytest.fixture(scope="module")
def parts(campaign_models):
    chemistry = LatentChemistry(load_autoencoder(campaign_models.autoencoder), ValidityChecker())
    oracle = load_oracle(campaign_models.oracle)
    prepared = pd.read_parquet(campaign_models.prepared)
    initial = draw_initial(prepared, ExperimentSpec(name="T", n_initial=40, budget=15), seed=3)
    return chemistry, oracle, initial


def _campaign(parts, path, method="bo", budget=15, cfg=None, seed=7, **kw) -> Campaign:
    chemistry, oracle, initial = parts
    spec = CampaignSpec(f"T-{method}", "T", 0, method, budget, 2.576, seed)
    return Campaign(spec, cfg or _cfg(), chemistry, oracle, initial, path, **kw)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = a.drop(columns=TIMING), b.drop(columns=TIMING)
    assert a.drop(columns="latent").equals(b.drop(columns="latent"))
    assert np.array_equal(np.stack(a["latent"].to_numpy()), np.stack(b["latent"].to_numpy()))


def test_a_campaign_records_every_suggestion_with_its_fate(parts, tmp_path):
    table = _campaign(parts, tmp_path / "s.parquet").run(progress=False)
    initial = table[table["round"] == 0]
    assert (initial["fate"] == INITIAL).all() and len(initial) == 40
    assert np.allclose(initial["label"], parts[2]["band_gap"])
    suggested = table[table["round"] > 0]
    assert 0 < len(suggested) <= 15 and set(suggested["fate"]) <= set(FATES)
    assert suggested["round"].max() <= 6
    # accept = [valid, new]: every suggestion is a valid formula the campaign did not hold before
    assert suggested["valid"].all()
    assert not suggested["reduced_formula"].isin(initial["reduced_formula"]).any()
    assert suggested["reduced_formula"].is_unique
    registered = suggested[suggested["fate"] == REGISTERED]
    assert np.isfinite(registered["label"]).all()
    assert np.array_equal(registered["label"], registered["registered_value"])
    assert np.isfinite(suggested["acquisition"]).all()
    # the table on disk is the returned one
    _same(table, pd.read_parquet(tmp_path / "s.parquet"))


def test_same_seed_same_table_and_other_seed_differs(parts, tmp_path):
    a = _campaign(parts, tmp_path / "a.parquet").run(progress=False)
    b = _campaign(parts, tmp_path / "b.parquet").run(progress=False)
    _same(a, b)
    c = _campaign(parts, tmp_path / "c.parquet", seed=8).run(progress=False)
    first_a, first_c = a["latent"].iat[40], c["latent"].iat[40]  # the first suggestion of each
    assert not np.array_equal(first_a, first_c)


class Stop(Exception):
    pass


def test_interrupted_campaign_resumes_to_the_uninterrupted_table(parts, tmp_path):
    whole = _campaign(parts, tmp_path / "whole.parquet").run(progress=False)

    def stop_after_round_2(round_, table):
        if round_ == 2:
            raise Stop

    path = tmp_path / "cut.parquet"
    with pytest.raises(Stop):
        _campaign(parts, path).run(on_round=stop_after_round_2, progress=False)
    assert pd.read_parquet(path)["round"].max() == 2
    seen = []
    resumed = _campaign(parts, path).run(on_round=lambda r, t: seen.append(r), progress=False)
    assert seen == [3]  # only the missing round ran
    _same(whole, resumed)
    # a finished campaign run again does nothing but report its last round
    again = []
    _same(whole, _campaign(parts, path).run(on_round=lambda r, t: again.append(r), progress=False))
    assert again == [3]


def test_state_from_other_settings_is_refused_or_restarted(parts, tmp_path):
    path = tmp_path / "s.parquet"
    _campaign(parts, path, budget=5).run(progress=False)
    with pytest.raises(CampaignStateError, match="other settings"):
        _campaign(parts, path, budget=10).run(progress=False)
    table = _campaign(parts, path, budget=10, restart_changed=True).run(progress=False)
    assert (table["round"] > 0).sum() <= 10 and table["round"].max() == 2
    path.write_bytes(b"not parquet")
    with pytest.raises(CampaignStateError, match="unreadable"):
        _campaign(parts, path).run(progress=False)


class _Shifted:
    """An oracle that labels like ``inner`` plus ``shift`` eV (a retrained oracle, as far as a table can tell)."""

    def __init__(self, inner, shift: float) -> None:
        self.inner, self.shift = inner, shift

    def label(self, formulas):
        labels = self.inner.label(formulas)
        return dataclasses.replace(labels, gaps=labels.gaps + self.shift)


def _with(parts, oracle=None, checker=None):
    chemistry, base_oracle, initial = parts
    if checker is not None:
        chemistry = LatentChemistry(chemistry.autoencoder, checker)
    return chemistry, oracle or base_oracle, initial


def _unstamp(path) -> None:
    """Rewrite a state table as it was written before the context stamp existed."""
    table = pq.read_table(path)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"agd.campaign.context"}
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_a_table_another_oracle_would_label_otherwise_is_refused_or_restarted(parts, tmp_path):
    path = tmp_path / "s.parquet"
    made = _campaign(parts, path, budget=10).run(progress=False)
    before = path.read_bytes()
    # labels within the tolerance (float noise between batches) are the same oracle: resumed untouched
    _same(made, _campaign(_with(parts, _Shifted(parts[1], 1e-4)), path, budget=10).run(progress=False))
    assert path.read_bytes() == before
    other = _with(parts, _Shifted(parts[1], 0.5))
    with pytest.raises(CampaignStateError, match=r"oracle labels \d+ of the table's \d+ labelled formulas"):
        _campaign(other, path, budget=10).run(progress=False)
    assert path.read_bytes() == before  # refused, not touched
    fresh = _campaign(other, path, budget=10, restart_changed=True).run(progress=False)
    asked = fresh[(fresh["round"] > 0) & fresh["label"].notna()]
    again = parts[1].label(asked["formula"].tolist()).gaps + 0.5
    assert len(asked) and np.allclose(asked["label"], again, atol=1e-5)  # labelled by the new oracle


def test_a_table_made_under_other_validity_rules_is_refused(parts, tmp_path):
    from agd.config import ValidityConfig

    path = tmp_path / "s.parquet"
    _campaign(parts, path, budget=5).run(progress=False)
    loose = _with(parts, checker=ValidityChecker(ValidityConfig(use_pauling_test=False)))
    with pytest.raises(CampaignStateError, match="validity rules changed"):
        _campaign(loose, path, budget=5).run(progress=False)


def test_a_table_from_before_the_stamp_is_checked_by_its_rows_then_stamped(parts, tmp_path):
    path = tmp_path / "s.parquet"
    made = _campaign(parts, path, budget=10).run(progress=False)
    _unstamp(path)
    assert b"agd.campaign.context" not in pq.read_table(path).schema.metadata
    _same(made, _campaign(parts, path, budget=10).load_state())
    assert b"agd.campaign.context" in pq.read_table(path).schema.metadata  # adopted
    _unstamp(path)
    with pytest.raises(CampaignStateError, match="oracle changed"):
        _campaign(_with(parts, _Shifted(parts[1], 0.5)), path, budget=10).load_state()
    # rules under which the table's own formulas judge otherwise: more elements than any of them holds
    from agd.chem.formula import parse_formula
    from agd.config import ValidityConfig

    table = pd.read_parquet(path)
    most = max(len(parse_formula(f)) for f in table.loc[table["round"] > 0, "formula"])
    rules = ValidityChecker(ValidityConfig(min_elements=most + 1))
    with pytest.raises(CampaignStateError, match="another valid"):
        _campaign(_with(parts, checker=rules), path, budget=10).load_state()


def test_paper_policy_registers_only_decodable_points_and_penalty_registers_the_rest(parts, tmp_path):
    paper = _cfg(accept=[], acquisition=ACQ | {"n_random": 256, "n_local": 0, "n_refine": 0})
    table = _campaign(parts, tmp_path / "p.parquet", cfg=paper, budget=10).run(progress=False)
    suggested = table[table["round"] > 0]
    assert len(suggested) == 10
    # uniform latents in the box decode to large formulas: not all valid, and those are still labelled
    assert not suggested["valid"].all()
    labelled = suggested["fate"].isin([REGISTERED, "duplicate"])
    assert np.isfinite(suggested.loc[labelled, "registered_value"]).all()
    assert not np.isfinite(suggested.loc[~labelled, "registered_value"]).any()

    strict = paper.model_copy(update={"invalid": "penalty", "penalty": -1.0})
    table = _campaign(parts, tmp_path / "q.parquet", cfg=strict, budget=10).run(progress=False)
    suggested = table[table["round"] > 0]
    invalid = suggested[suggested["fate"] == "invalid"]
    assert len(invalid) and (invalid["registered_value"] == -1.0).all() and invalid["label"].isna().all()


def test_random_control_stays_within_the_rules_and_has_no_acquisition(parts, tmp_path):
    table = _campaign(parts, tmp_path / "r.parquet", method="random").run(progress=False)
    suggested = table[table["round"] > 0]
    assert len(suggested) > 0 and suggested["valid"].all() and suggested["acquisition"].isna().all()
    assert not suggested["reduced_formula"].isin(table.loc[table["round"] == 0, "reduced_formula"]).any()
    assert (suggested["method"] == "random").all()


def test_round_metrics_come_from_the_table(parts, tmp_path):
    table = _campaign(parts, tmp_path / "s.parquet").run(progress=False)
    last = int(table["round"].max())
    m = round_metrics(table, last, high_gap=2.0)
    assert m["best_label"] == pytest.approx(table["label"].max())
    new = table[(table["fate"] == REGISTERED) & table["valid"]]
    assert m["n_high_gap_total"] == (new["label"] > 2.0).sum()
    assert m["valid_fraction"] == table.loc[table["round"] == last, "valid"].mean()


def test_plan_covers_experiments_controls_and_kappa_sweep():
    cfg = ExperimentsConfig(repeats=2, kappa_sweep=[0, 5], kappa_repeats=1)
    plan = plan_campaigns(cfg)
    names = [p.spec.campaign for p in plan]
    assert names.count("Exp2-bo") == 2 and names.count("Exp4-random") == 2 and names.count("kappa-5") == 1
    bo = {
        (p.spec.experiment, p.spec.repeat): p.spec.seed
        for p in plan
        if p.spec.method == "bo" and p.spec.experiment != "kappa"
    }
    rnd = {(p.spec.experiment, p.spec.repeat): p.spec.seed for p in plan if p.spec.method == "random"}
    assert bo == rnd  # bo and random share initial samples
    assert len(set(bo.values())) == len(bo)  # ... and repeats differ
    with pytest.raises(ValueError, match="unknown campaign"):
        plan_campaigns(cfg, only=["Exp9-bo"])


def test_the_kappa_sweep_stays_ucb_when_the_campaigns_use_another_function(parts, tmp_path):
    straddle = {"function": "straddle", "level": 4.0, "kappa": 1.96}
    cfg = ExperimentsConfig(
        repeats=1, kappa_sweep=[0, 5], kappa_repeats=1, campaign={"acquisition": ACQ | straddle}
    )
    plan = plan_campaigns(cfg)
    functions = {p.spec.campaign: p.spec.function for p in plan}
    assert functions["Exp2-bo"] is None and functions["kappa-0"] == functions["kappa-5"] == "ucb"
    # with UCB configured the sweep's specs name no function, so their fingerprints are those of old tables
    assert {p.spec.function for p in plan_campaigns(ExperimentsConfig(repeats=1))} == {None}

    chemistry, oracle, initial = parts
    campaign_cfg = _cfg(acquisition=ACQ | straddle)
    sweep = CampaignSpec("kappa-5", "kappa", 0, "bo", 5, 5.0, 7, "ucb")
    campaign = Campaign(sweep, campaign_cfg, chemistry, oracle, initial, tmp_path / "k.parquet")
    assert (campaign.cfg.acquisition.function, campaign.cfg.acquisition.kappa) == ("ucb", 5.0)
    own = Campaign(
        dataclasses.replace(sweep, function=None),
        campaign_cfg,
        chemistry,
        oracle,
        initial,
        tmp_path / "s.parquet",
    )
    assert own.cfg.acquisition.function == "straddle" and own.fingerprint != campaign.fingerprint
    # naming the function is part of who the campaign is
    plain = CampaignSpec("T-bo", "T", 0, "bo", 5, 2.576, 7)
    assert plain.fingerprint(_cfg(), initial) != dataclasses.replace(plain, function="ucb").fingerprint(
        _cfg(), initial
    )


def test_initial_samples_are_seeded_order_free_and_respect_the_gap_limit(campaign_models):
    prepared = pd.read_parquet(campaign_models.prepared)
    spec = ExperimentSpec(name="Exp4", n_initial=50, budget=10, max_initial_gap=3.0)
    a = draw_initial(prepared, spec, 1)
    b = draw_initial(prepared.sample(frac=1.0, random_state=5), spec, 1)
    assert a.equals(b) and (a["band_gap"] < 3.0).all()
    test_rows = set(prepared.loc[prepared["split"] == "test", "reduced_formula"])
    assert not set(a["reduced_formula"]) & test_rows
    assert not a.equals(draw_initial(prepared, spec, 2))
    with pytest.raises(ValueError, match="only"):
        draw_initial(prepared, spec.model_copy(update={"n_initial": 10**6}), 1)


def _params(tmp_path, **experiments):
    raw = {
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "experiments": {
            "repeats": 2,
            "experiments": [{"name": "Exp2", "n_initial": 30, "budget": 10}],
            "kappa_sweep": [0, 10],
            "kappa_experiment": "Exp2",
            "kappa_repeats": 1,
            "campaign": {"batch_size": 5, "random_draws": 3000, "acquisition": ACQ},
        }
        | experiments,
    }
    return params_from_dict(raw)


def test_experiments_write_training_sets_samples_kappa_sweep_and_mlflow_once(
    campaign_models, tmp_path, monkeypatch
):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(tmp_path)
    out = tmp_path / "exp"
    args = (campaign_models.prepared, campaign_models.autoencoder, campaign_models.oracle, out, params)
    summary = run_experiments(*args, progress=False)
    assert set(summary["campaigns"]) == {"Exp2-bo", "Exp2-random", "kappa-0", "kappa-10"}
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples.groupby(["campaign", "repeat"])) == 6
    sets = pd.read_parquet(out / "training_sets.parquet")
    prepared = pd.read_parquet(campaign_models.prepared)
    assert (sets["training_set"] == "ALL").sum() == prepared["split"].isin(["train", "val"]).sum()
    for repeat in (0, 1):
        part = sets[(sets["experiment"] == "Exp2") & (sets["repeat"] == repeat)]
        bs = set(part.loc[part["training_set"] == "BS", "reduced_formula"])
        al = part[part["training_set"] == "AL"]
        assert len(bs) == 30 and bs < set(al["reduced_formula"])
        found = samples[
            (samples["campaign"] == "Exp2-bo")
            & (samples["repeat"] == repeat)
            & (samples["fate"] == REGISTERED)
        ]
        assert set(al.loc[al["origin"] == "oracle", "reduced_formula"]) == set(found["reduced_formula"])
    curve = pd.read_csv(out / "kappa_sweep.csv")
    assert set(curve["kappa"]) == {0.0, 10.0}
    for _, part in curve.groupby("kappa"):
        assert (np.diff(part["mean"]) >= 0).all()  # cumulative hits never fall
    assert (out / "campaigns.png").stat().st_size > 10_000

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("agd-campaigns")
    runs = client.search_runs([exp.experiment_id])
    repeats = [r for r in runs if r.data.tags.get("agd.role") == "repeat"]
    parents = [r for r in runs if r.data.tags.get("agd.role") == "campaign"]
    assert len(repeats) == 6 and len(parents) == 4
    assert {r.data.tags["experiment"] for r in repeats} == {"Exp2", "kappa"}
    assert all(r.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents} for r in repeats)
    one = next(r for r in repeats if r.data.tags["agd.campaign"] == "Exp2-bo")
    from agd.environment import installed_versions

    assert all(r.data.tags["agd.env.torch"] == installed_versions()["torch"] for r in runs)
    steps = [m.step for m in client.get_metric_history(one.info.run_id, "best_label")]
    assert sorted(steps) == list(range(int(samples["round"].max()) + 1))

    # a second run finds everything done: same outputs, same runs, no new metric steps
    before = pd.read_parquet(out / "training_sets.parquet")
    run_experiments(*args, progress=False)
    assert pd.read_parquet(out / "training_sets.parquet").equals(before)
    assert len(client.search_runs([exp.experiment_id])) == 10
    assert [m.step for m in client.get_metric_history(one.info.run_id, "best_label")] == steps


def test_experiments_with_a_retrained_oracle_start_the_campaigns_afresh_and_their_runs_too(
    campaign_models, tmp_path, monkeypatch
):
    """`dvc repro` reruns the experiments stage when the oracle changes; tables labelled by the old oracle
    must not be resumed as finished, nor their MLflow rounds kept as the new campaigns' rounds."""
    import mlflow

    from agd.config import ForestConfig
    from agd.models.forest import train_forest

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(tmp_path, kappa_sweep=[], repeats=1)
    out = tmp_path / "exp"
    run_experiments(campaign_models.prepared, campaign_models.autoencoder, campaign_models.oracle, out, params,
                    progress=False, restart_changed=True)  # fmt: skip
    before = pd.read_parquet(out / "samples.parquet")
    prepared = pd.read_parquet(campaign_models.prepared)
    retrained = tmp_path / "oracle2"
    train_forest(prepared["reduced_formula"].tolist(), prepared["band_gap"].to_numpy(),
                 ForestConfig(n_estimators=10, n_jobs=1), seed=1).save(retrained / "forest.joblib")  # fmt: skip
    args = (campaign_models.prepared, campaign_models.autoencoder, retrained, out, params)
    with pytest.raises(CampaignStateError, match="oracle changed"):
        run_experiments(*args, progress=False)
    run_experiments(*args, progress=False, restart_changed=True)
    after = pd.read_parquet(out / "samples.parquet")
    asked = after[(after["round"] > 0) & after["label"].notna()]
    now = load_oracle(retrained).label(asked["formula"].tolist()).gaps
    assert len(asked) and np.allclose(asked["label"], now, atol=1e-6)  # labelled by the new oracle
    old = before[(before["round"] > 0) & before["label"].notna()]
    assert not np.allclose(old["label"].to_numpy()[:5], asked["label"].to_numpy()[:5])

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("agd-campaigns")
    repeats = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("agd.role") == "repeat"]
    live = [r for r in repeats if "agd.superseded" not in r.data.tags]
    assert len(repeats) == 4 and len(live) == 2  # Exp2-bo and Exp2-random, each retired once
    for run in live:
        table = after[after["campaign"] == run.data.tags["agd.campaign"]]
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "n_high_gap_total")}
        assert sorted(logged) == sorted(table["round"].unique())  # every round once, from the new table
        last = int(table["round"].max())
        assert (
            logged[last]
            == round_metrics(table, last, params.experiments.campaign.high_gap)["n_high_gap_total"]
        )
    parent = next(r for r in client.search_runs([exp.experiment_id], filter_string="tags.`agd.role` = 'campaign'")
                  if r.data.tags["agd.campaign"] == "Exp2-bo")  # fmt: skip
    summary = campaign_summary(after[after["campaign"] == "Exp2-bo"], params.experiments.campaign.high_gap)
    assert parent.data.metrics["mean.best_new_label"] == summary["best_new_label"]  # the totals follow
    # a third run finds the new tables and their runs: nothing retired, nothing logged twice
    run_experiments(*args, progress=False, restart_changed=True)
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`agd.role` = 'repeat'")) == 4


def test_kappa_curve_counts_cumulative_high_gap_finds():
    rows = []
    for round_, label in [(0, 9.0), (1, 7.0), (1, 1.0), (2, 2.0), (3, 6.5)]:
        fate = INITIAL if round_ == 0 else REGISTERED
        rows.append(
            {
                "experiment": "kappa",
                "kappa": 5.0,
                "repeat": 0,
                "round": round_,
                "fate": fate,
                "valid": True,
                "label": label,
            }
        )
    curve = kappa_curve([pd.DataFrame(rows)], high_gap=6.0)
    assert curve["mean"].tolist() == [1, 1, 2]  # the initial 9 eV sample is not a find


def test_agd_campaign_killed_mid_run_resumes_to_the_same_table(campaign_models, tmp_path):
    """Kill the real command with SIGKILL after its second round, rerun it, compare with an uninterrupted run."""
    params = _params(tmp_path, experiments=[{"name": "Exp2", "n_initial": 30, "budget": 40}], repeats=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def command(out):
        return [
            sys.executable, "-m", "agd.cli", "--params", str(tmp_path / "params.yaml"), "campaign", "Exp2-bo",
            "--prepared", str(campaign_models.prepared), "--autoencoder", str(campaign_models.autoencoder),
            "--oracle", str(campaign_models.oracle), "--out", str(out),
        ]  # fmt: skip

    state = tmp_path / "cut" / "campaigns" / "Exp2-bo" / "repeat-00.parquet"
    proc = subprocess.Popen(
        command(tmp_path / "cut"), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if pd.read_parquet(state)["round"].max() >= 2:
                break
        except Exception:  # noqa: BLE001 - not written yet
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the campaign finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cut_round = int(pd.read_parquet(state)["round"].max())
    assert cut_round < 8
    subprocess.run(command(tmp_path / "cut"), cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    subprocess.run(command(tmp_path / "whole"), cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    resumed = pd.read_parquet(state)
    whole = pd.read_parquet(tmp_path / "whole" / "campaigns" / "Exp2-bo" / "repeat-00.parquet")
    _same(whole, resumed)
    assert resumed.groupby(["round", "idx"]).size().max() == 1  # no duplicate rows

    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("agd-campaigns")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("agd.role") == "repeat"]
    assert len(runs) == 2  # the killed run was picked up again, plus the uninterrupted campaign's run
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "best_label")]
        assert sorted(steps) == list(range(int(resumed["round"].max()) + 1))  # every round once


def test_initial_samples_outside_the_autoencoder_box_widen_the_search_box(parts, tmp_path):
    """Initial samples come from the whole dataset; the box is the training latents' extent only."""
    import dataclasses
    import warnings

    from agd.models.autoencoder import LatentBounds

    chemistry, oracle, initial = parts
    full = chemistry.autoencoder.bounds
    centre, half = (full.lower + full.upper) / 2, (full.upper - full.lower) / 4
    narrow = LatentBounds(centre - half, centre + half)  # half the span: most initial latents fall outside
    shrunk = LatentChemistry(dataclasses.replace(chemistry.autoencoder, bounds=narrow), chemistry.checker)
    spec = CampaignSpec("T-bo", "T", 0, "bo", 10, 2.576, 7)
    campaign = Campaign(spec, _cfg(), shrunk, oracle, initial, tmp_path / "s.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "registered points lie outside the bounds" fails here
        table = campaign.run(progress=False)
    latents = np.stack(table["latent"].to_numpy())
    start = np.stack(table.loc[table["round"] == 0, "latent"].to_numpy())
    assert ((start < narrow.lower) | (start > narrow.upper)).any()  # the case under test happened
    lo, hi = campaign.bounds.T
    assert np.array_equal(lo, np.minimum(narrow.lower, start.min(axis=0)))
    assert np.array_equal(hi, np.maximum(narrow.upper, start.max(axis=0)))
    assert ((latents >= lo) & (latents <= hi)).all()  # suggestions stay inside the widened box


def _systems_by_round(table: pd.DataFrame) -> pd.DataFrame:
    finds = table[(table["round"] > 0) & (table["fate"] == REGISTERED)]
    return pd.DataFrame({"round": finds["round"], "system": finds["reduced_formula"].map(chemical_system)})


def test_a_system_at_the_cap_gets_no_more_finds_in_later_rounds(parts, tmp_path):
    # uncapped, the campaign comes back to a chemical system in a later round (what the cap is for)
    free_table = _campaign(parts, tmp_path / "f.parquet", budget=30).run(progress=False)
    free = _systems_by_round(free_table)
    assert (free.groupby("system")["round"].nunique() > 1).any()
    capped_cfg = _cfg(max_per_system=1)
    table = _campaign(parts, tmp_path / "c.parquet", budget=30, cfg=capped_cfg).run(progress=False)
    capped = _systems_by_round(table)
    assert len(capped) > 0 and capped["system"].map(len).gt(0).all()
    # counted at the start of each round: a system's finds all come from the round that first found it
    assert (capped.groupby("system")["round"].nunique() == 1).all()
    spec = CampaignSpec("T-bo", "T", 0, "bo", 30, 2.576, 7)
    assert spec.fingerprint(capped_cfg, parts[2]) != spec.fingerprint(_cfg(), parts[2])

    # the acceptor refuses a closed system's formulas and nothing else (the random control's gate too)
    chemistry = parts[0]
    finds = free_table[(free_table["round"] > 0) & (free_table["fate"] == REGISTERED)]
    latents = np.stack(finds["latent"].to_numpy())
    systems = finds["reduced_formula"].map(chemical_system).to_numpy()
    ok, keys = chemistry.acceptor(["valid", "new"], set())(latents)
    assert ok.all() and keys == finds["reduced_formula"].tolist()
    shut, _ = chemistry.acceptor(["valid", "new"], set(), {systems[0]})(latents)
    assert np.array_equal(shut, systems != systems[0])


def test_a_cap_within_round_counts_the_rounds_own_picks(parts, tmp_path):
    soft_cfg, strict_cfg = _cfg(max_per_system=2), _cfg(max_per_system=2, cap_within_round=True)
    soft = _campaign(parts, tmp_path / "s.parquet", budget=40, seed=3, cfg=soft_cfg).run(progress=False)
    assert _systems_by_round(soft).groupby("system").size().max() > 2  # one round passed the cap
    strict = _campaign(parts, tmp_path / "c.parquet", budget=40, seed=3, cfg=strict_cfg)
    strict_table = strict.run(progress=False)
    finds = _systems_by_round(strict_table)
    assert len(finds) == 40 and finds["system"].map(len).gt(0).all()
    assert finds.groupby("system").size().max() <= 2  # within a round too
    spec = CampaignSpec("T-bo", "T", 0, "bo", 40, 2.576, 3)
    assert spec.fingerprint(strict_cfg, parts[2]) != spec.fingerprint(soft_cfg, parts[2])
    # the campaign's totals say how its finds spread over chemical systems
    totals = campaign_summary(strict_table, 6.0)
    assert totals["most_in_one_system"] == 2 and totals["n_systems"] == finds["system"].nunique()
    assert campaign_summary(soft, 6.0)["most_in_one_system"] > 2

    # the random control's draws honour the quota as well: no room anywhere, no latent
    control = _campaign(parts, tmp_path / "r.parquet", "random", budget=40, seed=3, cfg=strict_cfg)
    table = control.run(progress=False)
    assert _systems_by_round(table).groupby("system").size().max() <= 2
    accept = parts[0].acceptor(["valid", "new"], set())
    assert len(control._random_latents(9, 5, accept, table)) == 5
    assert len(control._random_latents(9, 5, accept, table, Quota(chemical_system, {}, default=0))) == 0


def test_a_late_setting_left_off_keeps_the_mlflow_key_of_earlier_runs():
    cfg = ExperimentsConfig.model_validate({"campaign": {"max_per_system": 2}})
    older = _without_late_settings(cfg.model_dump_json())
    assert older != cfg.model_dump_json() and '"search"' not in older and '"level"' not in older
    assert '"surrogate' not in older
    assert settings_key(cfg) == hashlib.sha256(older.encode()).hexdigest()[:12]
    straddle = cfg.campaign.acquisition.model_copy(update={"function": "straddle"})
    forest = {"search": "candidates", "surrogate": "forest"}
    for late in ({"cap_within_round": True}, {"search": "candidates"}, {"acquisition": straddle}, forest):
        turned_on = cfg.model_copy(update={"campaign": cfg.campaign.model_copy(update=late)})
        assert settings_key(turned_on) != settings_key(cfg)
    # max_per_system was part of the key from the start, null included
    uncapped = ExperimentsConfig()
    assert '"max_per_system":null' in uncapped.model_dump_json()
    assert (
        settings_key(uncapped)
        == hashlib.sha256(_without_late_settings(uncapped.model_dump_json()).encode()).hexdigest()[:12]
    )


def _without_late_settings(dump: str) -> str:
    """The settings as an agd without cap_within_round, search, the straddle's level and the surrogate wrote them."""
    dump = dump.replace(',"cap_within_round":false', "").replace(',"search":"latent"', "")
    dump = re.sub(r',"surrogate":"gp","surrogate_forest":\{[^}]*\}', "", dump)
    return dump.replace(',"level":6.0', "")


def test_a_system_cap_needs_accept_rules():
    with pytest.raises(ValueError, match="max_per_system"):
        _cfg(accept=[], max_per_system=2)
    with pytest.raises(ValueError, match="cap_within_round"):
        _cfg(cap_within_round=True)
    with pytest.raises(ValueError, match="`new` accept rule"):
        _cfg(accept=["valid"], max_per_system=2, cap_within_round=True)
    assert chemical_system("Li2O") == frozenset({"Li", "O"}) and chemical_system(None) == frozenset()
