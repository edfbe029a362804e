"""How should a fixed number of oracle (or DFT) labels be split between the campaign and a check?

    python -m bench.studies.check_budget --budgets 0 100 250 500 --out reports/check_budget.md
    python -m bench.studies.check_budget --plot reports/check_budget.png --out reports/check_budget.md \
        --variant Exp2:750=bench/.cache/campaign_variants/budget750_Exp2/screeners.csv

The screen stage's check (``screening.check_margins``) labels every unlabelled candidate a screener puts
within a margin of the window, so what it costs varies from screener to screener. Here the check has a
fixed budget instead: the oracle labels the ``N`` candidates the screener predicts highest among those its
training set does not label, and the final list holds the set's labelled hits and the checked candidates
the oracle puts in the window (every listed candidate is confirmed, so precision is 100% for the checked
part). ``N = 0`` is the set's own labels alone.

The pipeline's screeners are read from the screen stage's state (their hits and near-misses, that is
every prediction within the largest check margin of the window), so a budget is reported only where
those cover it: a screener whose ``N``-th best unlabelled prediction lies below the stored ones has no
figure for ``N``. With ``--variant EXPERIMENT:BUDGET=ROWS`` the study also reads the rows file of
:mod:`bench.studies.screener_threshold` run on a campaign variant with a smaller budget
(:mod:`bench.studies.campaign_variant` ``--budget``), whose screeners predicted every candidate, and sets
each repeat of the variant (campaign labels + check) beside the same repeat of the pipeline (its whole
campaign budget, no check) at an equal number of labels.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from agd.config import GapWindowConfig, load_params
from agd.screening import screen as S
from agd.screening.metrics import SCREENER_KEYS, window_mask
from bench.studies import emit
from bench.studies.screener_threshold import _pm, difference_cells

ROOT = Path(__file__).resolve().parents[2]

#: #4's recovery targets for the AL screeners (percent of the oracle's hits above 6 eV)
TARGETS = {"Exp2": 90.0, "Exp3": 80.0}


def checked_recovery(
    predicted: np.ndarray,
    own_label: np.ndarray,
    truth: np.ndarray,
    window: GapWindowConfig,
    budgets: Sequence[int],
    partial: bool = False,
) -> list[dict]:
    """Counts after the oracle checks, for each budget ``N``, the ``N`` unlabelled candidates with the
    highest ``predicted`` gap (ties in candidate order).

    Arrays run over the same candidates: ``predicted`` is the screener's gap (NaN where unknown),
    ``own_label`` the training set's label (NaN where the set does not label the candidate), ``truth``
    whether the oracle puts it in ``window``. ``partial``: the known predictions are the best ones (a
    stored subset, or all but those the screener could not make), so a budget that reaches past them has
    no figure (``complete`` false); without it, every unlabelled candidate must have a prediction.
    One dict per budget: ``budget``, ``n_checked``, ``n_listed`` (labelled hits + confirmed checks),
    ``n_recovered``, ``recovery`` and ``complete``.
    """
    predicted = np.asarray(predicted, dtype=float)
    own_label = np.asarray(own_label, dtype=float)
    truth = np.asarray(truth, dtype=bool)
    if not (predicted.shape == own_label.shape == truth.shape):
        raise ValueError(f"arrays differ in shape: {predicted.shape}, {own_label.shape}, {truth.shape}")
    labelled = ~np.isnan(own_label)
    known_hits = labelled & window_mask(own_label, window)
    unlabelled = ~labelled
    known = unlabelled & ~np.isnan(predicted)
    if not partial and (unlabelled & ~known).any():
        raise ValueError(f"{int((unlabelled & ~known).sum())} unlabelled candidates have no prediction")
    order = np.flatnonzero(known)
    order = order[np.argsort(-predicted[order], kind="stable")]
    base_listed, base_found = int(known_hits.sum()), int((known_hits & truth).sum())
    confirmed = np.cumsum(truth[order])
    n_truth = int(truth.sum())
    rows = []
    for budget in budgets:
        if budget < 0:
            raise ValueError(f"a check budget cannot be negative, got {budget}")
        n = min(int(budget), len(order))
        # past the stored predictions the N best are unknown, unless every unlabelled candidate is known
        complete = budget <= len(order) or not (unlabelled & ~known).any()
        found = int(confirmed[n - 1]) if n else 0
        rows.append(
            {
                "budget": int(budget),
                "n_checked": n,
                "n_listed": base_listed + found,
                "n_recovered": base_found + found,
                "recovery": (base_found + found) / n_truth if n_truth and complete else np.nan,
                "complete": bool(complete),
            }
        )
    return rows


def oracle_labels(root: Path) -> pd.Series:
    """The oracle's gap of each screened candidate, by reduced formula (the screen stage's cache)."""
    cfg = load_params(root / "params.yaml").screening
    candidates = root / "data/generated/candidates.parquet"
    state = root / "data" / "screening" / "state"
    oracle = S.oracle_screen(candidates, root / "models/oracle", state, cfg, progress=False).labels()
    return oracle[~oracle.index.duplicated()]


def pipeline_rows(
    root: Path, budgets: Sequence[int], oracle: pd.Series, window_name: str = "gt6"
) -> pd.DataFrame:
    """The budgeted check of every Roost screener of the screen stage (from its state folder);
    ``oracle``: :func:`oracle_labels`."""
    cfg = load_params(root / "params.yaml").screening
    if not cfg.check_margins:
        raise SystemExit("params.yaml's screening.check_margins is off: the stage kept no near-misses")
    window = cfg.windows[window_name]
    out = root / "data" / "screening"
    state = out / "state"
    truth = window_mask(oracle.to_numpy(dtype=float), window)
    sets, _ = S.read_training_sets(root / "data/experiments/training_sets.parquet")
    labels = sets.groupby(["experiment", "repeat", "training_set", "key"])["band_gap"].mean()
    metrics = pd.read_parquet(out / "metrics.parquet")
    screeners = metrics[(metrics["model"] == "roost") & (metrics["gap_window"] == window_name)]
    rows = []
    for row in screeners[list(SCREENER_KEYS)].itertuples(index=False):
        group = S.Group(row.experiment, row.repeat, row.training_set, row.model)
        calls = [
            pd.read_parquet(state / "groups" / f"{group.name}.{kind}.parquet") for kind in ("hits", "near")
        ]
        calls = pd.concat([c[c["gap_window"] == window_name] for c in calls], ignore_index=True)
        predicted = calls.groupby("reduced_formula")["predicted_gap"].first().reindex(oracle.index)
        own = labels.loc[(row.experiment, row.repeat, row.training_set)].reindex(oracle.index)
        for result in checked_recovery(
            predicted.to_numpy(), own.to_numpy(), truth, window, budgets, partial=True
        ):
            rows.append({**row._asdict(), **result})
    return pd.DataFrame(rows)


def budget_table(rows: pd.DataFrame) -> list[str]:
    """Recovery after each check budget, mean ± std over the repeats that have a figure."""
    lines = [
        "| experiment | set | check budget | repeats | checked | listed | recovery (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (experiment, training_set, budget), part in rows.groupby(["experiment", "training_set", "budget"]):
        part = part[part["complete"]]
        if part.empty:
            lines.append(f"| {experiment} | {training_set} | {budget} | 0 | — | — | — |")
            continue
        lines.append(
            f"| {experiment} | {training_set} | {budget} | {len(part)} | {part['n_checked'].mean():.1f} | "
            f"{part['n_listed'].mean():.1f} | {_pm(100 * part['recovery'].mean(), 100 * part['recovery'].std())} |"
        )
    return lines


def equal_budget_lines(
    pipeline: pd.DataFrame, variant: pd.DataFrame, experiment: str, total: int, campaign: int
) -> list[str]:
    """The variant (``campaign`` labels, then a check of ``total - campaign``) against the pipeline's
    AL screeners with their whole campaign and no check, and with a check of the same size, by repeat."""
    check = total - campaign
    column = f"recovery_check_{check}"
    if column not in variant:
        raise SystemExit(
            f"the variant's rows have no {column}: run screener_threshold with --check-budgets {check}"
        )
    ours = variant[np.isclose(variant["threshold"], 6.0) & (variant["training_set"] == "AL")]
    ours = ours.set_index("repeat")[column]
    mine = pipeline[(pipeline["experiment"] == experiment) & (pipeline["training_set"] == "AL")]
    lines = [
        "",
        f"### {experiment} AL: {total:,} campaign labels, or {campaign:,} and a check of {check}",
        "",
        "| pipeline labels | repeats | pipeline recovery (%) | variant recovery (%) | variant minus pipeline | ahead |",
        "|---|---|---|---|---|---|",
    ]
    for budget in (0, check):
        stage = mine[(mine["budget"] == budget) & mine["complete"]].set_index("repeat")["recovery"]
        both = ours.index.intersection(stage.index)
        if both.empty:
            continue
        diff = 100 * (ours.loc[both] - stage.loc[both])
        label = f"{total:,}" if budget == 0 else f"{total:,} + {check} checked"
        cells = [
            _pm(100 * stage.loc[both].mean(), 100 * stage.loc[both].std()),
            _pm(100 * ours.loc[both].mean(), 100 * ours.loc[both].std()),
            *difference_cells(diff),
        ]
        lines.append(f"| {label} | {len(both)} | " + " | ".join(cells) + " |")
    return lines


def campaign_curves(campaigns: Path, campaign: str, truth: set[str], window: GapWindowConfig) -> np.ndarray:
    """Oracle hits the campaign has labelled after each of its suggestions (repeats x budget + 1): a
    candidate counts once the campaign (or its initial samples) labels it inside ``window`` and the oracle
    puts it there too, as the labelled hits of :func:`checked_recovery`."""
    from agd.chem.formula import formula_key

    curves = []
    for path in sorted((campaigns / campaign).glob("repeat-*.parquet")):
        table = pd.read_parquet(path, columns=["fate", "reduced_formula", "label"])
        keys = [formula_key(f) if isinstance(f, str) and f else None for f in table["reduced_formula"]]
        hit = np.array([k in truth for k in keys]) & window_mask(table["label"].to_numpy(dtype=float), window)
        seen: set[str] = set()
        counts = []  # the initial samples come first; then one count per suggestion
        for key, is_hit, fate in zip(keys, hit, table["fate"], strict=True):
            if is_hit:
                seen.add(key)
            if fate != "initial":
                counts.append(len(seen))
        initial = int((table["fate"] == "initial").sum())
        start = len({k for k, h in zip(keys[:initial], hit[:initial], strict=True) if h})
        curves.append([start, *counts])
    if not curves:
        return np.zeros((0, 0))
    width = min(len(c) for c in curves)
    return np.array([c[:width] for c in curves], dtype=float)


def plot_curves(
    path: Path,
    curves: dict[str, np.ndarray],
    pipeline: pd.DataFrame,
    variants: dict[str, list[tuple[pd.DataFrame, int]]],
    n_truth: int,
    target: dict[str, float],
) -> None:
    """Recovery (confirmed hits only) against the oracle labels spent after the initial samples, one panel
    per experiment: the campaign, then a check after its whole budget, and after a smaller budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        recovery = 100 * curves[name] / n_truth
        x = np.arange(recovery.shape[1])
        mean, std = recovery.mean(axis=0), recovery.std(axis=0, ddof=1)
        ax.plot(x, mean, color="C0", label="campaign (Bayesian, forest surrogate)")
        ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.2, lw=0)
        mine = pipeline[(pipeline["experiment"] == name) & (pipeline["training_set"] == "AL")]
        full = mine.groupby("budget").filter(lambda g: bool(g["complete"].all()))
        if not full.empty:
            by = full.groupby("budget")["recovery"]
            budgets = np.array(sorted(full["budget"].unique()))
            m, s = 100 * by.mean().loc[budgets].to_numpy(), 100 * by.std().loc[budgets].to_numpy()
            ax.plot(
                x[-1] + budgets,
                m,
                color="C1",
                label=f"then the screener's best {budgets[-1]} checked",
            )
            ax.fill_between(x[-1] + budgets, m - s, m + s, color="C1", alpha=0.2, lw=0)
        for i, (rows, campaign) in enumerate(variants.get(name, [])):
            colour = f"C{2 + i}"  # after the campaign's C0 and the check's C1
            rows = rows[np.isclose(rows["threshold"], 6.0) & (rows["training_set"] == "AL")]
            columns = sorted(
                (c for c in rows if c.startswith("recovery_check_")), key=lambda c: int(c.split("_")[-1])
            )
            budgets = [0, *(int(c.split("_")[-1]) for c in columns)]
            # a smaller budget suggests what the pipeline's campaign suggested first (same seeds), so its
            # curve leaves the campaign's at ``campaign``
            m = [mean[campaign], *(100 * rows[c].mean() for c in columns)]
            ax.plot([campaign + b for b in budgets], m, "o-", color=colour,
                    label=f"{campaign} suggestions, then a check")  # fmt: skip
        if name in target:
            ax.axhline(target[name], color="grey", ls="--", lw=1, label=f"target {target[name]:g}%")
        ax.set_title(f"{name} AL: every listed hit confirmed by the oracle")
        ax.set_xlabel("oracle labels after the initial samples")
        ax.set_ylabel(f"recovery of the oracle's {n_truth} hits (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 100, 250, 500])
    parser.add_argument(
        "--variant",
        nargs="+",
        default=[],
        metavar="EXPERIMENT:BUDGET=ROWS",
        help="a screener_threshold rows file of a campaign variant of EXPERIMENT with BUDGET suggestions",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="project whose params and outputs to use")
    parser.add_argument("--out", type=Path, help="markdown report (default: print only)")
    parser.add_argument("--plot", type=Path, help="PNG of recovery against labels spent, per experiment")
    args = parser.parse_args(argv)
    oracle = oracle_labels(args.root)
    rows = pipeline_rows(args.root, args.budgets, oracle)
    params = load_params(args.root / "params.yaml")
    budgets = {e.name: e.budget for e in params.experiments.experiments}
    lines = [
        "# A fixed check budget: the oracle labels the N best unlabelled calls of each screener",
        "",
        "`python -m bench.studies.check_budget`: the screen stage's Roost screeners of the > 6 eV window (read "
        "from its state). *Listed*: the set's labelled hits plus the checked candidates the oracle confirms (the "
        "checked ones are right by construction; BS and Exp1 rows carry MP's gaps, which the oracle need not "
        "confirm); *recovery*: of the oracle's hits; a screener whose stored predictions do not reach N has no "
        "figure for N (*repeats* counts those that do). The equal-budget tables pair each repeat of a campaign "
        "variant with a smaller budget (`python -m bench.studies.campaign_variant --budget`), its screener "
        "checking the rest of the 1,000 labels, with the same repeat of the pipeline.",
        "",
        *budget_table(rows),
    ]
    variants: dict[str, list[tuple[pd.DataFrame, int]]] = {}
    for item in args.variant:
        name, sep, path = item.partition("=")
        experiment, colon, budget = name.partition(":")
        if not (sep and colon and budget.isdigit()):
            parser.error(f"--variant {item!r}: expected EXPERIMENT:BUDGET=ROWS, e.g. Exp2:750=rows.csv")
        if experiment not in budgets:
            parser.error(f"--variant {item!r}: params.yaml has no experiment {experiment!r}")
        variant = pd.read_csv(path)
        variants.setdefault(experiment, []).append((variant, int(budget)))
        lines += equal_budget_lines(rows, variant, experiment, budgets[experiment], int(budget))
    if args.plot:
        window = params.screening.windows["gt6"]
        truth = set(oracle.index[window_mask(oracle.to_numpy(dtype=float), window)])
        campaigns = args.root / "data" / "experiments" / "campaigns"
        shown = sorted(set(rows.loc[rows["training_set"] == "AL", "experiment"]))
        curves = {e: campaign_curves(campaigns, f"{e}-bo", truth, window) for e in shown}
        curves = {e: c for e, c in curves.items() if c.size}
        if not curves:
            raise SystemExit(f"no campaign tables under {campaigns} to plot: run the experiments stage first")
        plot_curves(args.plot, curves, rows, variants, len(truth), TARGETS)
        lines += ["", f"![recovery against labels spent]({args.plot.name})"]
    text = "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
