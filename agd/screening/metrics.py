"""Screening arithmetic: band-gap windows, recovery / precision / F1, and the paper's Table 1.

The paper (Xin et al. 2021, Table 1) judges a screening model by how many of the reference model's
high-gap candidates it finds again: ``recovery = recovered / reference``. Here the reference is the
oracle's own screening of the same candidates, and precision (``recovered / model hits``) and F1
sit beside recovery, because a model that calls everything a hit recovers everything.

Table 1 is the per-repeat metrics averaged over repeats: mean and sample standard deviation
(``ddof=1``; NaN, shown as "n/a", when there is one repeat) per experiment, training set, model and
window.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from agd.chem.formula import parse_formula
from agd.config import GapWindowConfig

#: The columns that identify one Table-1 cell (repeats are averaged over).
TABLE1_KEYS = ("experiment", "training_set", "model", "gap_window")

#: Per-repeat numbers averaged into Table 1, in report order.
TABLE1_METRICS = (
    "n_train",
    "r2_holdout",
    "mae_holdout",
    "rmse_holdout",
    "r2_test",
    "mae_test",
    "rmse_test",
    "n_candidates",
    "n_oracle",
    "n_recovered",
    "recovery",
    "precision",
    "f1",
)

#: Training sets in the order the report lists them; others follow alphabetically.
SET_ORDER = ("ALL", "BS", "AL", "random")

#: The paper's Roost screening of its GAN candidates for gaps > 6 eV (Table 1 and its candidate lists in
#: ../shared/data/agd_paper/roost_simple_candidate_*.csv). The paper's reference is its Exp1 model's 102
#: candidates; ``n_recovered`` counts the compositions each list shares with those 102 (checked in the tests).
PAPER_TABLE1: dict[tuple[str, str], dict[str, float]] = {
    ("Exp1", "ALL"): {"n_candidates": 102, "n_recovered": 102, "recovery": 1.0, "precision": 1.0},
    ("Exp2", "BS"): {"n_candidates": 123, "n_recovered": 53, "recovery": 53 / 102, "precision": 53 / 123},
    ("Exp2", "AL"): {"n_candidates": 171, "n_recovered": 80, "recovery": 80 / 102, "precision": 80 / 171},
    ("Exp3", "BS"): {"n_candidates": 33, "n_recovered": 3, "recovery": 3 / 102, "precision": 3 / 33},
    ("Exp3", "AL"): {"n_candidates": 81, "n_recovered": 59, "recovery": 59 / 102, "precision": 59 / 81},
}
#: The paper's files behind PAPER_TABLE1, by (experiment, training set); the reference list is ("Exp1", "ALL").
PAPER_CANDIDATE_FILES: dict[tuple[str, str], str] = {
    ("Exp1", "ALL"): "roost_simple_candidate_exp1_M0_0224.csv",
    ("Exp2", "BS"): "roost_simple_candidate_exp2_bs_M10001.csv",
    ("Exp2", "AL"): "roost_simple_candidate_exp2_bo_M10016.csv",
    ("Exp3", "BS"): "roost_simple_candidate_exp3_base.csv",
    ("Exp3", "AL"): "roost_simple_candidate_exp3_bo.csv",
}
PAPER_WINDOW = "gt6"
PAPER_MODEL = "roost"


def window_mask(gaps: np.ndarray, window: GapWindowConfig) -> np.ndarray:
    """Boolean mask of the gaps inside ``window``; NaN (no prediction) is never inside."""
    gaps = np.asarray(gaps, dtype=float)
    inside = np.isfinite(gaps)
    if window.low is not None:
        inside &= (gaps >= window.low) if window.include_low else (gaps > window.low)
    if window.high is not None:
        inside &= (gaps <= window.high) if window.include_high else (gaps < window.high)
    return inside


def describe_window(window: GapWindowConfig) -> str:
    """Interval notation of a window in eV, e.g. '(6, inf)' or '[2, 4]'."""
    left = "[" if window.include_low and window.low is not None else "("
    right = "]" if window.include_high and window.high is not None else ")"
    low = f"{window.low:g}" if window.low is not None else "-inf"
    high = f"{window.high:g}" if window.high is not None else "inf"
    return f"{left}{low}, {high}{right} eV"


def counts_metrics(n_candidates: int, n_oracle: int, n_recovered: int) -> dict[str, float]:
    """Recovery, precision and F1 from the three counts; NaN where a ratio has nothing to divide by."""
    if n_recovered > min(n_candidates, n_oracle) or min(n_candidates, n_oracle, n_recovered) < 0:
        raise ValueError(
            f"inconsistent counts: {n_recovered} recovered of {n_candidates} model and {n_oracle} oracle hits"
        )
    recovery = n_recovered / n_oracle if n_oracle else math.nan
    precision = n_recovered / n_candidates if n_candidates else math.nan
    # 2PR/(P+R) simplifies to this, which is also defined when one of P and R is not
    total = n_candidates + n_oracle
    f1 = 2 * n_recovered / total if total else math.nan
    return {
        "n_candidates": int(n_candidates),
        "n_oracle": int(n_oracle),
        "n_recovered": int(n_recovered),
        "recovery": recovery,
        "precision": precision,
        "f1": f1,
    }


def recovery_metrics(model_hits: Any, oracle_hits: Any) -> dict[str, float]:
    """Counts, recovery (recovered / oracle), precision (recovered / model) and F1 of a screening.

    Either two boolean masks over the same candidates, or two collections of formulas (compared as sets).
    """
    if isinstance(model_hits, np.ndarray) and isinstance(oracle_hits, np.ndarray):
        if model_hits.dtype != bool or oracle_hits.dtype != bool:
            raise TypeError("masks must be boolean arrays")
        if model_hits.shape != oracle_hits.shape:
            raise ValueError(f"masks differ in shape: {model_hits.shape} and {oracle_hits.shape}")
        return counts_metrics(
            int(model_hits.sum()), int(oracle_hits.sum()), int((model_hits & oracle_hits).sum())
        )
    model_set, oracle_set = _as_set(model_hits), _as_set(oracle_hits)
    return counts_metrics(len(model_set), len(oracle_set), len(model_set & oracle_set))


def _as_set(hits: Collection[str] | Iterable[str]) -> set[str]:
    if isinstance(hits, str):
        raise TypeError("give a collection of formulas, not one string")
    return set(hits)


def _order_key(column: pd.Series) -> pd.Series:
    """Sort key for Table-1 rows: experiments naturally (Exp2 < Exp10), training sets in SET_ORDER."""
    if column.name == "training_set":
        rank = {name: i for i, name in enumerate(SET_ORDER)}
        return column.map(lambda v: (rank.get(v, len(rank)), str(v)))
    if column.name == "experiment":
        return column.map(_natural)
    return column


def _natural(text: str) -> tuple:
    digits = "".join(ch for ch in str(text) if ch.isdigit())
    return (str(text).rstrip("0123456789"), int(digits) if digits else -1, str(text))


def aggregate_table1(
    frame: pd.DataFrame, windows: Sequence[str] | None = None, metrics: Sequence[str] = TABLE1_METRICS
) -> pd.DataFrame:
    """Table 1: ``<metric>_mean`` / ``<metric>_std`` over repeats and ``n_repeats`` per experiment, set, model, window.

    ``frame`` has one row per (experiment, repeat, model, training_set, gap_window), as written to
    ``metrics.parquet``. The standard deviation is the sample one (NaN for a single repeat). Rows come
    out sorted by experiment, training set (ALL, BS, AL, random, others), model and window (in the
    order of ``windows`` when given). ``metrics``: the columns averaged, those ``frame`` has of them.
    """
    missing = [c for c in (*TABLE1_KEYS, "repeat") if c not in frame.columns]
    if missing:
        raise ValueError(f"metrics frame lacks column(s) {missing}")
    metrics = [m for m in metrics if m in frame.columns]
    if frame.empty:
        columns = [*TABLE1_KEYS, "n_repeats", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))]
        return pd.DataFrame(columns=columns)
    duplicated = frame.duplicated([*TABLE1_KEYS, "repeat"])
    if duplicated.any():
        first = frame.loc[duplicated, [*TABLE1_KEYS, "repeat"]].iloc[0].to_dict()
        raise ValueError(f"metrics frame has {int(duplicated.sum())} duplicate row(s), e.g. {first}")
    values = frame[list(metrics)].astype(float)
    grouped = values.groupby([frame[k] for k in TABLE1_KEYS], sort=False)
    mean = grouped.mean().add_suffix("_mean")
    std = grouped.std(ddof=1).add_suffix("_std")
    counts = frame.groupby(list(TABLE1_KEYS), sort=False)["repeat"].nunique().rename("n_repeats")
    table = pd.concat([counts, mean, std], axis=1)
    table = table[["n_repeats", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))]].reset_index()
    order = list(windows) if windows is not None else list(dict.fromkeys(frame["gap_window"]))
    rank = {name: i for i, name in enumerate(order)}
    table["_window"] = table["gap_window"].map(lambda w: (rank.get(w, len(rank)), str(w)))
    table = table.sort_values(
        ["experiment", "training_set", "model", "_window"], key=_order_key, kind="stable"
    )
    return table.drop(columns="_window").reset_index(drop=True)


#: One screener's figures of one window: the rows of ``metrics.parquet`` and of the labels-kept table.
SCREENER_KEYS = ("experiment", "repeat", "training_set", "model", "gap_window")


def _set_labels(sets: pd.DataFrame, screened: pd.Index) -> tuple[pd.DataFrame, dict[tuple, pd.DataFrame]]:
    """The training sets' labels of screened candidates (the mean where a set holds one twice), all of
    them and by (experiment, repeat, training_set)."""
    sets = sets[sets["reduced_formula"].isin(screened)]
    labels = sets.groupby(["experiment", "repeat", "training_set", "reduced_formula"], sort=False)["band_gap"]
    labels = labels.mean().reset_index()
    return labels, {key: part for key, part in labels.groupby(["experiment", "repeat", "training_set"])}


def _known(labels: pd.DataFrame, window: GapWindowConfig) -> tuple[set[str], set[str]]:
    """The candidates a set labels, and those of them it labels inside ``window``."""
    inside = window_mask(labels["band_gap"].to_numpy(dtype=float), window)
    return set(labels["reduced_formula"]), set(labels.loc[inside, "reduced_formula"])


def _table_head(header: str) -> list[str]:
    """A markdown table's header line and its separator."""
    return [header, "|" + "---|" * (header.count("|") - 1)]


def _section_head(title: str, text: str, header: str) -> list[str]:
    """A report section's opening: its title, a paragraph, and the head of its table."""
    return ["", f"## {title}", "", text, "", *_table_head(header)]


def labels_kept_scores(
    metrics: pd.DataFrame,
    hits: pd.DataFrame,
    sets: pd.DataFrame,
    oracle: pd.Series,
    windows: Mapping[str, GapWindowConfig],
    strict: bool = True,
) -> pd.DataFrame:
    """Each screener's counts when the labels its own training set holds replace its predictions.

    A screener predicts every candidate, those its training set labelled included, and Table 1 scores
    the predictions (the paper's protocol). A campaign that searched the candidates has labelled some of
    them, as a real one does with DFT, and nobody would trust a model over such a label. Here a candidate
    the set labels is a hit when its label (the mean, should the set hold it twice) lies in the window,
    any other candidate when the model calls it a hit.

    ``metrics``: ``metrics.parquet`` rows (those of windows outside ``windows`` are skipped); ``hits``: the
    screeners' hits (:data:`SCREENER_KEYS` and ``reduced_formula``); ``sets``: training rows (experiment,
    repeat, training_set, reduced_formula, band_gap); ``oracle``: the oracle's gap of each screened
    candidate, indexed by reduced formula. Formulas are compared as given, so all three must spell them
    the same way (the canonical key of :func:`agd.chem.formula.formula_key`).

    One row per screener and window: the model's counts recomputed from ``hits`` (``model_*``), the counts
    with the labels kept (``labelled_*``), and ``n_labelled`` (candidates the set labels),
    ``n_labelled_hits`` (of them labelled inside the window) and ``n_labelled_truth`` (of them oracle
    hits). With ``strict`` a recount that differs from ``metrics`` raises ValueError (the hits come from
    another run); without, the recount stands (a candidate table holding a formula twice counts it once).
    """
    screened = oracle.index
    gaps = oracle.to_numpy(dtype=float)
    labels, labelled = _set_labels(sets, screened)
    found = {key: set(part["reduced_formula"]) for key, part in hits.groupby(list(SCREENER_KEYS))}
    rows = []
    for window_name, window in windows.items():
        truth = set(screened[window_mask(gaps, window)])
        for row in metrics[metrics["gap_window"] == window_name].itertuples(index=False):
            key = tuple(getattr(row, k) for k in SCREENER_KEYS)
            model_hits = found.get(key, set())
            model = counts_metrics(len(model_hits), len(truth), len(model_hits & truth))
            stated = (row.n_candidates, row.n_recovered, row.n_oracle)
            if strict and (model["n_candidates"], model["n_recovered"], model["n_oracle"]) != stated:
                raise ValueError(
                    f"{key}: the hits give {model['n_candidates']} hits, {model['n_recovered']} recovered of "
                    f"{model['n_oracle']}; the metrics {stated[0]}, {stated[1]} of {stated[2]}: "
                    "the tables come from different runs"
                )
            known_formulas, known_hits = _known(labelled.get(key[:3], labels.iloc[:0]), window)
            combined = known_hits | (model_hits - known_formulas)
            both = counts_metrics(len(combined), len(truth), len(combined & truth))
            rows.append(
                {
                    **dict(zip(SCREENER_KEYS, key, strict=True)),
                    "n_labelled": len(known_formulas),
                    "n_labelled_hits": len(known_hits),
                    "n_labelled_truth": len(known_formulas & truth),
                    **{f"model_{k}": v for k, v in model.items()},
                    **{f"labelled_{k}": v for k, v in both.items()},
                }
            )
    return pd.DataFrame(rows)


def widen_window(window: GapWindowConfig, margin: float) -> GapWindowConfig:
    """``window`` with each finite bound moved out by ``margin`` eV (an open side stays open)."""
    return window.model_copy(
        update={
            "low": None if window.low is None else window.low - margin,
            "high": None if window.high is None else window.high + margin,
        }
    )


#: Per-screener columns of the check table besides :data:`SCREENER_KEYS` and ``margin``, in order.
CHECK_METRICS = ("n_checked", "n_candidates", "n_oracle", "n_recovered", "recovery", "precision", "f1")


def check_scores(
    calls: pd.DataFrame,
    screeners: pd.DataFrame,
    sets: pd.DataFrame,
    oracle: pd.Series,
    windows: Mapping[str, GapWindowConfig],
    margins: Sequence[float],
) -> pd.DataFrame:
    """Each screener's figures after the oracle checks the candidates it calls in a widened window.

    A verify round: the screener's own training set labels some candidates (kept, as in
    :func:`labels_kept_scores`); every other candidate the screener predicts inside the window widened by
    ``margin`` is checked with the oracle (DFT in a real campaign), and the final list holds the set's
    labelled hits and the checked candidates the oracle puts in the window. ``n_checked`` is what the
    check costs; the checked part of the list is right by construction.

    ``calls``: the screeners' predictions (:data:`SCREENER_KEYS`, ``reduced_formula``, ``predicted_gap``)
    covering at least each window widened by the largest margin; ``screeners``: the screeners to score
    (:data:`SCREENER_KEYS`; one with no calls scores too); ``sets``, ``oracle``: as in
    :func:`labels_kept_scores`. One row per screener, window of ``windows`` and margin.
    """
    screened = oracle.index
    gaps = oracle.to_numpy(dtype=float)
    labels, labelled = _set_labels(sets, screened)
    by_screener = {key: part for key, part in calls.groupby(list(SCREENER_KEYS))}
    rows = []
    for window_name, window in windows.items():
        truth = set(screened[window_mask(gaps, window)])
        for row in screeners[screeners["gap_window"] == window_name].itertuples(index=False):
            key = tuple(getattr(row, k) for k in SCREENER_KEYS)
            known_formulas, known_hits = _known(labelled.get(key[:3], labels.iloc[:0]), window)
            mine = by_screener.get(key, calls.iloc[:0])
            for margin in margins:
                wide = window_mask(mine["predicted_gap"].to_numpy(dtype=float), widen_window(window, margin))
                checked = set(mine.loc[wide, "reduced_formula"]) - known_formulas
                final = known_hits | (checked & truth)
                counts = counts_metrics(len(final), len(truth), len(final & truth))
                rows.append(
                    {**dict(zip(SCREENER_KEYS, key, strict=True)), "margin": float(margin),
                     "n_checked": len(checked), **counts}
                )  # fmt: skip
    columns = [*SCREENER_KEYS, "margin", *CHECK_METRICS]
    return pd.DataFrame(rows, columns=columns)


def _aggregate_by(
    frame: pd.DataFrame, by: str, metrics: Sequence[str], windows: Sequence[str] | None
) -> pd.DataFrame:
    """:func:`aggregate_table1` for each value of ``by``, which becomes a key column after the others."""
    if frame.empty:
        return pd.DataFrame(columns=[*TABLE1_KEYS, by, "n_repeats"])
    parts = []
    for value, part in frame.groupby(by, sort=True):
        table = aggregate_table1(part, windows=windows, metrics=metrics)
        table.insert(len(TABLE1_KEYS), by, value)
        parts.append(table)
    table = pd.concat(parts, ignore_index=True)
    order = table[list(TABLE1_KEYS)].drop_duplicates().reset_index(drop=True).reset_index()
    table = table.merge(order, on=list(TABLE1_KEYS)).sort_values(["index", by], kind="stable")
    return table.drop(columns="index").reset_index(drop=True)


def _nested_json(table: pd.DataFrame, by: str, name: Any) -> dict[str, Any]:
    """An aggregated table nested as experiment -> set -> model -> window -> ``name(by)`` -> figures."""
    out: dict[str, Any] = {}
    values = [c for c in table.columns if c not in (*TABLE1_KEYS, by)]
    for row in table.to_dict("records"):
        cell = out.setdefault(row["experiment"], {}).setdefault(row["training_set"], {})
        cell = cell.setdefault(row["model"], {}).setdefault(row["gap_window"], {})
        cell[name(row[by])] = {c: (int(row[c]) if c == "n_repeats" else _finite(row[c])) for c in values}
    return out


def aggregate_check(frame: pd.DataFrame, windows: Sequence[str] | None = None) -> pd.DataFrame:
    """The check table over repeats: :func:`aggregate_table1` per margin (``margin`` a key column)."""
    return _aggregate_by(frame, "margin", CHECK_METRICS, windows)


def check_json(table: pd.DataFrame) -> dict[str, Any]:
    """The check table nested as experiment -> set -> model -> window -> margin (as text) -> figures."""
    return _nested_json(table, "margin", lambda margin: f"{margin:g}")


def check_markdown(table: pd.DataFrame) -> list[str]:
    """The check table as a markdown section (no lines when it is empty)."""
    if table.empty:
        return []
    header = "| experiment | set | model | window | margin (eV) | repeats | checked | listed | recovered | recovery | precision |"
    lines = _section_head(
        "After checking the near-misses",
        (
            "Each screener's training set keeps its labels; every other candidate the screener predicts inside "
            "the window widened by the margin is checked with the oracle (DFT in a real campaign). *Checked*: "
            "the labels that check costs; the list after it holds the set's labelled hits and the checked "
            "candidates the oracle puts in the window, so its checked part is right by construction."
        ),
        header,
    )
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in TABLE1_KEYS]
        cells += [f"{row['margin']:g}", str(int(row["n_repeats"]))]
        for name in ("n_checked", "n_candidates", "n_recovered"):
            cells.append(_pm(row[f"{name}_mean"], row[f"{name}_std"], digits=1))
        for name in ("recovery", "precision"):
            cells.append(_pm(row[f"{name}_mean"], row[f"{name}_std"], percent=True, digits=1))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


#: Per-screener columns of the domain table besides :data:`SCREENER_KEYS` and ``min_rows``, in order: the
#: model's calls left out, then the model alone and (``kept_``) with the training set's labels kept.
DOMAIN_METRICS = (
    "n_dropped",
    "n_candidates",
    "n_oracle",
    "n_recovered",
    "recovery",
    "precision",
    "f1",
    "kept_n_candidates",
    "kept_n_recovered",
    "kept_recovery",
    "kept_precision",
    "kept_f1",
)
#: the columns that name a training set, in the training sets and among :data:`SCREENER_KEYS`
SET_KEYS = ("experiment", "repeat", "training_set")


def element_rows(sets: pd.DataFrame) -> dict[tuple, Counter]:
    """For each training set (:data:`SET_KEYS`): in how many of its distinct formulas each element occurs."""
    out: dict[tuple, Counter] = {}
    for key, part in sets.groupby(list(SET_KEYS), sort=False):
        counts: Counter = Counter()
        for formula in pd.unique(part["reduced_formula"]):
            counts.update(parse_formula(formula).keys())
        out[key] = counts
    return out


def element_coverage(formulas: Iterable[str], counts: Mapping[str, int]) -> np.ndarray:
    """Each formula's least-covered element: the fewest training formulas any of its elements occurs in."""
    return np.array([min(counts.get(e, 0) for e in parse_formula(f)) for f in formulas], dtype=np.int64)


def domain_scores(
    metrics: pd.DataFrame,
    hits: pd.DataFrame,
    sets: pd.DataFrame,
    oracle: pd.Series,
    windows: Mapping[str, GapWindowConfig],
    min_rows: Sequence[int],
) -> pd.DataFrame:
    """Each screener's figures without its calls outside its training set's element domain.

    A screener trained on a set that holds an element in a handful of formulas knows little about
    compounds of that element, and its calls on them are where an AL set's screener errs most (the
    campaign labelled many high-gap compounds of a few elements). For each ``k`` of ``min_rows``, the
    model's calls (``hits``: :data:`SCREENER_KEYS`, ``reduced_formula``) on candidates one of whose
    elements occurs in fewer than ``k`` formulas of the screener's own training set are dropped, and
    what remains is scored against the oracle's screening as in Table 1 (the model alone) and as in
    :func:`labels_kept_scores` (``kept_``: the set's labelled candidates judged by their labels, never
    dropped). ``metrics``, ``sets``, ``oracle``, ``windows``: as in :func:`labels_kept_scores`. One row
    per screener of ``windows``, and ``k``; ``n_dropped``: the model's calls left out.
    """
    columns = [*SCREENER_KEYS, "min_rows", *DOMAIN_METRICS]
    if not len(min_rows) or metrics.empty:
        return pd.DataFrame(columns=columns)
    rows = element_rows(sets)
    coverage = np.zeros(len(hits), dtype=np.int64)
    for key, index in hits.groupby(list(SET_KEYS), sort=False).indices.items():
        formulas = hits["reduced_formula"].to_numpy()[index]
        coverage[index] = element_coverage(formulas, rows.get(key, Counter()))
    frames = []
    for k in sorted(min_rows):
        inside = coverage >= k
        scores = labels_kept_scores(metrics, hits[inside], sets, oracle, windows, strict=False)
        if scores.empty:
            continue
        dropped = hits[~inside].groupby(list(SCREENER_KEYS)).size().rename("n_dropped")
        scores = scores.join(dropped, on=list(SCREENER_KEYS)).fillna({"n_dropped": 0})
        model = {
            f"model_{m}": m
            for m in ("n_candidates", "n_oracle", "n_recovered", "recovery", "precision", "f1")
        }
        kept = {
            f"labelled_{m}": f"kept_{m}"
            for m in ("n_candidates", "n_recovered", "recovery", "precision", "f1")
        }
        scores = scores.rename(columns={**model, **kept}).assign(min_rows=k)
        scores["n_dropped"] = scores["n_dropped"].astype(int)
        frames.append(scores[columns])
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)


def aggregate_domain(frame: pd.DataFrame, windows: Sequence[str] | None = None) -> pd.DataFrame:
    """The domain table over repeats: :func:`aggregate_table1` per ``min_rows`` (a key column)."""
    return _aggregate_by(frame, "min_rows", DOMAIN_METRICS, windows)


def domain_json(table: pd.DataFrame) -> dict[str, Any]:
    """The domain table nested as experiment -> set -> model -> window -> min rows (as text) -> figures."""
    return _nested_json(table, "min_rows", lambda k: str(int(k)))


def domain_markdown(table: pd.DataFrame) -> list[str]:
    """The domain table as a markdown section (no lines when it is empty)."""
    if table.empty:
        return []
    header = (
        "| experiment | set | model | window | min rows | repeats | dropped | listed | recovery | precision "
        "| labels kept: listed | recovery | precision |"
    )
    lines = _section_head(
        "Within each screener's element domain",
        (
            "The model's calls on candidates one of whose elements occurs in fewer than *min rows* formulas of "
            "the screener's own training set are left out (*dropped*); what remains is scored as in Table 1 (the "
            "model alone) and as in the labels-kept table (the set's labelled candidates judged by their labels)."
        ),
        header,
    )
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in TABLE1_KEYS]
        cells += [str(int(row["min_rows"])), str(int(row["n_repeats"]))]
        cells += [_pm(row[f"{n}_mean"], row[f"{n}_std"], digits=1) for n in ("n_dropped", "n_candidates")]
        cells += [
            _pm(row[f"{n}_mean"], row[f"{n}_std"], percent=True, digits=1) for n in ("recovery", "precision")
        ]
        cells.append(_pm(row["kept_n_candidates_mean"], row["kept_n_candidates_std"], digits=1))
        cells += [
            _pm(row[f"kept_{n}_mean"], row[f"kept_{n}_std"], percent=True, digits=1)
            for n in ("recovery", "precision")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


#: Per-screener columns of the labels-kept table besides :data:`SCREENER_KEYS`, in order.
LABELS_KEPT_METRICS = (
    "n_labelled",
    "n_labelled_truth",
    "n_candidates",
    "n_oracle",
    "n_recovered",
    "recovery",
    "precision",
    "f1",
    "recovery_gain",
    "precision_gain",
)


def labels_kept_frame(scores: pd.DataFrame) -> pd.DataFrame:
    """:func:`labels_kept_scores` shaped like ``metrics.parquet``: the labels-kept counts and ratios, and
    ``recovery_gain`` / ``precision_gain``, what keeping the labels adds to the model's own figures."""
    out = scores[[*SCREENER_KEYS, "n_labelled", "n_labelled_truth"]].copy()
    for name in ("n_candidates", "n_oracle", "n_recovered", "recovery", "precision", "f1"):
        out[name] = scores[f"labelled_{name}"]
    for name in ("recovery", "precision"):
        out[f"{name}_gain"] = scores[f"labelled_{name}"].astype(float) - scores[f"model_{name}"].astype(float)
    return out.reset_index(drop=True)


def aggregate_labels_kept(frame: pd.DataFrame, windows: Sequence[str] | None = None) -> pd.DataFrame:
    """The labels-kept table over repeats: ``<metric>_mean`` / ``_std`` as :func:`aggregate_table1`, and
    ``<gain>_ahead`` / ``<gain>_n``: repeats where keeping the labels scores higher / has the figure."""
    table = aggregate_table1(frame, windows=windows, metrics=LABELS_KEPT_METRICS)
    if table.empty:
        return table
    grouped = frame.groupby(list(TABLE1_KEYS), sort=False)
    for gain in ("recovery_gain", "precision_gain"):
        counts = grouped[gain].agg(ahead=lambda v: int((v > 0).sum()), n=lambda v: int(v.notna().sum()))
        counts = counts.add_prefix(f"{gain}_").reset_index()
        table = table.merge(counts, on=list(TABLE1_KEYS), how="left", sort=False)
    return table


def labels_kept_markdown(table: pd.DataFrame, paired: pd.DataFrame | None = None) -> list[str]:
    """The labels-kept table (and its sets paired by repeat) as a markdown section."""
    if table.empty:
        return []
    header = (
        "| experiment | set | model | window | repeats | labelled | of them oracle hits | candidates "
        "| recovered | recovery | gain | ahead | precision | gain | ahead |"
    )
    lines = _section_head(
        "With the training sets' labels kept",
        (
            "A candidate the screener's own training set labels is a hit when that label lies in the window; "
            "every other candidate is judged by the model, as above. A campaign that searched the candidates "
            "has labelled some of them already (with the oracle here, with DFT in a real one). *Labelled*: the "
            "set's rows that are screened candidates; *of them oracle hits*: those the oracle puts in the window. "
            "*Gain*: labels kept minus the model alone, paired by repeat in percentage points; *ahead*: repeats "
            "where keeping the labels scores higher."
        ),
        header,
    )
    for row in table.to_dict("records"):
        cells = [str(row[k]) for k in TABLE1_KEYS] + [str(int(row["n_repeats"]))]
        cells += [
            _pm(row["n_labelled_mean"], row["n_labelled_std"], digits=1),
            _pm(row["n_labelled_truth_mean"], row["n_labelled_truth_std"], digits=1),
            _pm(row["n_candidates_mean"], row["n_candidates_std"], digits=1),
            _pm(row["n_recovered_mean"], row["n_recovered_std"], digits=1),
        ]
        for name in ("recovery", "precision"):
            cells.append(_pm(row[f"{name}_mean"], row[f"{name}_std"], percent=True, digits=1))
            cells += paired_cells(
                {
                    f"{name}_diff_mean": row[f"{name}_gain_mean"],
                    f"{name}_diff_std": row[f"{name}_gain_std"],
                    f"{name}_ahead": row[f"{name}_gain_ahead"],
                    f"{name}_n": row[f"{name}_gain_n"],
                },
                name,
            )
        lines.append("| " + " | ".join(cells) + " |")
    if paired is not None:
        lines += paired_markdown(paired, title="### Labels kept, paired by repeat", explain=False)
    return lines


#: training sets compared repeat by repeat, first minus second: the campaigns' finds against the random
#: control's (does the optimiser beat chance at equal budget?) and against the initial samples alone
PAIRS: tuple[tuple[str, str], ...] = (("AL", "random"), ("AL", "BS"))
PAIRED_METRICS = ("recovery", "precision")


def paired_differences(
    frame: pd.DataFrame,
    pairs: Sequence[tuple[str, str]] = PAIRS,
    metrics: Sequence[str] = PAIRED_METRICS,
) -> pd.DataFrame:
    """``first`` minus ``second`` per experiment, model and window, paired by repeat.

    The BS, AL and random sets of one repeat share that repeat's initial samples, so the difference per
    repeat is the fair comparison, and its spread, not the spread of either set alone, says whether one
    set beats the other by more than the noise. ``frame`` is ``metrics.parquet``'s. One row per pair,
    experiment, model and window over the repeats both sets have: ``n_repeats``, and per metric
    ``<m>_diff_mean``, ``<m>_diff_std`` (sample; NaN with one repeat), ``<m>_ahead`` (repeats where the
    first set scores higher) and ``<m>_n`` (repeats where both have the metric: precision is undefined
    for a screener without hits).
    """
    keys = ["experiment", "model", "gap_window", "repeat"]
    columns = ["pair", "experiment", "model", "gap_window", "n_repeats"]
    columns += [f"{m}_{s}" for m in metrics for s in ("diff_mean", "diff_std", "ahead", "n")]
    rows = []
    for first, second in pairs:
        a = frame[frame["training_set"] == first].set_index(keys)
        b = frame[frame["training_set"] == second].set_index(keys)
        both = a.index.intersection(b.index, sort=False)
        if both.empty:
            continue
        diff = a.loc[both, list(metrics)].astype(float) - b.loc[both, list(metrics)].astype(float)
        for (experiment, model, window), d in diff.groupby(level=[0, 1, 2], sort=False):
            row: dict[str, Any] = {
                "pair": f"{first}-{second}",
                "experiment": experiment,
                "model": model,
                "gap_window": window,
                "n_repeats": len(d),
            }
            for m in metrics:
                values = d[m].dropna()
                row[f"{m}_diff_mean"] = values.mean() if len(values) else math.nan
                row[f"{m}_diff_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
                row[f"{m}_ahead"] = int((values > 0).sum())
                row[f"{m}_n"] = len(values)
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def paired_json(paired: pd.DataFrame) -> dict[str, Any]:
    """Paired differences nested as pair -> experiment -> model -> window -> values (NaN as null)."""
    out: dict[str, Any] = {}
    for row in paired.to_dict("records"):
        cell = out.setdefault(row["pair"], {}).setdefault(row["experiment"], {}).setdefault(row["model"], {})
        cell[row["gap_window"]] = {
            k: (int(v) if k == "n_repeats" or k.endswith(("_ahead", "_n")) else _finite(v))
            for k, v in row.items()
            if k not in ("pair", "experiment", "model", "gap_window")
        }
    return out


def paired_cells(row: Mapping[str, Any], metric: str) -> list[str]:
    """A :func:`paired_differences` row's ``metric`` as two cells: the mean difference ± its std in
    percentage points, and 'k of n' repeats ahead."""
    mean, std = float(row[f"{metric}_diff_mean"]), float(row[f"{metric}_diff_std"])
    text = "n/a" if not math.isfinite(mean) else f"{100 * mean:+.1f}"
    if math.isfinite(mean) and math.isfinite(std):
        text += f" ± {100 * std:.1f}"
    return [text, f"{int(row[f'{metric}_ahead'])} of {int(row[f'{metric}_n'])}"]


def paired_markdown(
    paired: pd.DataFrame,
    metrics: Sequence[str] = PAIRED_METRICS,
    title: str = "## Paired by repeat",
    explain: bool = True,
) -> list[str]:
    """The paired differences as a markdown section under ``title`` (no lines for an empty table)."""
    if paired.empty:
        return []
    lines = ["", title, ""]
    if explain:
        lines += [
            "The sets of one repeat share its initial samples, so each cell is the mean ± sample standard "
            "deviation of the per-repeat difference (first set minus second, in percentage points), and "
            "*ahead* counts the repeats where the first set scores higher. A mean larger than its standard "
            "deviation is a difference larger than the spread over repeats.",
            "",
        ]
    header = (
        "| pair | experiment | model | window | repeats | "
        + " | ".join(f"{m} | ahead" for m in metrics)
        + " |"
    )
    lines += _table_head(header)
    for row in paired.to_dict("records"):
        cells = [
            row["pair"].replace("-", " − "),
            str(row["experiment"]),
            str(row["model"]),
            str(row["gap_window"]),
        ]
        cells.append(str(int(row["n_repeats"])))
        for m in metrics:
            cells += paired_cells(row, m)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def table1_json(table: pd.DataFrame) -> dict[str, Any]:
    """Table 1 nested as experiment -> training set -> model -> window -> {metric_mean, metric_std, n_repeats}.

    NaN becomes null so the file stays valid JSON (DVC prints it as '-').
    """
    out: dict[str, Any] = {}
    value_columns = [c for c in table.columns if c not in TABLE1_KEYS]
    for row in table.to_dict("records"):
        cell = out.setdefault(row["experiment"], {}).setdefault(row["training_set"], {})
        cell = cell.setdefault(row["model"], {})
        cell[row["gap_window"]] = {
            c: (int(row[c]) if c == "n_repeats" or c.endswith(("_ahead", "_n")) else _finite(row[c]))
            for c in value_columns
        }
    return out


def _pm(mean: float, std: float, percent: bool = False, digits: int = 2) -> str:
    """'mean ± std' (std left out when NaN); 'n/a' for a NaN mean."""
    if not math.isfinite(mean):
        return "n/a"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    if not math.isfinite(std) and not percent and float(mean).is_integer():
        digits = 0  # a count from a single repeat
    text = f"{mean * scale:.{digits}f}"
    if math.isfinite(std):
        text += f" ± {std * scale:.{digits}f}"
    return text + unit


def _paper_cell(key: tuple[str, str], model: str, window: str, paper: Mapping) -> str:
    figures = paper.get(key) if (model, window) == (PAPER_MODEL, PAPER_WINDOW) else None
    if not figures:
        return ""
    return (
        f"{figures['n_candidates']:.0f} cand., {figures['n_recovered']:.0f} rec. "
        f"({100 * figures['recovery']:.1f}% / {100 * figures['precision']:.1f}%)"
    )


def table1_markdown(
    table: pd.DataFrame,
    windows: Mapping[str, GapWindowConfig] | None = None,
    oracle_counts: Mapping[str, int] | None = None,
    context: Mapping[str, Any] | None = None,
    paper: Mapping[tuple[str, str], Mapping[str, float]] = PAPER_TABLE1,
    paired: pd.DataFrame | None = None,
) -> str:
    """A readable markdown report of Table 1, with the paper's figures beside ours where known, and the
    sets' differences paired by repeat (:func:`paired_differences`) when ``paired`` is given."""
    lines = ["# Table 1: screening the generated candidates", ""]
    if context:
        for key, value in context.items():
            lines.append(f"- {key}: {value}")
        lines.append("")
    if windows:
        lines.append("Windows and the oracle's own hits among the screened candidates (the reference):")
        lines.append("")
        for name, window in windows.items():
            count = f"{oracle_counts[name]:,} oracle hits" if oracle_counts and name in oracle_counts else ""
            lines.append(f"- `{name}`: {describe_window(window)}" + (f", {count}" if count else ""))
        lines.append("")
    lines += [
        "Each cell is the mean ± sample standard deviation over repeats (no ± with one repeat). "
        "*Recovery* = oracle hits the model also finds / oracle hits (the paper's metric); "
        "*precision* = those / model hits. R² is on the model's own 20% hold-out and on the common "
        "external test set (prepared 'test' split minus every training-set composition).",
        "",
        "The paper's column: its Roost lists for gaps > 6 eV (candidates, recovered of its Exp1 model's 102, "
        "recovery / precision). Its reference was its Exp1 Roost model, ours is the oracle, so only the "
        "shape of the comparison carries over.",
        "",
    ]
    header = (
        "| experiment | set | model | window | repeats | n train | R² hold-out | R² test | MAE test (eV) "
        "| candidates | recovered | recovery | precision | F1 | paper |"
    )
    lines += _table_head(header)
    for row in table.to_dict("records"):
        cells = [
            str(row["experiment"]),
            str(row["training_set"]),
            str(row["model"]),
            str(row["gap_window"]),
            str(int(row["n_repeats"])),
            _pm(row.get("n_train_mean", math.nan), math.nan, digits=0),
            _pm(row.get("r2_holdout_mean", math.nan), row.get("r2_holdout_std", math.nan), digits=3),
            _pm(row.get("r2_test_mean", math.nan), row.get("r2_test_std", math.nan), digits=3),
            _pm(row.get("mae_test_mean", math.nan), row.get("mae_test_std", math.nan), digits=3),
            _pm(row.get("n_candidates_mean", math.nan), row.get("n_candidates_std", math.nan), digits=1),
            _pm(row.get("n_recovered_mean", math.nan), row.get("n_recovered_std", math.nan), digits=1),
            _pm(
                row.get("recovery_mean", math.nan), row.get("recovery_std", math.nan), percent=True, digits=1
            ),
            _pm(
                row.get("precision_mean", math.nan),
                row.get("precision_std", math.nan),
                percent=True,
                digits=1,
            ),
            _pm(row.get("f1_mean", math.nan), row.get("f1_std", math.nan), digits=3),
            _paper_cell((row["experiment"], row["training_set"]), row["model"], row["gap_window"], paper),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if table.empty:
        lines.append("| (no rows) |" + " |" * (header.count("|") - 2))
    if paired is not None:
        lines += paired_markdown(paired)
    return "\n".join(lines) + "\n"
