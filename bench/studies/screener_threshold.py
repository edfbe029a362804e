"""How far can a screener's decision threshold move the screening recovery and precision?

    python -m bench.studies.screener_threshold --experiment Exp2 --repeats 10 --out reports/screener_threshold.md

Trains the screen stage's Roost screeners exactly as the stage does (same split, seed and params, via
``agd.screening.screen``) for every training set of one experiment and each repeat, predicts every
candidate the stage screens, and counts, against the oracle's cached labels, the recovery and precision
of the > 6 eV window when a candidate is called a hit above thresholds below 6 eV. Needs the outputs of
``dvc repro pipelines/dvc.yaml:screen`` (training sets, candidates, oracle, the oracle's cached labels).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from agd.config import load_params
from agd.screening import screen as S

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="Exp2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5.0, 5.25, 5.5, 5.75, 6.0])
    parser.add_argument("--window-low", type=float, default=6.0, help="the oracle's hit window: gap > this")
    parser.add_argument("--out", default=None, help="markdown report (default: print only)")
    args = parser.parse_args(argv)

    params = load_params(ROOT / "params.yaml")
    cfg = params.screening
    training, _ = S.read_training_sets(ROOT / "data/experiments/training_sets.parquet")
    test = S.external_test_set(ROOT / "data/prepared/dataset.parquet", set(training["key"]))
    candidates = ROOT / "data/generated/candidates.parquet"
    oracle = S.oracle_screen(candidates, ROOT / "models/oracle", ROOT / "data/screening/state", cfg, False)
    oracle_gaps = oracle.gaps()
    formulas = [f for t in S._candidate_batches(candidates, cfg) for f in t["reduced_formula"].to_pylist()]
    if len(formulas) != len(oracle_gaps):
        raise SystemExit("the oracle's cached labels do not match the candidates: rerun the screen stage")
    truth = oracle_gaps > args.window_low
    print(
        f"{len(formulas):,} candidates, {int(truth.sum())} oracle hits (> {args.window_low:g} eV)", flush=True
    )

    rows = []
    sets = training.loc[training.experiment == args.experiment, "training_set"].unique()
    for repeat in range(args.repeats):
        for training_set in sets:
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
            for threshold in args.thresholds:
                hit = predicted > threshold
                found = int((hit & truth).sum())
                rows.append(
                    {
                        "training_set": training_set,
                        "repeat": repeat,
                        "threshold": threshold,
                        "n_hits": int(hit.sum()),
                        "recovery": found / truth.sum(),
                        "precision": found / hit.sum() if hit.any() else np.nan,
                    }
                )
            last = rows[-1]
            print(
                f"{training_set} r{repeat}: {seconds:.0f} s; at 6 eV recovery {last['recovery']:.3f}, "
                f"precision {last['precision']:.3f}",
                flush=True,
            )
    frame = pd.DataFrame(rows)
    summary = frame.groupby(["training_set", "threshold"]).agg(
        repeats=("repeat", "nunique"),
        hits=("n_hits", "mean"),
        recovery=("recovery", "mean"),
        recovery_std=("recovery", "std"),
        precision=("precision", "mean"),
        precision_std=("precision", "std"),
    )
    lines = [
        f"# Screener decision threshold: {args.experiment}, Roost screeners, oracle window > {args.window_low:g} eV",
        "",
        f"{len(formulas):,} screened candidates, {int(truth.sum())} oracle hits; mean ± std over repeats.",
        "A candidate is a hit when the screener predicts more than the threshold.",
        "",
        "| training set | threshold (eV) | repeats | hits | recovery (%) | precision (%) |",
        "|---|---|---|---|---|---|",
    ]
    for (training_set, threshold), r in summary.iterrows():
        lines.append(
            f"| {training_set} | {threshold:g} | {int(r.repeats)} | {r.hits:,.0f} | "
            f"{100 * r.recovery:.1f} ± {100 * r.recovery_std:.1f} | {100 * r.precision:.1f} ± {100 * r.precision_std:.1f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
