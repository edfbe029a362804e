"""Would a screener be more precise if it called no hit on elements its training set barely holds?

    python -m bench.studies.element_coverage --min-rows 3 10 20 40 --out reports/element_coverage.md

A screener trained on an AL set sees many high-gap fluorides of light elements and few compounds of
heavier ones, and calls many fluorides of those heavier elements high that the oracle puts below 3 eV.
This study drops, from each screener's stored hits, every model call on a candidate one of whose
elements occurs in fewer than ``k`` formulas of that screener's own training set (an applicability domain
by element), and scores what remains against the oracle's screening: the model alone (Table 1's
protocol) and with the set's own labels kept (labelled candidates are judged by their labels, never
dropped). The screen stage computes the same table itself with ``screening.domain_min_rows``
(:func:`agd.screening.metrics.domain_scores`, ``domain.parquet``); this study applies it to the outputs of
any run (``--hits``, ``--metrics``: a committed run's files from the DVC cache, say), pairs each level
with the stage's own screening by repeat, and first checks that the hits and the metrics come from the
same run. Nothing is trained: it reads the stage's outputs and the oracle's cached labels in seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from agd.config import load_params
from agd.screening import screen as S
from agd.screening.metrics import SCREENER_KEYS, domain_scores, labels_kept_scores
from bench.studies import emit
from bench.studies.screener_threshold import paired_metric_cells

ROOT = Path(__file__).resolve().parents[2]
#: the figures compared, as (domain table column, labels-kept table column) per view
VIEWS = {
    "the model alone": ({"recovery": "recovery", "precision": "precision"}, "model_"),
    "the set's labels kept": ({"kept_recovery": "recovery", "kept_precision": "precision"}, "labelled_"),
}


def report_lines(domain: pd.DataFrame, base: pd.DataFrame, models: list[str]) -> list[str]:
    """Per model, window and view: each level against the stage's screening (``base``), paired by repeat."""
    lines: list[str] = []
    for (window, model), part in domain.groupby(["gap_window", "model"], sort=True):
        if model not in models:
            continue
        for title, (columns, prefix) in VIEWS.items():
            lines += [
                "",
                f"### {model} screeners, {window}, {title}",
                "",
                "| experiment | training set | min rows | repeats | listed | recovery | stage | difference | ahead "
                "| precision | stage | difference | ahead |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            listed = "n_candidates" if prefix == "model_" else "kept_n_candidates"
            for (experiment, training_set), group in part.groupby(["experiment", "training_set"], sort=True):
                mine = (base["experiment"] == experiment) & (base["training_set"] == training_set)
                stage = base[mine & (base["model"] == model) & (base["gap_window"] == window)]
                stage = stage.set_index("repeat").sort_index()
                stage = stage[[f"{prefix}recovery", f"{prefix}precision"]].set_axis(
                    ["recovery", "precision"], axis=1
                )
                for k, at_k in group.groupby("min_rows", sort=True):
                    at_k = at_k.set_index("repeat").sort_index()
                    cells = paired_metric_cells(
                        at_k[list(columns)].rename(columns=columns),
                        stage.loc[at_k.index],
                        ["recovery", "precision"],
                    )
                    lines.append(
                        f"| {experiment} | {training_set} | {k} | {len(at_k)} | {at_k[listed].mean():,.1f} | "
                        + " | ".join(cells)
                        + " |"
                    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-rows", type=int, nargs="+", default=[3, 10, 20, 40])
    parser.add_argument("--models", nargs="+", default=["roost", "forest"])
    parser.add_argument("--root", type=Path, default=ROOT, help="project whose params and outputs to use")
    parser.add_argument("--hits", type=Path, help="the screen stage's hits (default: the root's)")
    parser.add_argument("--metrics", type=Path, help="the same run's metrics.parquet (default: the root's)")
    parser.add_argument("--out", type=Path, help="markdown report (default: print only)")
    args = parser.parse_args(argv)
    if min(args.min_rows) < 1:
        parser.error("--min-rows must be positive")
    root = args.root
    out = root / "data" / "screening"
    hits_path = args.hits or out / "hits.parquet"
    metrics_path = args.metrics or out / "metrics.parquet"
    sets_path = root / "data/experiments/training_sets.parquet"
    missing = [str(p) for p in (hits_path, metrics_path, sets_path) if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: run `dvc repro pipelines/dvc.yaml:screen` first")
    cfg = load_params(root / "params.yaml").screening
    names = cfg.hit_windows if cfg.hit_windows is not None else list(cfg.windows)
    windows = {name: cfg.windows[name] for name in names}
    candidates = root / "data/generated/candidates.parquet"
    oracle = S.oracle_screen(candidates, root / "models/oracle", out / "state", cfg, progress=False).labels()
    metrics = pd.read_parquet(metrics_path)
    hits = pd.read_parquet(hits_path, columns=[*SCREENER_KEYS, "reduced_formula"])
    sets = pd.read_parquet(sets_path)
    base = labels_kept_scores(metrics, hits, sets, oracle, windows, strict=True)  # same run, or it stops
    domain = domain_scores(metrics, hits, sets, oracle, windows, args.min_rows)
    lines = [
        "# Screeners that call no hit on elements their training set barely holds",
        "",
        f"`python -m bench.studies.element_coverage --min-rows {' '.join(map(str, args.min_rows))}`; hits: "
        f"`{hits_path}`, metrics: `{metrics_path}`; {len(oracle):,} screened candidates. A model call is "
        "left out when one of the candidate's elements occurs in fewer than *min rows* formulas of the "
        "screener's own training set. Mean ± std over repeats in percent; *stage*: the stage's own screening "
        "(Table 1, and its labels-kept table); the difference is paired by repeat, *ahead* counts the repeats "
        "where it is positive; *listed*: the hits that remain.",
        *report_lines(domain, base, args.models),
    ]
    text = "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
