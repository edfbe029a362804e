"""Screening that keeps the labels a training set already holds.

    python -m bench.studies.labelled_screen --out reports/labelled_screen.md

The screen stage's models predict every generated candidate, the ones their own training set labelled
included, and Table 1 scores those predictions (the paper's protocol). A campaign that searched the
candidates (``experiments.campaign.search: candidates``) has labelled some of them already, with the
oracle as a real one would with DFT, and nobody would trust a model's prediction over such a label.
Here each screener's hit list is rebuilt that way: a candidate its training set labels is a hit when
the label lies in the window, any other candidate when the model says so. Its recovery and precision
against the oracle's screening stand beside the stage's own, paired by repeat. The stage's figures are
recomputed from ``hits.parquet`` and must equal ``metrics.parquet`` row for row, so tables of two runs
cannot be mixed. Nothing is trained or predicted: the study reads the outputs of ``dvc repro
pipelines/dvc.yaml:screen`` (and the oracle's cached labels) in seconds. The screen stage now writes
the same figures itself (``labels_kept.parquet`` and Table 1's last section), with the arithmetic of
:func:`agd.screening.metrics.labels_kept_scores` that this study uses; the study remains as the check
that the hits and metrics of a run agree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from agd.config import GapWindowConfig, load_params
from agd.screening import screen as S
from agd.screening.metrics import SCREENER_KEYS, describe_window, labels_kept_scores, window_mask
from bench.studies import emit
from bench.studies.screener_threshold import paired_metric_cells

ROOT = Path(__file__).resolve().parents[2]


def report_lines(scores: pd.DataFrame, windows: dict[str, GapWindowConfig]) -> list[str]:
    """One table per window and model: labels + model against the model alone, paired by repeat."""
    lines: list[str] = []
    for window_name, window in windows.items():
        for model in sorted(scores["model"].unique()):
            part = scores[(scores["gap_window"] == window_name) & (scores["model"] == model)]
            if part.empty:
                continue
            lines += [
                "",
                f"### {model} screeners, {window_name} {describe_window(window)}",
                "",
                "| experiment | training set | repeats | candidates labelled | of them oracle hits | "
                "recovery: labels + model | model | difference | ahead | "
                "precision: labels + model | model | difference | ahead |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for (experiment, training_set), group in part.groupby(["experiment", "training_set"], sort=True):
                group = group.set_index("repeat").sort_index()
                both = group[["labelled_recovery", "labelled_precision"]].set_axis(
                    ["recovery", "precision"], axis=1
                )
                alone = group[["model_recovery", "model_precision"]].set_axis(
                    ["recovery", "precision"], axis=1
                )
                cells = paired_metric_cells(both, alone, ["recovery", "precision"])
                lines.append(
                    f"| {experiment} | {training_set} | {len(group)} | {group['n_labelled'].mean():,.1f} | "
                    f"{group['n_labelled_truth'].mean():.1f} | " + " | ".join(cells) + " |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="project whose params and outputs to use")
    parser.add_argument("--out", default=None, help="markdown report (default: print only)")
    args = parser.parse_args(argv)
    root = args.root
    cfg = load_params(root / "params.yaml").screening
    out = root / "data" / "screening"
    needed = [out / "metrics.parquet", out / "hits.parquet", root / "data/experiments/training_sets.parquet"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: run `dvc repro pipelines/dvc.yaml:screen` first")
    names = cfg.hit_windows if cfg.hit_windows is not None else list(cfg.windows)
    windows = {name: cfg.windows[name] for name in names}
    candidates = root / "data/generated/candidates.parquet"
    screened = S.oracle_screen(candidates, root / "models/oracle", out / "state", cfg, progress=False)
    oracle = screened.labels()
    metrics = pd.read_parquet(out / "metrics.parquet")
    hits = pd.read_parquet(out / "hits.parquet", columns=[*SCREENER_KEYS, "reduced_formula"])
    sets = pd.read_parquet(root / "data/experiments/training_sets.parquet")
    scores = labels_kept_scores(metrics, hits, sets, oracle, windows)
    lines = [
        "# Screening that keeps the training sets' labels",
        "",
        f"`python -m bench.studies.labelled_screen`: the screen stage's {len(scores)} screeners of "
        f"{', '.join(windows)} on {len(oracle):,} candidates ({screened.oracle_name}'s hits: "
        + ", ".join(f"{n} {int(window_mask(oracle.to_numpy(), w).sum())}" for n, w in windows.items())
        + "). *Labels + model*: a candidate the training set labels is a hit when its label lies in the "
        "window, any other when the model predicts so; *model*: the stage's own screening (Table 1). "
        "Mean ± std over repeats in percent; the difference is paired by repeat, *ahead* counts the repeats "
        "where it is positive. *Candidates labelled*: the set's rows that are screened candidates; *of them "
        "oracle hits*: those the oracle puts in the window.",
        *report_lines(scores, windows),
    ]
    text = "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
