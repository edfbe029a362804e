"""Does a check that retrains its screener between rounds find more than one check of the same size?

    python -m bench.studies.iterated_check --folder bench/.cache/campaign_variants/budget750_Exp2 \
        --experiment Exp2 --checks 125 125 --rows bench/.cache/iterated_check_Exp2.csv --out reports/iterated_check.md

Starts from the AL training sets of a campaign variant with a smaller budget
(:mod:`bench.studies.campaign_variant` ``--budget 750``). Each round trains the screen stage's Roost
screener on every row of the set (``screening.refit_all``: same seed, same settings), predicts every
candidate, and has the oracle (its cached labels; DFT in a real campaign) label the best unlabelled ones;
those labels join the set before the next round. So a check becomes a few rounds of greedy active
learning with the Roost screener as the surrogate. The first round's screener is the stage's own, so its
one-shot check of the whole budget equals ``recovery_check_N`` of :mod:`bench.studies.check_budget`'s
variant rows, which the report shows as the reference. ``--rows`` keeps finished repeats, so a killed
study resumes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agd.config import GapWindowConfig, load_params
from agd.screening import screen as S
from agd.screening.metrics import window_mask
from bench.studies import emit
from bench.studies.check_budget import checked_recovery
from bench.studies.screener_threshold import _pm, difference_cells, screened_candidates

ROOT = Path(__file__).resolve().parents[2]


def iterate(
    rows: pd.DataFrame,
    candidates: list[str],
    oracle_gaps: np.ndarray,
    checks: list[int],
    train: Callable[[list[str], np.ndarray], Any],
    window: GapWindowConfig,
) -> list[dict]:
    """Rounds of checks: ``train(formulas, gaps)`` gives a screener, whose ``predict_formulas`` ranks the
    candidates; each round the oracle labels the ``checks[i]`` best unlabelled ones, which join ``rows``
    (``key``, ``reduced_formula``, ``band_gap``). One dict per round: the labels spent so far, the oracle's
    hits the set then labels inside ``window`` (``n_recovered``, ``recovery``), and, in the first round,
    the one-shot check of the whole budget with that round's screener (``one_shot_recovery``)."""
    keys = pd.Index(candidates)
    truth = window_mask(oracle_gaps, window)
    labelled = rows.drop_duplicates("key", keep="first").reset_index(drop=True)
    out = []
    spent = 0
    for i, size in enumerate(checks):
        model = train(labelled["reduced_formula"].tolist(), labelled["band_gap"].to_numpy(dtype=float))
        predicted = model.predict_formulas(candidates)
        own = labelled.groupby("key")["band_gap"].mean().reindex(keys).to_numpy()
        record: dict = {"round": i + 1}
        if i == 0:
            (one_shot,) = checked_recovery(predicted, own, truth, window, [sum(checks)], partial=True)
            record["one_shot_recovery"] = one_shot["recovery"]
        unlabelled = np.flatnonzero(np.isnan(own) & ~np.isnan(predicted))
        best = unlabelled[np.argsort(-predicted[unlabelled], kind="stable")[:size]]
        new = pd.DataFrame({"key": keys[best], "reduced_formula": keys[best], "band_gap": oracle_gaps[best]})
        labelled = pd.concat([labelled, new], ignore_index=True)
        spent += len(best)
        own = labelled.groupby("key")["band_gap"].mean().reindex(keys).to_numpy()
        found = int((truth & ~np.isnan(own) & window_mask(own, window)).sum())
        out.append({**record, "spent": spent, "n_recovered": found, "recovery": found / int(truth.sum())})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="a campaign_variant study folder")
    parser.add_argument("--experiment", default="Exp2")
    parser.add_argument("--repeats", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--checks", type=int, nargs="+", default=[125, 125], help="labels per round")
    parser.add_argument("--rows", type=Path, help="CSV of finished repeats (a rerun resumes)")
    parser.add_argument("--out", type=Path, help="markdown report (default: print only)")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="project whose params and oracle cache to use"
    )
    args = parser.parse_args(argv)
    cfg = load_params(args.root / "params.yaml").screening
    window = cfg.windows["gt6"]
    candidates, gaps = screened_candidates(args.root, cfg)
    sets, _ = S.read_training_sets(args.folder / "data/experiments/training_sets.parquet")
    settings = json.dumps(
        {"folder": str(args.folder), "checks": args.checks, "roost": cfg.roost.model_dump()}
    )
    done = pd.read_csv(args.rows) if args.rows and args.rows.is_file() else pd.DataFrame()
    if not done.empty and set(done["settings"]) != {settings}:
        raise SystemExit(f"{args.rows} holds another study's rounds: pass another --rows file")
    results = done.to_dict("records")
    finished = set(done["repeat"]) if not done.empty else set()
    for repeat in args.repeats:
        if repeat in finished:
            continue
        group = S.Group(args.experiment, repeat, "AL", "roost")
        chosen = sets[
            (sets.experiment == args.experiment) & (sets.repeat == repeat) & (sets.training_set == "AL")
        ]
        if chosen.empty:
            raise SystemExit(f"{args.folder}: no {args.experiment} AL set for repeat {repeat}")
        unique = chosen.drop_duplicates("key", keep="first")
        rows = unique.loc[S._usable_for("roost", unique["reduced_formula"].tolist(), cfg)]

        def train(formulas, targets, group=group):
            return S._train_screener("roost", formulas, targets, cfg, group.seed(cfg.seed), False)

        for record in iterate(rows, candidates, gaps, args.checks, train, window):
            results.append({"repeat": repeat, **record, "settings": settings})
            print(
                f"r{repeat} round {record['round']}: {record['spent']} checked, recovery {record['recovery']:.3f}",
                flush=True,
            )
        if args.rows:
            pd.DataFrame(results).to_csv(args.rows, index=False)
    frame = pd.DataFrame(results)
    last = frame[frame["round"] == len(args.checks)].set_index("repeat")["recovery"]
    first = frame[frame["round"] == 1].set_index("repeat")["one_shot_recovery"]
    both = last.index.intersection(first.index)
    lines = [
        f"# A check in rounds: {args.experiment} AL from `{args.folder.name}`, rounds of {args.checks} labels",
        "",
        f"Recovery of the oracle's hits above 6 eV that the set labels after the rounds (all confirmed), against "
        f"one check of {sum(args.checks)} with the first round's screener; mean ± std over {len(both)} repeats, "
        "the difference paired by repeat.",
        "",
        "| rounds | one check | difference | ahead |",
        "|---|---|---|---|",
        f"| {_pm(100 * last[both].mean(), 100 * last[both].std())} | {_pm(100 * first[both].mean(), 100 * first[both].std())} | "
        + " | ".join(difference_cells(100 * (last[both] - first[both])))
        + " |",
    ]
    text = "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
