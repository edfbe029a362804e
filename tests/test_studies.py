"""The oracle study (bench/studies/oracle_study.py): its extra training rows and a tiny resumable run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.studies import oracle_study
from tests.conftest import read_shared_csv


def test_extra_mp_rows_are_new_non_metal_compositions_with_their_median_gap(shared_data) -> None:
    exp1 = set(read_shared_csv(shared_data / "mp_gap_agd_exp1.csv")["reduced_formula"])
    rows = oracle_study.extra_mp_rows(exp1, shared_data)
    assert len(rows) > 1000
    assert rows["reduced_formula"].is_unique
    assert not rows["reduced_formula"].isin(exp1).any()
    assert (rows["band_gap"] > 0).all()
    # a composition with several non-metal polymorphs in Matbench gets their median
    bench = read_shared_csv(shared_data / "matbench_mp_gap.csv")
    bench = bench[(bench["band_gap"] > 0) & ~bench["reduced_formula"].isin(exp1)]
    by_comp = read_shared_csv(shared_data / "mp_gap_by_composition.csv")
    counts = bench["reduced_formula"].value_counts()
    several = [f for f in counts[counts > 2].index if f not in set(by_comp["reduced_formula"])]
    assert several, "expected Matbench compositions with several polymorphs outside Exp1"
    formula = several[0]
    expected = float(bench.loc[bench["reduced_formula"] == formula, "band_gap"].median())
    got = float(rows.loc[rows["reduced_formula"] == formula, "band_gap"].iloc[0])
    assert got == expected


@pytest.fixture
def tiny_split(shared_data, tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    """240 Exp1 rows as a prepared file: 160 train, 40 val, 40 test (in that order)."""
    data = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv").sample(240, random_state=1)
    data["split"] = ["train"] * 160 + ["val"] * 40 + ["test"] * 40
    prepared = tmp_path / "dataset.parquet"
    data[["reduced_formula", "band_gap", "split"]].to_parquet(prepared)
    return data, prepared


def test_study_trains_resumes_and_reports(tiny_split, tmp_path: Path, capsys) -> None:
    data, prepared = tiny_split
    work = tmp_path / "work"
    argv = ["--prepared", str(prepared), "--work", str(work), "train", "--variant", "base"]
    assert oracle_study.main([*argv, "--seeds", "0", "--epochs", "2", "--workers", "1"]) == 0
    saved = work / "base" / "seed0.npz"
    first = np.load(saved)["pred"]
    # a test formula with an element no training row has gets no label (NaN), as in the pipeline
    assert first.shape == (40,) and np.isfinite(first).sum() >= 35
    stamp = saved.stat().st_mtime_ns
    # a second call finds the member and trains nothing
    assert oracle_study.main([*argv, "--seeds", "0", "--epochs", "2", "--workers", "1"]) == 0
    assert saved.stat().st_mtime_ns == stamp
    capsys.readouterr()
    out = tmp_path / "report.md"
    assert (
        oracle_study.main(["--prepared", str(prepared), "--work", str(work), "report", "--out", str(out)])
        == 0
    )
    text = out.read_text()
    base_rows = [line for line in text.splitlines() if line.startswith("| base |")]
    assert len(base_rows) == 1
    cells = [c.strip() for c in base_rows[0].strip("|").split("|")]
    assert cells[1].endswith("(smoke run: 2 epochs)") and cells[3] == "160"  # train rows
    r2 = float(cells[6])
    ok = np.isfinite(first)
    y = data["band_gap"].to_numpy()[-40:][ok]
    expected = 1 - np.sum((y - first[ok]) ** 2) / np.sum((y - y.mean()) ** 2)
    assert abs(r2 - expected) < 1e-4


def test_oqmd_pretraining_leaves_out_held_out_compositions_and_reports_a_diverged_member(
    tiny_split, shared_data, tmp_path: Path, monkeypatch
) -> None:
    data, prepared = tiny_split
    shared = tmp_path / "shared"
    shared.mkdir()
    held_out = data["reduced_formula"].iloc[160:].tolist()  # the val and test rows
    pool = read_shared_csv(shared_data / "formulas_oqmd_crabnet.csv.gz").sample(300, random_state=0)[
        ["formula", "reduced_formula", "band_gap"]
    ]
    extra = pd.DataFrame({"formula": [*held_out[:3], "Og2O"], "reduced_formula": [*held_out[:3], "Og2O"],
                          "band_gap": [1.0, 2.0, 3.0, 4.0]})  # fmt: skip
    pd.concat([pool, extra]).to_csv(shared / "formulas_oqmd_crabnet.csv.gz", index=False)
    rows = oracle_study.oqmd_rows(set(held_out), "matscholar200", shared)
    assert not rows["reduced_formula"].isin([*held_out, "Og2O"]).any()  # Og: no matscholar200 vector
    assert len(rows) == len(pool) - pool["reduced_formula"].isin(held_out).sum()

    monkeypatch.setattr(oracle_study, "SHARED", shared)
    monkeypatch.setattr(oracle_study, "PRETRAIN_EPOCHS", 1)
    work = tmp_path / "work"
    argv = ["--prepared", str(prepared), "--work", str(work), "train", "--variant", "oqmd_pretrain"]
    assert oracle_study.main([*argv, "--seeds", "0", "--epochs", "2", "--workers", "1"]) == 0
    saved = np.load(work / "oqmd_pretrain" / "seed0.npz")
    info = json.loads(str(saved["info"]))
    assert info["pretrain_minutes"] > 0 and info["epochs_run"] == 2 and np.isfinite(saved["pred"]).sum() >= 35
    # a member whose loss went NaN is reported as diverged and kept out of the mean
    history = [{**row, "train_loss": float("nan")} if row["epoch"] == 2 else row for row in info["history"]]
    assert oracle_study.diverged_epoch(history) == 2 and oracle_study.diverged_epoch(info["history"]) is None
    np.savez(
        work / "oqmd_pretrain" / "seed1.npz",
        pred=np.full(40, np.nan),
        info=json.dumps(info | {"history": history}),
    )
    text = oracle_study.report(prepared, work)
    assert (
        "| oqmd_pretrain | pretrained on OQMD's gaps (metals included), then trained on Exp1 | 1 | 160 | | | diverged: NaN loss from epoch 2"
        in text
    )
    assert "| oqmd_pretrain | mean of" not in text  # one member left: no mean


def test_report_compares_a_mixed_embedding_ensemble_with_base_seeds(tiny_split, tmp_path: Path) -> None:
    data, prepared = tiny_split
    work = tmp_path / "work"
    common = ["--prepared", str(prepared), "--work", str(work), "train", "--epochs", "2", "--workers", "1"]
    assert oracle_study.main([*common, "--variant", "base", "--seeds", "0", "1"]) == 0
    text = oracle_study.report(prepared, work)
    assert "Mixed embeddings" not in text  # nothing to mix yet
    assert oracle_study.main([*common, "--variant", "cgcnn92", "--seeds", "0"]) == 0
    text = oracle_study.report(prepared, work)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| base")}
    mixed = rows["base, first 1 seeds + cgcnn92 seed 0"]
    base0, other = (np.load(work / v / "seed0.npz")["pred"] for v in ("base", "cgcnn92"))
    y = data["band_gap"].to_numpy()[-40:]
    pred = (base0 + other) / 2
    ok = np.isfinite(pred)
    expected = 1 - np.sum((y[ok] - pred[ok]) ** 2) / np.sum((y[ok] - y[ok].mean()) ** 2)
    assert float(mixed.split("|")[2]) == pytest.approx(expected, abs=1e-4)
    assert "| base, 2 seeds |" in text


def test_ensemble_extrapolation_is_exact_at_k_and_recovers_a_known_bias_and_spread() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(0, 2, 20_000)
    shared = rng.normal(0, 0.5, y.size)  # the error every member makes (bias), variance 0.25
    preds = y + shared + rng.normal(0, 1.0, (4, y.size))  # each member's own error, variance 1
    est = oracle_study.ensemble_extrapolation(y, preds, (10,))
    mean = preds.mean(axis=0)
    r2_of_mean = 1 - np.mean((mean - y) ** 2) / np.var(y)
    assert est[4] == pytest.approx(r2_of_mean, abs=1e-12)
    var = np.var(y)
    assert est["infinity"] == pytest.approx(1 - 0.25 / var, abs=0.01)
    assert est[10] == pytest.approx(1 - (0.25 + 1 / 10) / var, abs=0.01)
    assert est["member"] < est[4] < est[10] < est["infinity"]
    with pytest.raises(ValueError, match="two members"):
        oracle_study.ensemble_extrapolation(y, preds[:1], (10,))


def test_killing_the_study_stops_its_training_workers(tiny_split, tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    _, prepared = tiny_split
    argv = ["--prepared", str(prepared), "--work", str(tmp_path / "work"), "train", "--variant", "base"]
    # far longer than the test waits, and no early stop
    argv += ["--seeds", "0", "--epochs", "3000", "--patience", "0", "--workers", "1"]
    study = subprocess.Popen(
        [sys.executable, "-m", "bench.studies.oracle_study", *argv], cwd=oracle_study.ROOT
    )
    workers: list = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not workers:
            time.sleep(0.5)
            workers = [
                p for p in psutil.Process(study.pid).children() if "spawn_main" in " ".join(p.cmdline())
            ]
            workers = [p for p in workers if p.cpu_times().user > 5]  # imports done, training
        assert workers, "the study started no training worker"
        study.send_signal(signal.SIGKILL)
        study.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, "training workers outlived the killed study"
    finally:
        if study.poll() is None:
            study.kill()
        for worker in workers:  # never leave a worker behind, even when the test fails
            if worker.is_running():
                worker.kill()
    assert not (tmp_path / "work" / "base" / "seed0.npz").exists()


def test_screener_study_pairs_al_with_random_by_repeat() -> None:
    from bench.studies.screener_threshold import _paired_lines

    frame = pd.DataFrame(
        {
            "training_set": ["AL", "AL", "AL", "random", "random", "BS"],
            "repeat": [0, 1, 2, 0, 1, 0],  # AL repeat 2 has no random partner: left out
            "threshold": [6.0] * 6,
            "recovery": [0.50, 0.40, 0.90, 0.30, 0.45, 0.99],
            "precision": [0.20, 0.30, 0.90, 0.10, 0.10, 0.99],
        }
    )
    lines = _paired_lines(frame, "AL", "random")
    # recovery: +20 and -5 points -> mean +7.5, std 17.7; precision: +10 and +20 -> +15.0 +- 7.1
    assert lines[-1] == "| 6 | 2 | +7.5 ± 17.7 | 1 of 2 | +15.0 ± 7.1 | 2 of 2 |"
    assert _paired_lines(frame[frame.training_set != "random"], "AL", "random") == []


def test_replica_agreement_counts_hits_against_the_reference_window() -> None:
    from agd.config import GapWindowConfig
    from bench.studies.oracle_replica import agreement, recovery_by_margin

    reference = np.array([6.5, 6.05, 5.9, 7.0, np.nan, 3.0])
    other = np.array([6.4, 5.95, 6.1, np.nan, 6.2, 3.1])
    gt6 = GapWindowConfig(low=6.0, high=None, include_low=False, include_high=True)
    rows = {r["low"]: r for r in agreement(reference, other, gt6, [5.9, 6.0])}
    # the reference keeps (6, inf): 6.5, 6.05 and 7.0; NaN is never a hit on either side
    assert rows[6.0]["n_oracle"] == 3 and rows[6.0]["n_candidates"] == 3 and rows[6.0]["n_recovered"] == 1
    assert rows[5.9]["n_candidates"] == 4 and rows[5.9]["n_recovered"] == 2
    assert rows[5.9]["recovery"] == pytest.approx(2 / 3) and rows[5.9]["precision"] == pytest.approx(0.5)
    # a window with an upper bound is counted as it is, whatever lower bounds are asked for
    window = GapWindowConfig(low=2.0, high=4.0, include_low=True, include_high=True)
    (only,) = agreement(reference, other, window, [5.9, 6.0])
    assert only["low"] == 2.0 and only["n_recovered"] == only["n_oracle"] == only["n_candidates"] == 1

    found = np.isfinite(other) & (other > 6.0)
    bands = recovery_by_margin(reference, found, 6.0, [0.1, 0.5])
    assert [(b["from"], b["to"], b["n"]) for b in bands] == [(0.0, 0.1, 1), (0.1, 0.5, 1), (0.5, np.inf, 1)]
    # 6.05 (the other says 5.95) is missed, 6.5 found, 7.0 (no prediction) missed
    assert [b["recovered"] for b in bands] == [0.0, 1.0, 0.0]
    empty = recovery_by_margin(reference, found, 6.0, [0.01, 0.02])[1]
    assert empty["n"] == 0 and np.isnan(empty["recovered"])


def test_replica_study_refuses_the_oracles_own_seeds(tmp_path: Path) -> None:
    from bench.studies import oracle_replica

    root = tmp_path / "project"
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "prepared" / "dataset.parquet").write_bytes(b"")
    (root / "params.yaml").write_text((oracle_replica.ROOT / "params.yaml").read_text())
    with pytest.raises(SystemExit) as refused:  # params.yaml's oracle: seed 0, three members
        oracle_replica.main(["--root", str(root), "--work", str(tmp_path / "w"), "train", "--seed", "2"])
    assert refused.value.code == 2 and not (tmp_path / "w").exists()


def test_campaign_variant_is_paired_with_the_pipelines_screeners_by_repeat() -> None:
    from bench.studies.campaign_variant import pipeline_lines

    rows = pd.DataFrame(
        {
            "training_set": ["AL"] * 6,
            "repeat": [0, 0, 1, 1, 2, 2],
            "threshold": [5.5, 6.0] * 3,
            "recovery": [0.9, 0.60, 0.9, 0.50, 0.9, 0.70],
            "precision": [0.1, 0.40, 0.1, 0.30, 0.1, 0.20],
        }
    )
    metrics = pd.DataFrame(
        {
            "experiment": ["Exp2"] * 4 + ["Exp3"],
            "model": ["roost"] * 3 + ["forest", "roost"],
            "gap_window": ["gt6"] * 5,
            "training_set": ["AL"] * 5,
            "repeat": [0, 1, 5, 0, 2],  # repeat 5: not in the variant; the forest and Exp3 rows: not compared
            "recovery": [0.50, 0.55, 0.1, 0.0, 0.0],
            "precision": [0.40, 0.20, 0.1, 0.0, 0.0],
        }
    )
    lines = pipeline_lines(rows, metrics, "Exp2", ["AL", "random"], ["max_per_system=2"])
    (line,) = [line for line in lines if line.startswith("| AL |")]
    # repeats 0 and 1: recovery 60, 50 against 50, 55 (+10, -5); precision 40, 30 against 40, 20 (0, +10)
    assert (
        line
        == "| AL | 2 | 55.0 ± 7.1 | 52.5 ± 3.5 | +2.5 ± 10.6 | 1 of 2 | 35.0 ± 7.1 | 30.0 ± 14.1 | +5.0 ± 7.1 | 1 of 2 |"
    )
    assert "max_per_system=2" in lines[1] and not any(line.startswith("| random |") for line in lines)


def test_campaign_variant_pairs_the_labels_kept_figures_and_changes_the_budget() -> None:
    from bench.studies.campaign_variant import kept_lines, variant_params

    rows = pd.DataFrame(
        {"training_set": "AL", "repeat": [0, 0, 1, 1], "threshold": [5.5, 6.0, 5.5, 6.0],
         "recovery_kept": [0.9, 0.70, 0.9, 0.60], "precision_kept": [0.1, 0.80, 0.1, 0.70]}
    )  # fmt: skip
    kept = pd.DataFrame(
        {"experiment": "Exp2", "model": ["roost", "roost", "forest"], "gap_window": "gt6", "training_set": "AL",
         "repeat": [0, 1, 0], "recovery": [0.60, 0.60, 0.0], "precision": [0.80, 0.60, 0.0]}
    )  # fmt: skip
    (line,) = [line for line in kept_lines(rows, kept, "Exp2", ["AL"]) if line.startswith("| AL |")]
    # recovery 70, 60 against 60, 60 (+10, 0); precision 80, 70 against 80, 60 (0, +10)
    assert line == (
        "| AL | 2 | 65.0 ± 7.1 | 60.0 ± 0.0 | +5.0 ± 7.1 | 1 of 2 | 75.0 ± 7.1 | 70.0 ± 14.1 | +5.0 ± 7.1 | 1 of 2 |"
    )
    assert kept_lines(rows, kept, "Exp3", ["AL"]) == []  # nothing to pair: no table
    params = {
        "experiments": {"experiments": [{"name": "Exp2", "n_initial": 10, "budget": 5}], "campaign": {}}
    }
    changed = variant_params(params, "Exp2", 2, {}, False, budget=40)
    assert changed["experiments"]["experiments"][0]["budget"] == 40
    assert params["experiments"]["experiments"][0]["budget"] == 5  # the project's params are not touched


def test_campaign_variant_falls_back_to_the_committed_table1_unpaired() -> None:
    from bench.studies.campaign_variant import table1_lines

    rows = pd.DataFrame(
        {
            "training_set": ["AL"] * 4 + ["random"] * 2,
            "repeat": [0, 0, 1, 1, 0, 1],
            "threshold": [5.5, 6.0] * 3,
            "recovery": [0.9, 0.80, 0.9, 0.60, 0.3, 0.2],
            "precision": [0.1, 0.50, 0.1, 0.70, 0.3, 0.2],
        }
    )
    gt6 = {"n_repeats": 10, "recovery_mean": 0.568, "recovery_std": 0.081, "precision_mean": 0.448}
    table1 = {"table1": {"Exp2": {"AL": {"roost": {"gt6": gt6 | {"precision_std": 0.115}}}}}}
    lines = table1_lines(rows, table1, "Exp2", ["AL", "random"], ["search=candidates"])
    (line,) = [line for line in lines if line.startswith("| AL |")]
    # the variant at 6 eV: recovery 80, 60; precision 50, 70; the file's means and stds beside them
    assert line == "| AL | 2 | 70.0 ± 14.1 | 56.8 ± 8.1 | 60.0 ± 14.1 | 44.8 ± 11.5 | 10 |"
    assert not any(line.startswith("| random |") for line in lines)  # no Table 1 row for it here
    assert "search=candidates" in lines[1] and "not paired" in lines[1]


def _metrics_rows(recovery: list[float], precision: list[float], training_set: str) -> pd.DataFrame:
    n = len(recovery)
    return pd.DataFrame(
        {
            "experiment": ["Exp2"] * n,
            "training_set": [training_set] * n,
            "model": ["roost"] * n,
            "gap_window": ["gt6"] * n,
            "repeat": range(n),
            "n_train": [1000] * n,
            "r2_holdout": [0.7] * n,
            "r2_test": [0.7] * n,
            "n_candidates": [10] * n,
            "n_recovered": [5] * n,
            "recovery": recovery,
            "precision": precision,
        }
    )


def test_pipeline_diff_pairs_screeners_by_repeat_and_flags_the_unchanged_ones() -> None:
    from bench.studies.pipeline_diff import screening_lines

    before = pd.concat(
        [_metrics_rows([0.5, 0.6], [0.3, 0.4], "AL"), _metrics_rows([0.2, 0.3], [float("nan"), 0.1], "BS")]
    )
    after = pd.concat(
        [
            _metrics_rows([0.6, 0.5, 0.9], [0.3, 0.5, 0.9], "AL"),
            # the common test set lost the new AL formulas, so the BS screeners score another R2 there
            _metrics_rows([0.2, 0.3], [float("nan"), 0.1], "BS").assign(r2_test=0.6),
        ]
    )
    lines = screening_lines(before, after, ["gt6", "2-4"], ["roost", "forest"])
    assert "### roost screeners, > 6 eV" in lines and not any(
        "forest" in line or "2-4" in line for line in lines
    )
    (al,) = [line for line in lines if line.startswith("| Exp2 | AL |")]
    # repeat 2 exists only after, so two repeats pair: recovery +10, -10; precision 0, +10
    assert al == (
        "| Exp2 | AL | 2 | 55.0 ± 7.1 | 55.0 ± 7.1 | +0.0 ± 14.1 | 1 of 2 | 40.0 ± 14.1 | 35.0 ± 7.1 | "
        "+5.0 ± 7.1 | 1 of 2 | no |"
    )
    (bs,) = [line for line in lines if line.startswith("| Exp2 | BS |")]
    assert bs.endswith("| 0 of 1 | yes |")  # a repeat without hits has no precision: unchanged, not compared
    changed = after.assign(n_recovered=np.where(after.training_set == "BS", 4, after.n_recovered))
    (bs,) = [line for line in screening_lines(before, changed, ["gt6"], ["roost"]) if "| BS |" in line]
    assert bs.endswith("| no |")
    with pytest.raises(ValueError, match="share no screener"):
        screening_lines(before.assign(experiment="Exp3"), after, ["gt6"], ["roost"])


def test_pipeline_diff_counts_each_campaigns_finds_and_their_chemical_systems(tmp_path: Path) -> None:
    from bench.studies.pipeline_diff import campaign_lines, campaign_stats

    def state(folder: Path, campaign: str, repeat: int, finds: list[tuple[str, float]]) -> None:
        rows = [{"round": 0, "fate": "initial", "reduced_formula": "LiF", "label": 8.0}]
        rows += [{"round": 1, "fate": "registered", "reduced_formula": f, "label": g} for f, g in finds]
        rows.append({"round": 2, "fate": "undecodable", "reduced_formula": None, "label": float("nan")})
        (folder / campaign).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(folder / campaign / f"repeat-{repeat:02d}.parquet")

    old, new = tmp_path / "old", tmp_path / "new"
    state(old, "Exp2-bo", 0, [("LiF2", 7.0), ("Li2F", 6.5), ("Li3F", 5.0), ("NaCl", 6.1)])
    state(new, "Exp2-bo", 0, [("LiF2", 7.0), ("NaCl", 6.1), ("KBr", 3.0)])
    before, after = campaign_stats(old, 6.0), campaign_stats(new, 6.0)
    assert before.loc[("Exp2-bo", 0)].to_dict() == {
        "finds": 4,
        "high_gap": 3,
        "systems": 2,
        "high_gap_systems": 2,
        "most_in_one_system": 3,
    }
    (line,) = [line for line in campaign_lines(before, after, 6.0) if line.startswith("| Exp2-bo |")]
    assert line == (
        "| Exp2-bo | 1 | 2.0 | 3.0 | -1.0 | 0 of 1 | 2.0 | 2.0 | +0.0 | 0 of 1 | 1.0 | 3.0 | -2.0 | 0 of 1 |"
    )
    named = campaign_lines(before, after, 6.0, names=("variant", "pipeline"))
    assert "| above 6 eV: variant | pipeline |" in named[3] and named[-1] == line
    with pytest.raises(ValueError, match="no campaign state tables"):
        campaign_stats(tmp_path / "empty", 6.0)


def test_screen_rescore_adds_test_compositions_that_no_training_set_holds() -> None:
    from bench.studies.screen_rescore import changed_training_sets

    training = pd.DataFrame(
        {
            "experiment": ["Exp2", "Exp2", "Exp3"],
            "repeat": [0, 1, 0],
            "training_set": ["AL", "AL", "BS"],
            "reduced_formula": ["MgO", "NaCl", "ZnS"],
            "band_gap": [7.0, 5.0, 3.5],
            "origin": ["data", "data", "data"],
        }
    )
    prepared = pd.DataFrame(
        {
            "reduced_formula": ["ZnS", "CaO", "LiF", "MgO", "AlN"],
            "band_gap": [3.5, 6.0, 9.0, 7.0, 4.5],
            "split": ["test", "test", "test", "train", "test"],
        }
    )
    changed, added = changed_training_sets(training, prepared, "Exp2", 1, "AL", 2)
    assert added == ["AlN", "CaO"]  # key order; ZnS is held by Exp3 BS, MgO is not in the test split
    new = changed.iloc[len(training) :]
    assert new[["experiment", "repeat", "training_set"]].drop_duplicates().values.tolist() == [
        ["Exp2", 1, "AL"]
    ]
    assert new["band_gap"].tolist() == [4.5, 6.0] and set(new["origin"]) == {"study"}
    with pytest.raises(SystemExit, match="only 3 test-split compositions"):
        changed_training_sets(training, prepared, "Exp2", 1, "AL", 4)
    with pytest.raises(SystemExit, match="no set Exp4"):
        changed_training_sets(training, prepared, "Exp4", 0, "AL", 1)


def test_labelled_screen_calls_a_sets_own_candidates_by_their_labels() -> None:
    from agd.config import GapWindowConfig
    from agd.screening.metrics import labels_kept_scores as labelled_scores
    from bench.studies.labelled_screen import report_lines

    windows = {"gt6": GapWindowConfig(low=6.0, high=None, include_low=False, include_high=True)}
    oracle = pd.Series({"A": 7.0, "B": 6.5, "C": 5.0, "D": 6.2, "E": 1.0})  # oracle hits: A, B, D
    sets = pd.DataFrame(
        {
            "experiment": "Exp2",
            "repeat": 0,
            "training_set": ["AL", "AL", "AL", "BS"],
            "reduced_formula": ["A", "C", "X", "B"],  # X is not a screened candidate
            "band_gap": [7.0, 5.0, 9.0, 6.5],
        }
    )
    # the AL screener calls C (its own set says 5 eV) and E; the BS screener calls nothing
    hits = pd.DataFrame(
        {"experiment": "Exp2", "repeat": 0, "training_set": "AL", "model": "roost", "gap_window": "gt6",
         "reduced_formula": ["C", "E"]}
    )  # fmt: skip
    metrics = pd.DataFrame(
        {"experiment": "Exp2", "repeat": 0, "training_set": ["AL", "BS"], "model": "roost", "gap_window": "gt6",
         "n_candidates": [2, 0], "n_recovered": [0, 0], "n_oracle": [3, 3]}
    )  # fmt: skip
    scores = labelled_scores(metrics, hits, sets, oracle, windows).set_index("training_set")
    al, bs = scores.loc["AL"], scores.loc["BS"]
    assert (al.n_labelled, al.n_labelled_hits, al.n_labelled_truth) == (2, 1, 1)
    assert (al.model_recovery, al.model_precision) == (0.0, 0.0)
    # labels + model: A (its label) and E (the model; unlabelled), not C (labelled 5 eV)
    assert (al.labelled_n_candidates, al.labelled_n_recovered) == (2, 1)
    assert al.labelled_recovery == pytest.approx(1 / 3) and al.labelled_precision == 0.5
    assert (bs.labelled_n_candidates, bs.labelled_recovery) == (1, pytest.approx(1 / 3))  # B, by its label
    (line,) = [
        line for line in report_lines(scores.reset_index(), windows) if line.startswith("| Exp2 | AL |")
    ]
    assert line == "| Exp2 | AL | 1 | 2.0 | 1.0 | 33.3 | 0.0 | +33.3 | 1 of 1 | 50.0 | 0.0 | +50.0 | 1 of 1 |"
    with pytest.raises(ValueError, match="different runs"):
        labelled_scores(metrics.assign(n_candidates=[3, 0]), hits, sets, oracle, windows)


def test_campaign_variant_folder_takes_spelt_out_defaults_and_refuses_other_settings(tmp_path) -> None:
    from bench.studies.campaign_variant import LINKED, prepare_folder

    root = tmp_path / "project"
    for relative in LINKED:  # empty stand-ins: the folder only links them
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("")
    folder = tmp_path / "variant"
    params = {"experiments": {"campaign": {"surrogate": "forest", "search": "candidates"}}}
    path = prepare_folder(root, folder, params)
    assert (folder / "models/oracle").is_symlink()
    # the same settings with a default spelt out (as params.yaml now names surrogate_forest) still match
    spelt = {
        "experiments": {
            "campaign": params["experiments"]["campaign"] | {"surrogate_forest": {"n_estimators": 100}}
        }
    }
    assert prepare_folder(root, folder, spelt) == path
    other = {
        "experiments": {
            "campaign": params["experiments"]["campaign"] | {"surrogate_forest": {"n_estimators": 7}}
        }
    }
    with pytest.raises(SystemExit, match="other settings"):
        prepare_folder(root, folder, other)


def test_element_coverage_pairs_each_domain_with_the_stages_screening() -> None:
    from agd.config import GapWindowConfig
    from agd.screening.metrics import domain_scores, labels_kept_scores
    from bench.studies.element_coverage import report_lines

    windows = {"gt6": GapWindowConfig(low=6.0, high=None, include_low=False, include_high=True)}
    oracle = pd.Series({"NaF": 7.0, "InF3": 1.0, "LiCl": 6.5, "KF": 3.0})  # oracle hits: NaF, LiCl
    sets = pd.DataFrame(
        {"experiment": "Exp3", "repeat": [0, 0, 1, 1], "training_set": "AL",
         "reduced_formula": ["NaF", "LiCl", "NaF", "InCl3"], "band_gap": [7.0, 6.5, 7.0, 2.0]}
    )  # fmt: skip
    # repeat 0 calls InF3 (no In in its set) and KF (no K); repeat 1 calls InF3 (In once in its set)
    hits = pd.DataFrame(
        {"experiment": "Exp3", "repeat": [0, 0, 1], "training_set": "AL", "model": "roost", "gap_window": "gt6",
         "reduced_formula": ["InF3", "KF", "InF3"]}
    )  # fmt: skip
    metrics = pd.DataFrame(
        {"experiment": "Exp3", "repeat": [0, 1], "training_set": "AL", "model": "roost", "gap_window": "gt6",
         "n_candidates": [2, 1], "n_recovered": [0, 0], "n_oracle": [2, 2]}
    )  # fmt: skip
    base = labels_kept_scores(metrics, hits, sets, oracle, windows)
    domain = domain_scores(metrics, hits, sets, oracle, windows, [1])
    lines = report_lines(domain, base, ["roost"])
    model = lines[lines.index("### roost screeners, gt6, the model alone") + 4]
    # the model alone recovers nothing either way; with the labels kept, repeat 0 lists NaF and LiCl alone
    # (100% precision against 50% with its false calls), repeat 1 still lists InF3 (In occurs once)
    assert model.startswith("| Exp3 | AL | 1 | 2 | 0.5 | 0.0 ± 0.0 | 0.0 ± 0.0 | +0.0 ± 0.0 | 0 of 2 |")
    kept = lines[lines.index("### roost screeners, gt6, the set's labels kept") + 4]
    assert kept == (
        "| Exp3 | AL | 1 | 2 | 2.0 | 75.0 ± 35.4 | 75.0 ± 35.4 | +0.0 ± 0.0 | 0 of 2 "
        "| 75.0 ± 35.4 | 50.0 ± 0.0 | +25.0 ± 35.4 | 1 of 2 |"
    )


def test_a_check_budget_equal_to_the_margin_checks_cost_finds_what_the_stage_check_finds() -> None:
    """The budgeted check against the screen stage's margin check (``check_scores``) on random screeners:
    a budget of exactly what the margin check labels lists the same candidates."""
    from agd.config import GapWindowConfig
    from agd.screening.metrics import check_scores
    from bench.studies.check_budget import checked_recovery

    window = GapWindowConfig(low=6.0, include_low=False)
    rng = np.random.default_rng(3)
    formulas = pd.Index([f"F{i}" for i in range(2_000)], name="reduced_formula")
    oracle = pd.Series(rng.normal(5.0, 1.2, len(formulas)), index=formulas)
    truth = oracle.to_numpy() > 6.0
    for trial in range(5):
        predicted = oracle.to_numpy() + rng.normal(0, 0.5 + 0.2 * trial, len(formulas))
        labelled = rng.random(len(formulas)) < 0.1
        own = np.where(labelled, oracle.to_numpy() + rng.normal(0, 0.3, len(formulas)), np.nan)
        key = {
            "experiment": "Exp2",
            "repeat": trial,
            "training_set": "AL",
            "model": "roost",
            "gap_window": "gt6",
        }
        calls = pd.DataFrame({**key, "reduced_formula": formulas, "predicted_gap": predicted})
        sets = pd.DataFrame({**key, "reduced_formula": formulas[labelled], "band_gap": own[labelled]})
        stage = check_scores(calls, pd.DataFrame([key]), sets, oracle, {"gt6": window}, [0.0, 0.25, 0.5])
        rows = checked_recovery(predicted, own, truth, window, stage["n_checked"].tolist())
        assert [r["n_recovered"] for r in rows] == stage["n_recovered"].tolist()
        assert [r["n_listed"] for r in rows] == stage["n_candidates"].tolist()
        assert [r["recovery"] for r in rows] == pytest.approx(stage["recovery"].tolist())
        assert stage["n_checked"].is_monotonic_increasing and stage["n_checked"].iloc[-1] > 0


def test_a_check_budget_labels_the_best_unlabelled_calls_and_says_when_stored_ones_run_out() -> None:
    from agd.config import GapWindowConfig
    from bench.studies.check_budget import checked_recovery

    window = GapWindowConfig(low=6.0, include_low=False)
    # oracle hits: 0, 2, 3, 5; the set labels 0 (7 eV) and 1 (6.5 eV, an oracle miss)
    truth = np.array([True, False, True, True, False, True])
    own = np.array([7.0, 6.5, np.nan, np.nan, np.nan, np.nan])
    predicted = np.array([9.0, 9.0, 5.9, 6.3, 6.8, np.nan])  # 4, 3, then 2; 5 unknown
    rows = checked_recovery(predicted, own, truth, window, [0, 1, 2, 3, 4], partial=True)
    assert [r["n_checked"] for r in rows] == [0, 1, 2, 3, 3]
    assert [r["n_recovered"] for r in rows] == [1, 1, 2, 3, 3]
    assert [r["n_listed"] for r in rows] == [2, 2, 3, 4, 4]  # 1 is listed by its own (wrong) label
    assert [r["complete"] for r in rows] == [True, True, True, True, False]
    assert rows[3]["recovery"] == 0.75 and np.isnan(rows[4]["recovery"])
    with pytest.raises(ValueError, match="1 unlabelled candidates have no prediction"):
        checked_recovery(predicted, own, truth, window, [1])
    with pytest.raises(ValueError, match="negative"):
        checked_recovery(predicted, own, truth, window, [-1], partial=True)


def test_equal_budget_lines_pair_the_variant_with_the_pipeline_by_repeat() -> None:
    from bench.studies.check_budget import equal_budget_lines

    pipeline = pd.DataFrame(
        {"experiment": "Exp2", "training_set": "AL", "repeat": [0, 0, 1, 1, 2, 2], "budget": [0, 250] * 3,
         "recovery": [0.70, 0.90, 0.60, 0.85, 0.5, 0.5], "complete": [True, True, True, True, True, False]}
    )  # fmt: skip
    variant = pd.DataFrame(
        {"training_set": "AL", "repeat": [0, 1], "threshold": 6.0, "recovery_check_250": [0.80, 0.80]}
    )
    lines = equal_budget_lines(pipeline, variant, "Exp2", 1000, 750)
    assert lines[-2] == "| 1,000 | 2 | 65.0 ± 7.1 | 80.0 ± 0.0 | +15.0 ± 7.1 | 2 of 2 |"
    assert lines[-1] == "| 1,000 + 250 checked | 2 | 87.5 ± 3.5 | 80.0 ± 0.0 | -7.5 ± 3.5 | 0 of 2 |"
    with pytest.raises(SystemExit, match="recovery_check_250"):
        equal_budget_lines(pipeline, variant.drop(columns="recovery_check_250"), "Exp2", 1000, 750)


def test_campaign_curves_count_each_confirmed_hit_once_from_the_initial_samples_on(tmp_path: Path) -> None:
    from agd.config import GapWindowConfig
    from bench.studies.check_budget import campaign_curves

    window = GapWindowConfig(low=6.0, include_low=False)
    folder = tmp_path / "Exp2-bo"
    folder.mkdir()
    # initial: NaCl a hit already; then a miss, a hit (MgF2), MgF2 again, a label above 6 eV that the
    # oracle does not call a hit (LiF), and a hit written another way (F2Ca for CaF2)
    table = pd.DataFrame(
        {"fate": ["initial", "initial", "registered", "registered", "registered", "registered", "registered"],
         "reduced_formula": ["NaCl", "KBr", "GaN", "MgF2", "MgF2", "LiF", "F2Ca"],
         "label": [7.0, 5.0, 3.0, 6.5, 6.5, 6.2, 7.5]}
    )  # fmt: skip
    table.to_parquet(folder / "repeat-00.parquet")
    table.iloc[:5].to_parquet(folder / "repeat-01.parquet")  # a shorter repeat trims every curve
    curves = campaign_curves(tmp_path, "Exp2-bo", {"NaCl", "MgF2", "CaF2"}, window)
    assert curves.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]
    (folder / "repeat-01.parquet").unlink()
    full = campaign_curves(tmp_path, "Exp2-bo", {"NaCl", "MgF2", "CaF2"}, window)
    assert full.tolist() == [[1, 1, 2, 2, 2, 3]]
    assert campaign_curves(tmp_path, "Exp3-bo", {"NaCl"}, window).size == 0  # no such campaign


def test_a_check_in_rounds_adds_each_rounds_labels_before_the_next_ranking() -> None:
    from agd.config import GapWindowConfig
    from bench.studies.iterated_check import iterate

    window = GapWindowConfig(low=6.0, include_low=False)
    candidates = ["A", "B", "C", "D", "E", "F"]
    oracle = np.array([7.0, 5.0, 6.5, 6.8, 1.0, 6.1])  # hits: A, C, D, F
    rows = pd.DataFrame({"key": ["A", "X"], "reduced_formula": ["A", "X"], "band_gap": [7.0, 3.0]})
    seen_sizes = []

    class Screener:  # ranks B, C first; once B is labelled low, it ranks D and F above E
        def __init__(self, formulas):
            self.low = "B" in formulas

        def predict_formulas(self, formulas):
            first = {"A": 9.0, "B": 8.0, "C": 7.5, "D": 1.0, "E": 7.0, "F": 0.5}
            then = {**first, "D": 7.9, "F": 7.8}
            return np.array([(then if self.low else first)[f] for f in formulas])

    def train(formulas, gaps):
        seen_sizes.append(len(formulas))
        return Screener(formulas)

    result = iterate(rows, candidates, oracle, [2, 2], train, window)
    assert seen_sizes == [2, 4]  # the second screener saw the first round's two labels
    assert [r["spent"] for r in result] == [2, 4]
    assert [r["n_recovered"] for r in result] == [2, 4]  # A, C; then D, F
    # one check of 4 with the first screener takes B, C, E and D: with A, three of the four hits
    assert result[0]["one_shot_recovery"] == 0.75
    assert "one_shot_recovery" not in result[1]


def test_kernel_probe_is_deterministic_per_setting_and_sees_the_kernel_choice(
    tiny_split, tmp_path: Path
) -> None:
    from agd.environment import cpu_model, vector_isa
    from bench.studies import kernel_probe

    _, prepared = tiny_split
    out = tmp_path / "probe.md"
    argv = ["--prepared", str(prepared), "--rows", "160", "--epochs", "1", "--out", str(out)]
    assert kernel_probe.main([*argv, "--settings", "native", "native", "aten-default"]) == 0
    rows = [
        line.split(" | ")
        for line in out.read_text().splitlines()
        if line.startswith("| native") or line.startswith("| aten")
    ]
    assert len(rows) == 3 and cpu_model() in out.read_text()
    (first, second, default) = rows
    assert first[3] == second[3] and first[5] == second[5]  # same setting, same bits
    if vector_isa() in ("avx2", "avx512"):
        assert default[2] == "DEFAULT" and default[3] != first[3]  # ATen's plain kernels round otherwise
