"""Two runs of the pipeline's campaigns and screening side by side, paired by repeat.

    python -m bench.studies.pipeline_diff --before-metrics OLD/metrics.parquet \\
        --before-campaigns OLD/campaigns --title "max_per_system 2 against no cap" --out reports/X.md

Before changing a setting (say ``experiments.campaign.max_per_system``), copy the screen stage's
``data/screening/metrics.parquet`` and the experiments stage's ``data/experiments/campaigns`` aside; rerun
``dvc repro`` and this report sets every screener of the new run beside the old one of the same
experiment, training set, model, gap window and repeat, and every campaign beside its old self. A repeat
keeps its seed and initial samples from run to run, so the difference per repeat is the fair one, and its
spread says whether the change is larger than the noise. Screeners the change cannot touch (the BS sets,
Exp1's ALL) should find the same hits; the report says which did.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from agd.chem.systems import system_spread
from bench.studies.screener_threshold import paired_metric_cells

ROOT = Path(__file__).resolve().parents[2]
KEY = ["experiment", "training_set", "model", "gap_window"]
#: compared when asking whether a screener changed: what it was trained on and what it found. Not its
#: scores on the common test set, which loses every formula any training set holds, so a change to the
#: AL sets moves the R2 of every screener.
SCORES = ["n_train", "r2_holdout", "n_candidates", "n_recovered", "recovery", "precision"]
WINDOW_NAMES = {"gt6": "> 6 eV", "2-4": "2-4 eV"}


def screening_lines(
    before: pd.DataFrame, after: pd.DataFrame, windows: list[str], models: list[str]
) -> list[str]:
    """One table per gap window and model: recovery and precision of each training set before and after,
    the difference paired by repeat, and whether the screeners are unchanged (every score equal)."""
    lines: list[str] = []
    old = before.set_index([*KEY, "repeat"]).sort_index()
    new = after.set_index([*KEY, "repeat"]).sort_index()
    shared = old.index.intersection(new.index)
    if shared.empty:
        raise ValueError("the two metrics tables share no screener (experiment, set, model, window, repeat)")
    for window in windows:
        for model in models:
            groups = sorted({key[:4] for key in shared if key[2] == model and key[3] == window})
            if not groups:
                continue
            lines += [
                "",
                f"### {model} screeners, {WINDOW_NAMES.get(window, window)}",
                "",
                "| experiment | training set | repeats | recovery: after | before | difference | ahead | "
                "precision: after | before | difference | ahead | unchanged |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for group in groups:
                keys = [key for key in shared if key[:4] == group]
                a, b = new.loc[keys], old.loc[keys]
                cells = paired_metric_cells(a, b, ["recovery", "precision"])
                same = np.allclose(
                    a[SCORES].to_numpy(float), b[SCORES].to_numpy(float), rtol=0, atol=1e-12, equal_nan=True
                )
                unchanged = "yes" if same else "no"
                lines.append(
                    f"| {group[0]} | {group[1]} | {len(keys)} | " + " | ".join(cells) + f" | {unchanged} |"
                )
    return lines


def campaign_stats(folder: Path, high_gap: float) -> pd.DataFrame:
    """Per campaign and repeat (one state table each): the campaign's finds (registered after the initial
    samples), those above ``high_gap``, how many chemical systems they span and the most in one system."""
    rows = []
    for path in sorted(folder.glob("*/repeat-*.parquet")):
        table = pd.read_parquet(path, columns=["round", "fate", "reduced_formula", "label"])
        finds = table[(table["round"] > 0) & (table["fate"] == "registered")]
        spread = system_spread(finds["reduced_formula"], finds["label"] > high_gap)
        rows.append({"campaign": path.parent.name, "repeat": int(path.stem.split("-")[1]), **spread})
    if not rows:
        raise ValueError(f"{folder}: no campaign state tables (<campaign>/repeat-NN.parquet)")
    return pd.DataFrame(rows).set_index(["campaign", "repeat"]).sort_index()


def campaign_lines(
    before: pd.DataFrame, after: pd.DataFrame, high_gap: float, names: tuple[str, str] = ("after", "before")
) -> list[str]:
    """Each campaign's finds above ``high_gap`` and their chemical systems, after against before (the
    columns' ``names``)."""
    columns = ["high_gap", "high_gap_systems", "most_in_one_system"]
    new, old = names
    lines = [
        "",
        f"Per campaign and repeat: finds above {high_gap:g} eV, the chemical systems (element sets) those "
        f"span, and the most finds (any gap) in one system; {new}, {old}, the difference paired by repeat, "
        "and the repeats where it is positive.",
        "",
        f"| campaign | repeats | above {high_gap:g} eV: {new} | {old} | difference | ahead | their systems: {new} "
        f"| {old} | difference | ahead | most in one system: {new} | {old} | difference | ahead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shared = before.index.intersection(after.index)
    for campaign in sorted({key[0] for key in shared}):
        keys = [key for key in shared if key[0] == campaign]
        cells = paired_metric_cells(after.loc[keys], before.loc[keys], columns, scale=1)
        lines.append(f"| {campaign} | {len(keys)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-metrics", type=Path, required=True, help="the earlier run's metrics.parquet")
    ap.add_argument("--after-metrics", type=Path, default=ROOT / "data/screening/metrics.parquet")
    ap.add_argument("--before-campaigns", type=Path, help="the earlier run's data/experiments/campaigns")
    ap.add_argument("--after-campaigns", type=Path, default=ROOT / "data/experiments/campaigns")
    ap.add_argument("--high-gap", type=float, default=6.0)
    ap.add_argument("--windows", nargs="+", default=["gt6", "2-4"])
    ap.add_argument("--models", nargs="+", default=["roost", "forest"])
    ap.add_argument("--title", default="Two pipeline runs, paired by repeat")
    ap.add_argument("--out", type=Path, help="markdown report (printed when absent)")
    args = ap.parse_args(argv)
    for path in (args.before_metrics, args.after_metrics):
        if not path.exists():
            raise SystemExit(
                f"{path}: no such metrics table (the screen stage writes data/screening/metrics.parquet)"
            )
    lines = [
        f"# {args.title}",
        "",
        f"After: `{args.after_metrics}`; before: `{args.before_metrics}`. Mean ± std over the repeats both "
        "runs have, in percent; the difference is after minus before, paired by repeat, in points; ahead: "
        "repeats where after is higher; unchanged: every repeat's training rows, hold-out R2 and hits equal.",
    ]
    if args.before_campaigns:
        lines += ["", "## Campaigns"]
        lines += campaign_lines(
            campaign_stats(args.before_campaigns, args.high_gap),
            campaign_stats(args.after_campaigns, args.high_gap),
            args.high_gap,
        )
    lines += ["", "## Screeners"]
    lines += screening_lines(
        pd.read_parquet(args.before_metrics), pd.read_parquet(args.after_metrics), args.windows, args.models
    )
    report = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    else:
        print(report, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
