"""How far can a screener's decision threshold move the screening recovery and precision?

    python -m bench.studies.screener_threshold --experiment Exp2 --repeats 10 --out reports/screener_threshold.md
    python -m bench.studies.screener_threshold --sets AL --repeats 5 --ensemble-size 3 --out reports/screener_ensemble3.md

Trains the screen stage's Roost screeners exactly as the stage does (same split, seed and params, via
``agd.screening.screen``) for every training set of one experiment and each repeat, predicts every
candidate the stage screens, and counts, against the oracle's cached labels, the recovery and precision
of the > 6 eV window when a candidate is called a hit above thresholds below 6 eV. Needs the outputs of
``dvc repro pipelines/dvc.yaml:screen`` (training sets, candidates, oracle, the oracle's cached labels).

``--ensemble-size`` replaces the stage's one Roost per screener by the mean of several (seeds seed ..
seed + k - 1), to see whether a steadier screener agrees better with the oracle. ``--refit-all``
screens with a model refit on all rows of its set (``screening.refit_all``), as the paper's screeners saw
their whole set; its R² test is then that model's. ``--check-budgets`` adds, per screener, the
recovery after the oracle checks its N best unlabelled calls (:mod:`bench.studies.check_budget`;
threshold-free, so the same in each of its rows). With ``--rows FILE``
each finished screener's figures are appended to a CSV and a rerun skips them, so a killed study
resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from agd.config import GapWindowConfig, ScreeningConfig, load_params
from agd.screening import screen as S

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="Exp2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5.0, 5.25, 5.5, 5.75, 6.0])
    parser.add_argument("--window-low", type=float, default=6.0, help="the oracle's hit window: gap > this")
    parser.add_argument("--sets", nargs="+", default=None, help="training sets (default: every one)")
    parser.add_argument("--ensemble-size", type=int, default=None, help="Roost members per screener")
    parser.add_argument(
        "--roost",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="other screening.roost settings (YAML values)",
    )
    parser.add_argument(
        "--refit-all",
        action="store_true",
        help="screen with a model refit on all rows of its set (screening.refit_all: true)",
    )
    parser.add_argument(
        "--check-budgets",
        type=int,
        nargs="+",
        default=[100, 250, 500],
        help="also count the recovery after the oracle checks the N best unlabelled calls "
        "(bench.studies.check_budget; columns recovery_check_N)",
    )
    parser.add_argument("--rows", default=None, help="CSV of finished screeners (appended; a rerun resumes)")
    parser.add_argument("--out", default=None, help="markdown report (default: print only)")
    parser.add_argument("--root", type=Path, default=ROOT, help="project whose params and outputs to use")
    args = parser.parse_args(argv)
    root = args.root
    from bench.studies.check_budget import checked_recovery  # that module imports this one's helpers

    params = load_params(root / "params.yaml")
    cfg = params.screening
    overrides = {}
    for item in args.roost:
        key, sep, value = item.partition("=")
        if not sep or key not in type(cfg.roost).model_fields:
            raise SystemExit(f"--roost {item!r}: expected KEY=VALUE with KEY a screening.roost setting")
        overrides[key] = yaml.safe_load(value)
    if args.ensemble_size:
        overrides["ensemble_size"] = args.ensemble_size
    if overrides:  # validated as params.yaml is
        try:
            roost = type(cfg.roost)(**{**cfg.roost.model_dump(), **overrides})
        except ValueError as exc:  # pydantic's ValidationError names the field and the problem
            raise SystemExit(f"--roost / --ensemble-size: {exc}") from None
        cfg = cfg.model_copy(update={"roost": roost})
    if args.refit_all:
        cfg = cfg.model_copy(update={"refit_all": True})
    members = cfg.roost.ensemble_size
    training, _ = S.read_training_sets(root / "data/experiments/training_sets.parquet")
    test = S.external_test_set(root / "data/prepared/dataset.parquet", set(training["key"]))
    formulas, oracle_gaps = screened_candidates(root, cfg)
    truth = oracle_gaps > args.window_low
    candidate_keys = pd.Index(formulas)
    print(
        f"{len(formulas):,} candidates, {int(truth.sum())} oracle hits (> {args.window_low:g} eV)", flush=True
    )

    # what makes a screener's figures comparable: a rows file made with other settings is not resumed
    settings = {
        "experiment": args.experiment,
        "roost": cfg.roost.model_dump(),
        "seed": cfg.seed,  # the screeners' split and initial weights
        "holdout_fraction": cfg.holdout_fraction,
        "thresholds": args.thresholds,
        "window_low": args.window_low,
        "n_candidates": len(formulas),
    }
    if cfg.refit_all:  # only when set, so the rows files of earlier studies (no refit) still resume
        settings["refit_all"] = True
    settings = json.dumps(settings, sort_keys=True)
    rows_file = Path(args.rows) if args.rows else None
    rows = pd.read_csv(rows_file).to_dict("records") if rows_file and rows_file.exists() else []
    other = {str(r.get("settings")) for r in rows} - {settings}  # "nan": a file without the column
    if other:
        raise SystemExit(
            f"{rows_file} holds screeners made with other settings ({sorted(other)[0]}); "
            f"this run's are {settings}: pass another --rows file"
        )
    done = {(r["training_set"], r["repeat"]) for r in rows}
    sets = training.loc[training.experiment == args.experiment, "training_set"].unique()
    if args.sets:
        unknown = sorted(set(args.sets) - set(sets))
        if unknown:
            raise SystemExit(f"{args.experiment} has no training set {unknown}; it has {sorted(sets)}")
        sets = [s for s in sets if s in args.sets]
    for repeat in range(args.repeats):
        for training_set in sets:
            if (training_set, repeat) in done:
                continue
            chosen = training[
                (training.experiment == args.experiment)
                & (training.repeat == repeat)
                & (training.training_set == training_set)
            ]
            if chosen.empty:
                continue
            group = S.Group(args.experiment, repeat, training_set, "roost")
            start = time.perf_counter()
            prepared = S._prepare_group(group, chosen, test, "study", cfg, progress=False)
            predicted = prepared.screener.predict_formulas(formulas)
            seconds = time.perf_counter() - start
            # oracle hits the training set itself holds (a campaign that searched the candidates labelled them)
            unseen = truth & ~candidate_keys.isin(chosen["key"])
            # the set's own labels of the candidates it holds (NaN elsewhere), for the labels-kept figures
            own = chosen.groupby("key")["band_gap"].mean()
            own_label = own.reindex(candidate_keys).to_numpy()
            labelled = ~np.isnan(own_label)
            window = GapWindowConfig(low=args.window_low, include_low=False)
            checks = {
                f"recovery_check_{r['budget']}": r["recovery"]
                # a candidate the screener cannot predict (NaN) is never checked, as it is never called
                for r in checked_recovery(
                    predicted, own_label, truth, window, args.check_budgets, partial=True
                )
            }
            new = []
            for threshold in args.thresholds:
                hit = predicted > threshold
                found = int((hit & truth).sum())
                # labels kept: a labelled candidate is a hit when its label is in the window
                kept = np.where(labelled, own_label > args.window_low, hit)
                kept_found = int((kept & truth).sum())
                new.append(
                    {
                        "training_set": training_set,
                        "repeat": repeat,
                        "threshold": threshold,
                        "n_hits": int(hit.sum()),
                        "recovery": found / truth.sum(),
                        "precision": found / hit.sum() if hit.any() else np.nan,
                        "r2_test": prepared.info["r2_test"],
                        "truth_in_set": int(truth.sum() - unseen.sum()),
                        "recovery_unseen": int((hit & unseen).sum()) / unseen.sum()
                        if unseen.any()
                        else np.nan,
                        # what checking every unlabelled hit with the oracle (or DFT) would cost: after
                        # that check the hits are the labels-kept ones, and all of them are right
                        "n_hits_unlabelled": int((hit & ~labelled).sum()),
                        "recovery_kept": kept_found / truth.sum(),
                        "precision_kept": kept_found / kept.sum() if kept.any() else np.nan,
                        **checks,  # threshold-free: the same in every row of this screener
                        "settings": settings,
                    }
                )
            rows += new
            if rows_file:  # rewritten whole: rows of older studies lack the newer columns
                rows_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = rows_file.with_name(f".{rows_file.name}.tmp")
                pd.DataFrame(rows).to_csv(tmp, index=False)
                tmp.replace(rows_file)
            last = new[-1]
            print(
                f"{training_set} r{repeat}: {seconds:.0f} s; at {last['threshold']:g} eV recovery {last['recovery']:.3f}, "
                f"precision {last['precision']:.3f}",
                flush=True,
            )
    frame = pd.DataFrame(rows)
    # absent from rows files of older studies
    for column in ("truth_in_set", "recovery_unseen", "n_hits_unlabelled", "recovery_kept", "precision_kept"):
        if column not in frame:
            frame[column] = np.nan
    summary = frame.groupby(["training_set", "threshold"]).agg(
        repeats=("repeat", "nunique"),
        hits=("n_hits", "mean"),
        recovery=("recovery", "mean"),
        recovery_std=("recovery", "std"),
        precision=("precision", "mean"),
        precision_std=("precision", "std"),
        r2_test=("r2_test", "mean"),
        truth_in_set=("truth_in_set", "mean"),
        recovery_unseen=("recovery_unseen", "mean"),
        recovery_unseen_std=("recovery_unseen", "std"),
        hits_unlabelled=("n_hits_unlabelled", "mean"),
        recovery_kept=("recovery_kept", "mean"),
        recovery_kept_std=("recovery_kept", "std"),
        precision_kept=("precision_kept", "mean"),
        precision_kept_std=("precision_kept", "std"),
    )
    lines = [
        f"# Screener decision threshold: {args.experiment}, Roost screeners, oracle window > {args.window_low:g} eV",
        "",
        f"{len(formulas):,} screened candidates, {int(truth.sum())} oracle hits; mean ± std over repeats.",
        "A candidate is a hit when the screener predicts more than the threshold.",
        f"Each screener is {'one Roost model' if members == 1 else f'the mean of {members} Roost models'}"
        " trained as the screen stage trains it"
        + (f", with {', '.join(args.roost)}" if args.roost else "")
        + ("; it screens with a refit on all rows of its set" if cfg.refit_all else "")
        + "; R² test is on the stage's external test set.",
        "Oracle hits in the set: how many of the oracle's hits the training set itself holds (a campaign that "
        "searches the candidates labels some); recovery of the others: the recovery of the hits it does not hold; "
        "labels kept: a candidate the set labels is a hit when its label is above the window's bound, any other "
        "when the model says so (as the screen stage's labels-kept table); unlabelled hits: the model's hits the "
        "set does not label, the labels it would cost to check them all, after which the labels-kept recovery is "
        "reached at 100% precision.",
        "",
        "| training set | threshold (eV) | repeats | hits | recovery (%) | precision (%) | R² test | "
        "oracle hits in the set | recovery of the others (%) | unlabelled hits | labels kept: recovery (%) | "
        "precision (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (training_set, threshold), r in summary.iterrows():
        lines.append(
            f"| {training_set} | {threshold:g} | {int(r.repeats)} | {r.hits:,.0f} | "
            f"{_pm(100 * r.recovery, 100 * r.recovery_std)} | {_pm(100 * r.precision, 100 * r.precision_std)} | "
            f"{r.r2_test:.3f} | {_count(r.truth_in_set)} | "
            f"{_pm(100 * r.recovery_unseen, 100 * r.recovery_unseen_std)} | {_count(r.hits_unlabelled)} | "
            f"{_pm(100 * r.recovery_kept, 100 * r.recovery_kept_std)} | "
            f"{_pm(100 * r.precision_kept, 100 * r.precision_kept_std)} |"
        )
    lines += _paired_lines(frame, "AL", "random")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


def screened_candidates(root: Path, cfg: ScreeningConfig) -> tuple[list[str], np.ndarray]:
    """The screen stage's candidates (reduced formulas, in order) and the oracle's cached gap of each."""
    candidates = root / "data/generated/candidates.parquet"
    oracle = S.oracle_screen(candidates, root / "models/oracle", root / "data/screening/state", cfg, False)
    gaps = oracle.gaps()
    formulas = [f for t in S._candidate_batches(candidates, cfg) for f in t["reduced_formula"].to_pylist()]
    if len(formulas) != len(gaps):
        raise SystemExit("the oracle's cached labels do not match the candidates: rerun the screen stage")
    return formulas, gaps


def _count(value: float) -> str:
    """A mean count to one decimal; a dash where the rows lack it."""
    return "—" if pd.isna(value) else f"{value:,.1f}"


def _pm(mean: float, std: float, sign: str = "") -> str:
    """``mean ± std`` to one decimal; a dash where there is no value (no hits, so no precision)."""
    if np.isnan(mean):
        return "—"
    return f"{mean:{sign}.1f} ± {std:.1f}" if not np.isnan(std) else f"{mean:{sign}.1f}"


def _paired_lines(frame: pd.DataFrame, first: str, second: str) -> list[str]:
    """``first`` minus ``second`` per repeat both have, at each threshold (empty without both sets).

    Repeats share their initial samples, so the per-repeat difference is the fair comparison: its spread
    is the one the AL-beats-random question asks about.
    """
    key = ["repeat", "threshold"]
    a = frame[frame.training_set == first].set_index(key)
    b = frame[frame.training_set == second].set_index(key)
    both = a.index.intersection(b.index)
    if both.empty:
        return []
    diff = (a.loc[both, ["recovery", "precision"]] - b.loc[both, ["recovery", "precision"]]) * 100
    lines = [
        "",
        f"{first} minus {second}, paired by repeat (percentage points; ahead: repeats where {first} is higher):",
        "",
        "| threshold (eV) | repeats | recovery | ahead | precision | ahead |",
        "|---|---|---|---|---|---|",
    ]
    for threshold, d in diff.groupby(level="threshold"):
        cells = [*difference_cells(d.recovery), *difference_cells(d.precision)]
        lines.append(f"| {threshold:g} | {len(d)} | " + " | ".join(cells) + " |")
    return lines


def difference_cells(diff: pd.Series | np.ndarray) -> list[str]:
    """Per-repeat differences (points) as two table cells: mean ± std, and how many repeats are ahead, of
    those with a value (precision is undefined for a screener without hits)."""
    diff = pd.Series(np.asarray(diff, dtype=float)).dropna()
    return [_pm(diff.mean(), diff.std(), "+"), f"{int((diff > 0).sum())} of {len(diff)}"]


def paired_metric_cells(
    first: pd.DataFrame, second: pd.DataFrame, columns: list[str], scale: float = 100
) -> list[str]:
    """Per column: ``first`` and ``second`` (mean ± std over repeats, times ``scale``), then ``first`` minus
    ``second`` paired by repeat (:func:`difference_cells`). The two frames are indexed alike, one row a repeat."""
    cells = []
    for column in columns:
        a, b = scale * first[column], scale * second[column]
        cells += [_pm(a.mean(), a.std()), _pm(b.mean(), b.std())]
        cells += difference_cells(a.to_numpy() - b.to_numpy())
    return cells


if __name__ == "__main__":
    raise SystemExit(main())
