"""Does another campaign setting give screeners that recover more of the oracle's hits?

    python -m bench.studies.campaign_variant --name cap5 --set max_per_system=5 --out reports/campaign_cap5.md

Runs the experiments stage's own code (``agd experiments``) for one experiment of ``params.yaml`` with
some ``experiments.campaign`` settings changed, in a study folder of its own
(``bench/.cache/campaign_variants/<name>``), then trains the screen stage's Roost screeners on its AL
sets and counts their recovery and precision against the oracle's cached screening
(:mod:`bench.studies.screener_threshold`, whose rows file makes a killed study resume). The pipeline's
models and candidates are linked into the folder, not copied: the campaigns use the pipeline's
autoencoder and oracle, and the screeners face the same candidates. Campaign seeds depend on the
experiment's name and repeat only, so repeat ``r`` starts from the same initial samples as the
pipeline's repeat ``r`` and the two can be compared repeat by repeat (``data/screening/metrics.parquet``).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from agd.config import CampaignConfig, load_params, params_from_dict
from bench.studies.pipeline_diff import campaign_lines, campaign_stats
from bench.studies.screener_threshold import paired_metric_cells

ROOT = Path(__file__).resolve().parents[2]

#: what the study folder links from the project: the campaigns' models, the screened candidates and
#: the oracle's cached labels of them (``screen``'s state)
LINKED = (
    "data/prepared/dataset.parquet",
    "data/generated/candidates.parquet",
    "models/oracle",
    "models/autoencoder",
    "data/screening/state",
)


def variant_params(
    params: dict, experiment: str, repeats: int, changes: dict, random: bool, budget: int | None = None
) -> dict:
    """``params.yaml`` reduced to one experiment's Bayesian campaigns (and, with ``random``, its
    control), ``repeats`` repeats, no kappa sweep, with ``changes`` made to ``experiments.campaign``
    (and the experiment's suggestion ``budget`` changed when given)."""
    out = copy.deepcopy(params)
    section = out["experiments"]
    chosen = [e for e in section["experiments"] if e["name"] == experiment]
    if not chosen:
        names = [e["name"] for e in section["experiments"]]
        raise SystemExit(f"params.yaml has no experiment {experiment!r}; it has {names}")
    if budget is not None:
        chosen[0]["budget"] = budget
    section.update(experiments=chosen, repeats=repeats, random_control=random, kappa_sweep=[])
    unknown = sorted(set(changes) - set(CampaignConfig.model_fields))
    if unknown:
        raise SystemExit(
            f"--set {unknown}: not experiments.campaign settings ({sorted(CampaignConfig.model_fields)})"
        )
    section["campaign"].update(changes)
    return out


def prepare_folder(root: Path, folder: Path, params: dict) -> Path:
    """The study folder: links to the project's outputs and the variant's ``params.yaml`` (validated)."""
    for relative in LINKED:
        source, link = root / relative, folder / relative
        if not source.exists():
            raise SystemExit(f"{source} not found: run `dvc repro pipelines/dvc.yaml` first")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() != source.resolve():
                raise SystemExit(f"{link} points elsewhere than {source}; use another --name")
            continue
        link.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    path = folder / "params.yaml"
    # compared as validated settings, so a params.yaml that spells out a default does not refuse the folder
    if path.is_file() and _settings(yaml.safe_load(path.read_text())) != _settings(params):
        raise SystemExit(f"{path} holds other settings: use another --name, or delete {folder}")
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(path)  # the same validation as the pipeline's params.yaml
    return path


def _settings(params: dict) -> dict:
    """``params`` as the pipeline reads them: validated, every default filled in."""
    return params_from_dict(params).model_dump(mode="json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the variant's folder under --work")
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="experiments.campaign changes (repeat --set or list several after one)",
    )
    parser.add_argument("--experiment", default="Exp2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget", type=int, help="the experiment's suggestion budget (default: params.yaml's)"
    )
    parser.add_argument("--random", action="store_true", help="run the random control too, and screen it")
    parser.add_argument("--out", type=Path, help="markdown report of the screeners")
    parser.add_argument("--root", type=Path, default=ROOT, help="project whose params and outputs to use")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".cache" / "campaign_variants")
    args = parser.parse_args(argv)
    changes = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        changes[key] = yaml.safe_load(value)
    params = yaml.safe_load((args.root / "params.yaml").read_text())
    folder = args.work / args.name
    variant = variant_params(params, args.experiment, args.repeats, changes, args.random, args.budget)
    if args.budget is not None:
        args.set = [*args.set, f"budget={args.budget}"]  # named wherever the report lists the changes
    path = prepare_folder(args.root, folder, variant)
    experiments = folder / "data" / "experiments"
    command = [
        sys.executable, "-m", "agd.cli", "--params", str(path), "experiments",
        "--prepared", str(folder / "data/prepared/dataset.parquet"),
        "--autoencoder", str(folder / "models/autoencoder"), "--oracle", str(folder / "models/oracle"),
        "--candidates", str(folder / "data/generated/candidates.parquet"), "--out", str(experiments),
        "--metrics", str(folder / "metrics.json"), "--no-mlflow",
    ]  # fmt: skip
    subprocess.run(command, check=True)  # resumes from the campaigns' state tables when rerun
    from bench.studies import screener_threshold

    sets = ["AL", "random"] if args.random else ["AL"]
    study = ["--root", str(folder), "--experiment", args.experiment, "--repeats", str(args.repeats)]
    study += ["--sets", *sets, "--rows", str(folder / "screeners.csv")]
    if args.out:
        study += ["--out", str(args.out)]
    code = screener_threshold.main(study)
    metrics = args.root / "data" / "screening" / "metrics.parquet"
    table1 = args.root / "metrics" / "screening.json"
    pipeline_campaigns = args.root / "data" / "experiments" / "campaigns"
    lines: list[str] = []
    if code == 0:
        rows = pd.read_csv(folder / "screeners.csv")
        if metrics.is_file():
            lines += pipeline_lines(rows, pd.read_parquet(metrics), args.experiment, sets, args.set)
            kept = args.root / "data" / "screening" / "labels_kept.parquet"
            if kept.is_file() and "recovery_kept" in rows:
                lines += kept_lines(rows, pd.read_parquet(kept), args.experiment, sets)
        elif table1.is_file():  # a clone without the screen stage's outputs still has its Table 1
            lines += table1_lines(rows, json.loads(table1.read_text()), args.experiment, sets, args.set)
        if any(pipeline_campaigns.glob("*/repeat-*.parquet")):
            high_gap = CampaignConfig.model_validate(variant["experiments"]["campaign"]).high_gap
            lines += campaign_lines(
                campaign_stats(pipeline_campaigns, high_gap),
                campaign_stats(experiments / "campaigns", high_gap),
                high_gap,
                names=("variant", "pipeline"),
            )
        else:
            lines += ["", f"(No pipeline campaigns in {pipeline_campaigns} to compare the finds with.)"]
    if lines:
        print("\n".join(lines))
        if args.out:
            with args.out.open("a") as report:
                report.write("\n".join(lines) + "\n")
    return code


def table1_lines(
    rows: pd.DataFrame, metrics: dict, experiment: str, sets: list[str], changes: list[str]
) -> list[str]:
    """The variant's screeners at 6 eV beside the pipeline's Table 1 (``metrics/screening.json``, Roost,
    > 6 eV): means over each side's own repeats, not paired (the per-repeat figures are not in the file)."""
    ours = rows[np.isclose(rows["threshold"], 6.0)]
    lines = [
        "",
        f"Against the pipeline's Table 1 (`metrics/screening.json`, {experiment}, Roost, > 6 eV; its per-repeat "
        f"figures were not on this machine, so the two are not paired by repeat); the variant differs in "
        f"{', '.join(changes) or 'nothing'}:",
        "",
        "| training set | variant repeats | recovery: variant | pipeline | precision: variant | pipeline | "
        "pipeline repeats |",
        "|---|---|---|---|---|---|---|",
    ]
    for training_set in sets:
        mine = ours[ours["training_set"] == training_set]
        stage = (
            metrics.get("table1", {}).get(experiment, {}).get(training_set, {}).get("roost", {}).get("gt6")
        )
        if mine.empty or not stage:
            continue
        cells = []
        for name in ("recovery", "precision"):
            cells.append(f"{100 * mine[name].mean():.1f} ± {100 * mine[name].std():.1f}")
            cells.append(f"{100 * stage[f'{name}_mean']:.1f} ± {100 * (stage[f'{name}_std'] or 0):.1f}")
        lines.append(f"| {training_set} | {len(mine)} | " + " | ".join(cells) + f" | {stage['n_repeats']} |")
    return lines


def pipeline_lines(
    rows: pd.DataFrame, metrics: pd.DataFrame, experiment: str, sets: list[str], changes: list[str]
) -> list[str]:
    """The variant's screeners at 6 eV beside the pipeline's (``metrics.parquet``: its Roost screeners
    of the > 6 eV window) on the same repeats, and the difference paired by repeat, per training set."""
    ours = rows[np.isclose(rows["threshold"], 6.0)].set_index(["training_set", "repeat"])
    stage = metrics[
        (metrics["experiment"] == experiment)
        & (metrics["model"] == "roost")
        & (metrics["gap_window"] == "gt6")
    ].set_index(["training_set", "repeat"])
    lines = [
        "",
        f"Against the pipeline's own screeners (`data/screening/metrics.parquet`, {experiment}, > 6 eV) on the "
        f"same repeats; the variant differs in {', '.join(changes) or 'nothing'} (mean ± std over repeats; "
        "the difference is paired by repeat, in percentage points; ahead: repeats where the variant is higher):",
    ]
    return lines + _paired_table(ours, stage, sets)


def _paired_table(ours: pd.DataFrame, stage: pd.DataFrame, sets: list[str]) -> list[str]:
    """A blank line, then the variant's recovery and precision against the pipeline's per training set,
    paired on the (training_set, repeat) index both have; no row for a set without shared repeats."""
    lines = [
        "",
        "| training set | repeats | recovery: variant | pipeline | difference | ahead | precision: variant | "
        "pipeline | difference | ahead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    shared = ours.index.intersection(stage.index)
    for training_set in sets:
        both = [key for key in shared if key[0] == training_set]
        if both:
            cells = paired_metric_cells(ours.loc[both], stage.loc[both], ["recovery", "precision"])
            lines.append(f"| {training_set} | {len(both)} | " + " | ".join(cells) + " |")
    return lines


def kept_lines(rows: pd.DataFrame, kept: pd.DataFrame, experiment: str, sets: list[str]) -> list[str]:
    """As :func:`pipeline_lines`, with each set's labels kept on both sides (the variant's rows'
    ``recovery_kept`` / ``precision_kept`` against the screen stage's ``labels_kept.parquet``)."""
    ours = rows[np.isclose(rows["threshold"], 6.0)].set_index(["training_set", "repeat"])
    ours = ours[["recovery_kept", "precision_kept"]]
    ours.columns = ["recovery", "precision"]
    stage = kept[
        (kept["experiment"] == experiment) & (kept["model"] == "roost") & (kept["gap_window"] == "gt6")
    ]
    stage = stage.set_index(["training_set", "repeat"])
    lines = [
        "",
        "The same with each training set's own labels kept on both sides (`data/screening/labels_kept.parquet`):",
    ]
    table = _paired_table(ours, stage, sets)
    return lines + table if len(table) > 3 else []  # the heading alone says nothing


if __name__ == "__main__":
    raise SystemExit(main())
