"""End to end: `dvc repro pipelines/dvc.yaml` with the tiny parameter set in a scratch project, then a second
repro that does nothing."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from agd.chem.systems import chemical_system
from agd.environment import cpu_model, installed_versions
from agd.tracking.catalog import CatalogReader
from tests.conftest import REPO_ROOT, read_shared_csv

BAD_ROWS = [
    ("", 1.0),  # empty formula
    ("Xx2O", 2.0),  # unknown element
    ("NaCl", -1.0),  # negative gap
    ("KBr", float("nan")),  # missing gap
    ("Fe0.333O", 1.0),  # fractional, not integral
    ("ZnO", 3.0),  # duplicates: ZnO / Zn2O2 merge
    ("Zn2O2", 3.2),
]


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_dvc_repro_tiny_pipeline(tmp_path, shared_data):
    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "pipelines" / "dvc.yaml", project / "pipelines" / "dvc.yaml")
    (project / "agd").symlink_to(REPO_ROOT / "agd")  # stages depend on their code files
    real = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv").head(300)
    table = pd.concat(
        [real[["composition", "band_gap"]], pd.DataFrame(BAD_ROWS, columns=["composition", "band_gap"])],
        ignore_index=True,
    )
    table.to_csv(project / "mixed.csv", index=False)
    params = yaml.safe_load((REPO_ROOT / "params.tiny.yaml").read_text())
    params["data"]["path"] = "mixed.csv"
    metals = read_shared_csv(shared_data / "mp_gap_by_composition.csv").sample(300, random_state=0)
    metals.to_csv(project / "metals.csv", index=False)
    params["metals_oracle"]["dataset"] = "metals.csv"
    params["structures"]["template_sources"] = [str(shared_data / "structures_mp20_diffhedron.csv.gz")]
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "AGD_DATA", "MP_API_KEY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    _run(["dvc", "init", "--no-scm", "-q"], project, env)
    first = _run(["dvc", "repro", "pipelines/dvc.yaml"], project, env)
    assert "Running stage 'pipelines/dvc.yaml:prepare'" in first, first

    summary = json.loads((project / "metrics" / "data.json").read_text())
    assert summary["rows_in"] == 307
    assert summary["rejected"] == 5 and summary["duplicates_merged"] == 1
    assert summary["rows_out"] == 301
    rejects = pd.read_csv(project / "data" / "prepared" / "rejects.csv", keep_default_na=False)
    assert rejects["row"].tolist() == [301, 302, 303, 304, 305]
    assert rejects["code"].tolist() == ["empty", "unknown_element", "negative_gap", "bad_gap", "fractional"]

    with sqlite3.connect(project / "mlflow.db") as db:
        runs = dict(db.execute("select name, status from runs").fetchall())
        campaign_runs = db.execute(
            "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
            "where t.key = 'agd.role' and t.value = 'repeat' and r.status = 'FINISHED'"
        ).fetchone()[0]
        prepare_id = db.execute("select run_uuid from runs where name = 'prepare'").fetchone()[0]
        logged = dict(
            db.execute("select key, value from metrics where run_uuid = ?", (prepare_id,)).fetchall()
        )
        epochs = db.execute(
            "select count(distinct m.step) from metrics m join runs r on m.run_uuid = r.run_uuid "
            "where r.name = 'train-autoencoder' and m.key = 'val_loss'"
        ).fetchone()[0]
    stages = {
        "prepare",
        "train-oracle",
        "train-oracle-metals",
        "train-autoencoder",
        "train-gan",
        "generate",
        "screen",
    }
    stages |= {"structures", "energy", "export-vasp"}
    assert {name: runs.get(name) for name in stages} == dict.fromkeys(stages, "FINISHED")
    tiny = params["experiments"]
    n_campaigns = (
        len(tiny["experiments"]) * tiny["repeats"] * 2 + len(tiny["kappa_sweep"]) * tiny["kappa_repeats"]
    )
    assert campaign_runs == n_campaigns  # one nested MLflow run per campaign repeat
    assert logged["rows_out"] == 301 and logged["rejected"] == 5
    assert epochs == params["autoencoder"]["epochs"]  # one MLflow step per epoch

    metals = json.loads((project / "metrics" / "oracle_metals.json").read_text())
    assert metals["dataset"]["frac_metal"] > 0.3 and set(metals["metals"]["models"]) == {"roost", "forest"}
    assert metals["reference"]["test"]["metals"]["n_metals"] > 0
    for stage in (
        "oracle",
        "autoencoder",
        "gan",
        "generate",
        "experiments",
        "screening",
        "structures",
        "energy",
    ):
        metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
        # each file says where its figures were made (the same seed gives the same bits on one machine only)
        assert metrics["environment"]["machine"]["cpu"] == cpu_model(), stage
        assert metrics["environment"]["packages"]["torch"] == installed_versions()["torch"], stage
    candidates = pd.read_parquet(project / "data" / "generated" / "candidates.parquet")
    assert len(candidates) > 0 and candidates["reduced_formula"].is_unique
    with CatalogReader(project / "agd.duckdb") as reader:
        counts = reader.tables()
    assert counts["datasets"] == 301 and counts["candidates"] == len(candidates)
    samples = pd.read_parquet(project / "data" / "experiments" / "samples.parquet")
    assert (
        counts["al_samples"] == len(samples)
        and samples.groupby(["campaign", "repeat"]).ngroups == n_campaigns
    )
    # search: candidates (as params.yaml): every suggestion after the initial samples is a valid candidate
    suggested = samples.loc[samples["round"] > 0, "reduced_formula"]
    valid = set(candidates.loc[candidates["valid"], "reduced_formula"])
    assert len(suggested) > 0 and suggested.isin(valid).all(), sorted(set(suggested) - valid)[:5]
    # the campaigns found new formulas, so the AL and random sets are more than their BS samples
    sets = pd.read_parquet(project / "data" / "experiments" / "training_sets.parquet")
    added = sets[sets["origin"] == "oracle"].groupby(["experiment", "training_set"]).size()
    assert added.get(("Exp2", "AL"), 0) > 0 and added.get(("Exp2", "random"), 0) > 0
    assert ("Exp2", "BS") not in added
    screening = pd.read_parquet(project / "data" / "screening" / "metrics.parquet")
    assert counts["screening_metrics"] == len(screening) and set(screening["training_set"]) >= {
        "BS",
        "AL",
        "random",
    }
    kept = pd.read_parquet(project / "data" / "screening" / "labels_kept.parquet")
    # every screener of the stored windows is judged again with its labels, and the AL sets label candidates
    assert counts["screening_labels_kept"] == len(kept) > 0
    assert kept.loc[kept["training_set"] == "AL", "n_labelled"].gt(0).all()
    # params.tiny.yaml checks the near-misses: that costs labels and never recovers less than the labels alone
    check = pd.read_parquet(project / "data" / "screening" / "check.parquet")
    assert len(check) == 2 * len(kept) and check["n_checked"].gt(0).any()
    joined = check.merge(
        kept, on=["experiment", "repeat", "training_set", "model", "gap_window"], suffixes=("", "_kept")
    )
    assert (joined["n_recovered"] >= joined["n_recovered_kept"]).all()
    # ... and scores each screener again within its element domain: a stricter domain lists no more
    domain = pd.read_parquet(project / "data" / "screening" / "domain.parquet")
    assert len(domain) == 2 * len(kept) and sorted(domain["min_rows"].unique()) == [2, 10]
    assert counts["screening_domain"] == len(domain) and counts["screening_check"] == len(check)
    wide = domain.pivot_table(index=["experiment", "repeat", "training_set", "model", "gap_window"],
                              columns="min_rows", values=["n_candidates", "n_dropped"])  # fmt: skip
    assert (wide[("n_candidates", 10)] <= wide[("n_candidates", 2)]).all()
    assert (wide[("n_dropped", 10)] >= wide[("n_dropped", 2)]).all()
    assert 0 < counts["structures"] == len(pd.read_parquet(project / "data" / "vasp" / "structures.parquet"))

    second = _run(["dvc", "repro", "pipelines/dvc.yaml"], project, env)
    assert "Running stage" not in second
    assert "up to date" in second.lower()

    # the labelled-screen study on the stage's outputs: the hits it reads must agree with metrics.parquet
    labelled = _run(
        [sys.executable, "-m", "bench.studies.labelled_screen", "--root", str(project)], REPO_ROOT, env
    )
    assert "| Exp2 | AL | 2 |" in labelled and "### roost screeners, 2-4" in labelled, labelled

    # the screener study on this project's outputs: two-member screeners, resumed from its rows file
    rows = project / "study_rows.csv"
    study = [
        sys.executable,
        "-m",
        "bench.studies.screener_threshold",
        "--root",
        str(project),
        "--rows",
        str(rows),
    ]
    study += ["--ensemble-size", "2", "--roost", "epochs=3", "--window-low", "1", "--thresholds", "1.5", "2"]
    more = [*study, "--sets", "AL", "random"]  # the random control joins in the second run
    study += ["--sets", "AL"]
    _run([*study, "--repeats", "1"], REPO_ROOT, env)
    assert pd.read_csv(rows)["repeat"].tolist() == [0, 0]
    report = _run([*more, "--repeats", "2", "--out", str(project / "study.md")], REPO_ROOT, env)
    assert "AL r0" not in report and "AL r1" in report and "random r0" in report  # AL r0 came from the file
    done = pd.read_csv(rows)
    al = done[done.training_set == "AL"]
    assert al["repeat"].tolist() == [0, 0, 1, 1] and al["threshold"].tolist() == [1.5, 2, 1.5, 2]
    assert done["recovery"].notna().all()  # the tiny oracle labels every candidate above 1 eV
    assert len(done) == 8 and not done.duplicated(["training_set", "repeat", "threshold"]).any()
    assert (done.groupby(["training_set", "repeat"])["n_hits"].diff().dropna() <= 0).all()  # higher: fewer
    # with the labels kept, a threshold only moves the calls on candidates the set does not label
    assert done["recovery_kept"].notna().all() and done["precision_kept"].notna().all()
    assert (done["n_hits_unlabelled"] <= done["n_hits"]).all() and done["n_hits_unlabelled"].gt(0).any()
    changed = subprocess.run(
        [*study, "--repeats", "2", "--window-low", "0.5"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert changed.returncode != 0 and "other settings" in changed.stderr  # not mixed into the rows file
    assert len(pd.read_csv(rows)) == 8
    text = (project / "study.md").read_text()
    assert "the mean of 2 Roost models trained as the screen stage trains it, with epochs=3" in text
    assert "| AL | 2 | 2 |" in text
    paired = done.pivot_table(index=["repeat", "threshold"], columns="training_set", values="recovery")
    gap = 100 * (paired["AL"] - paired["random"]).loc[(slice(None), 2.0)]
    assert f"| 2 | 2 | {gap.mean():+.1f} ± {gap.std():.1f} | {int((gap > 0).sum())} of 2 |" in text

    # screeners refit on all rows of their set are other screeners: refused in this file; in a file of
    # their own, their external-test R2 is the refit model's, not the 80% model's of the rows above
    refit = subprocess.run(
        [*study, "--repeats", "2", "--refit-all"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert refit.returncode != 0 and "other settings" in refit.stderr and len(pd.read_csv(rows)) == 8
    refit_rows = project / "study_refit.csv"
    refit_study = [str(refit_rows) if arg == str(rows) else arg for arg in study]
    refit_report = _run([*refit_study, "--repeats", "1", "--refit-all"], REPO_ROOT, env)
    assert "it screens with a refit on all rows of its set" in refit_report
    refitted = pd.read_csv(refit_rows)
    assert refitted["repeat"].tolist() == [0, 0] and '"refit_all": true' in refitted["settings"][0]
    assert refitted["r2_test"][0] != al["r2_test"].iloc[0]

    # a campaign variant in a folder of its own: the stage's campaigns with one system per find, screened
    variant = [sys.executable, "-m", "bench.studies.campaign_variant", "--root", str(project)]
    variant += ["--work", str(tmp_path / "variants"), "--name", "cap1", "--repeats", "1"]
    bogus = subprocess.run(
        [*variant, "--set", "max_per_systems=1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert bogus.returncode != 0 and "not experiments.campaign settings" in bogus.stderr
    variant += ["--set", "max_per_system=1", "--out", str(project / "cap1.md")]
    first_variant = _run(variant, REPO_ROOT, env)
    cap1 = (project / "cap1.md").read_text()
    assert "AL r0" in first_variant and "| AL | 6 | 1 |" in cap1
    # the variant's labels-kept screening beside the stage's labels_kept.parquet, paired by repeat
    assert "own labels kept on both sides" in cap1 and cap1.count("\n| AL | 1 | ") == 2, cap1
    folder = tmp_path / "variants" / "cap1"
    assert (folder / "models" / "oracle").resolve() == (project / "models" / "oracle").resolve()
    state = pd.read_parquet(folder / "data" / "experiments" / "campaigns" / "Exp2-bo" / "repeat-00.parquet")
    finds = state[(state["round"] > 0) & (state["fate"] == "registered")]
    systems = finds["reduced_formula"].map(chemical_system)
    assert len(finds) and (finds.groupby(systems.to_numpy())["round"].nunique() == 1).all()
    # the pipeline's own repeat 0 started from the same initial samples
    own = pd.read_parquet(project / "data" / "experiments" / "campaigns" / "Exp2-bo" / "repeat-00.parquet")
    assert state.loc[state["round"] == 0, "reduced_formula"].equals(
        own.loc[own["round"] == 0, "reduced_formula"]
    )
    again = _run(variant, REPO_ROOT, env)  # campaigns and screeners come from their tables
    assert "AL r0" not in again and len(pd.read_csv(folder / "screeners.csv")) == 5

    # a replica of the tiny oracle (other seeds), screening the candidates beside the oracle's own labels
    oracle_state = sorted((project / "data" / "screening" / "state" / "oracle").iterdir())
    replica = [sys.executable, "-m", "bench.studies.oracle_replica", "--root", str(project)]
    replica += ["--work", str(tmp_path / "replica")]
    _run([*replica, "train", "--seed", "5"], REPO_ROOT, env)
    text = _run(
        [*replica, "report", "--lows", "1.5", "2", "--out", str(project / "replica.md")], REPO_ROOT, env
    )
    assert sorted((project / "data" / "screening" / "state" / "oracle").iterdir()) == oracle_state
    assert (tmp_path / "replica" / "state" / "seed5" / "oracle").is_dir()
    window = params["screening"]["windows"]["gt6"]["low"]
    n_hits = int(
        (
            pd.concat(pd.read_parquet(p) for p in oracle_state[0].glob("part-*.parquet"))["oracle_gap"]
            > window
        ).sum()
    )
    gt6_lines = [line for line in text.splitlines() if line.startswith("| seed5 | `gt6`")]
    assert len(gt6_lines) == 2 and all(f"| {n_hits:,} |" in line for line in gt6_lines)
    assert "| replica seed5 | 5, 6 |" in text and "| Exp2 | AL | `gt6` | 2 |" in text

    # another screening seed makes other screeners: refused too, not mixed in
    params["screening"]["seed"] += 1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    reseeded = subprocess.run(
        [*study, "--repeats", "2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert reseeded.returncode != 0 and "other settings" in reseeded.stderr and len(pd.read_csv(rows)) == 8
