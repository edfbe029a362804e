"""Campaign rounds with the forest surrogate (``experiments.campaign.surrogate: forest``).

A round fits a random forest on the Magpie features of the n registered formulas and ranks the
candidate library by UCB over its trees (:class:`agd.active.surrogate.ForestOptimizer`). The library is
the pipeline's valid generated candidates (``data/generated/candidates.parquet``, 989,442 formulas),
or the shared Materials Project formulas where the pipeline has not run. The optimiser never reads the
latents except to tell members apart, so each member gets a random one here and no autoencoder is
needed; the labels are a smooth function of the features in band-gap units (0-8 eV), since the cost
of a round does not depend on what the labels are.

Three kinds of round are timed, each ``suggest(20)`` without accept rules:

- *full*: ``shortlist: null``, every member ranked every round;
- *refresh*: with ``shortlist``, the round that ranks the whole library and keeps its best members
  (one round in ``refresh / 20``: every 200 registered points by default);
- *list*: with ``shortlist``, a round in between, which ranks only that list again with its own forest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from agd.active.library import CandidateLibrary
from agd.active.surrogate import ForestOptimizer
from agd.config import AcquisitionConfig, SurrogateForestConfig
from bench import (
    REPO_ROOT,
    SHARED_DATA,
    BenchOptions,
    Section,
    Skipped,
    Target,
    Timing,
    markdown_table,
    measure,
)

BATCH = 20
DEFAULT_SIZES = [1_000, 2_000]
QUICK_SIZES = [40, 80]
SHORTLIST, QUICK_SHORTLIST = 50_000, 1_000  # params.yaml's surrogate_forest.shortlist; a smoke run's
QUICK_LIBRARY = 5_000  # members of a smoke run's library
TARGET_SIZE, TARGET_SECONDS = 2_000, 3.0  # the round target (set for the GP path), at 2,000 points
CANDIDATES = REPO_ROOT / "data" / "generated" / "candidates.parquet"
FALLBACK = SHARED_DATA / "mp_gap_by_composition.csv"
LATENT_DIM = 16
SEED = 0


def library_formulas(quick: bool) -> tuple[np.ndarray, str]:
    """The library's formulas (unique) and where they came from."""
    if CANDIDATES.is_file():
        table = pd.read_parquet(CANDIDATES, columns=["reduced_formula", "valid"])
        pool = pd.unique(table.loc[table["valid"].astype(bool), "reduced_formula"].astype(str))
        source = f"the valid generated candidates (`{CANDIDATES.relative_to(REPO_ROOT)}`)"
    elif FALLBACK.is_file():
        pool = pd.unique(pd.read_csv(FALLBACK, keep_default_na=False)["formula"].astype(str))
        source = f"the Materials Project formulas of `{FALLBACK.name}` (no generated candidates here)"
    else:
        raise Skipped(f"surrogate benchmark: neither {CANDIDATES} nor {FALLBACK} exists")
    pool = np.asarray(pool, dtype=object)
    if quick and len(pool) > QUICK_LIBRARY:
        pool = pool[np.sort(np.random.default_rng(SEED).choice(len(pool), QUICK_LIBRARY, replace=False))]
    return pool, source


def synthetic_library(formulas: np.ndarray) -> CandidateLibrary:
    """The formulas with distinct random latents (the forest path uses latents only as member keys)."""
    latents = np.random.default_rng(SEED).normal(size=(len(formulas), LATENT_DIM)).astype(np.float32)
    return CandidateLibrary(formulas, latents, digest="bench-surrogate")


def synthetic_labels(features: np.ndarray) -> np.ndarray:
    """A smooth band-gap-like value (0-8 eV) of each row of Magpie features."""
    scale = features.std(axis=0)
    z = (features - features.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    direction = np.random.default_rng(SEED + 1).normal(size=features.shape[1]) / np.sqrt(features.shape[1])
    return 4.0 + 4.0 * np.tanh(z @ direction)


def _optimizer(library: CandidateLibrary, picked: np.ndarray, y: np.ndarray, shortlist: int | None):
    forest = SurrogateForestConfig(shortlist=shortlist)  # the defaults of params.yaml otherwise
    return ForestOptimizer(
        library.box(),
        library,
        forest,
        AcquisitionConfig(),
        library.latents[picked].astype(np.float64),
        y,
        [str(f) for f in library.formulas[picked]],
        n_initial=len(picked),  # every point registered before the round, so the next round refreshes
    )


def _time_rounds(library: CandidateLibrary, n: int, shortlist: int, repeats: int) -> dict[str, tuple]:
    """Timing, median fit seconds and members ranked of each kind of round at n registered points."""
    features, ok = library.features()
    usable = np.flatnonzero(ok)
    picked = np.sort(np.random.default_rng(SEED + n).choice(usable, n, replace=False))
    y = synthetic_labels(features)[picked]
    out: dict[str, tuple] = {}

    def timed(name: str, round_fn, setup) -> None:
        reports = []
        timing = measure(lambda: reports.append(round_fn().report), repeats, setup)
        fit = float(np.median([r.gp_fit_s for r in reports]))
        out[name] = (timing, fit, reports[-1].n_candidates, reports[-1].n_suggested)

    holder: dict[str, ForestOptimizer] = {}

    def fresh(size: int | None):
        return lambda: holder.__setitem__("opt", _optimizer(library, picked, y, size))

    timed("full", lambda: holder["opt"].suggest(BATCH), fresh(None))
    timed("refresh", lambda: holder["opt"].suggest(BATCH), fresh(shortlist))
    holder["opt"] = _optimizer(library, picked, y, shortlist)
    holder["opt"].suggest(BATCH)  # the refresh round: the list is built and kept
    timed("list", lambda: holder["opt"].suggest(BATCH), None)
    return out


def run(options: BenchOptions) -> Section:
    """Time the three kinds of forest round at each number of registered points."""
    sizes = options.sizes or (QUICK_SIZES if options.quick else DEFAULT_SIZES)
    shortlist = QUICK_SHORTLIST if options.quick else SHORTLIST
    formulas, source = library_formulas(options.quick)
    library = synthetic_library(formulas)
    features_time = measure(library.features, 1)  # computed once per process, as a campaign does
    n_ok = int(library.features()[1].sum())
    if max(sizes) > n_ok:
        raise Skipped(f"surrogate benchmark: {max(sizes):,} registered points but {n_ok:,} usable members")
    refresh = SurrogateForestConfig().refresh
    per_refresh = max(refresh // BATCH, 1)
    rows: list[list[str]] = []
    mean_rounds: dict[int, tuple[Timing, Timing, float]] = {}
    for n in sizes:
        kinds = _time_rounds(library, n, shortlist, options.repeats)
        for name, (timing, fit, ranked, suggested) in kinds.items():
            rows.append(
                [
                    f"{n:,}",
                    name,
                    f"{ranked:,}",
                    str(suggested),
                    f"{timing.wall:.2f}",
                    f"{timing.cpu:.2f}",
                    f"{fit:.2f}",
                ]
            )
        refresh_t, list_t = kinds["refresh"][0], kinds["list"][0]
        mean = (refresh_t.wall + (per_refresh - 1) * list_t.wall) / per_refresh
        mean_rounds[n] = (refresh_t, list_t, mean)
    table = markdown_table(
        [
            "registered",
            "round",
            "members scored",
            "suggested",
            "wall s / round",
            "CPU s / round",
            "forest fit s",
        ],
        rows,
    )
    means = ", ".join(f"{mean:.2f} s at {n:,} points" for n, (_, _, mean) in mean_rounds.items())
    forest = SurrogateForestConfig()
    body = f"""
One round = `ForestOptimizer.suggest({BATCH})` with n points registered (`bench/surrogate.py`): fit a
forest of {forest.n_estimators} trees (`max_features` {forest.max_features}, `min_samples_leaf`
{forest.min_samples_leaf}, {forest.n_jobs} thread) on their Magpie features, predict the members, score
UCB (kappa {AcquisitionConfig().kappa}) and take the best {BATCH}. Library: {len(library):,} members,
{source}; {n_ok:,} of them featurised, in {features_time.wall:.1f} s once per process (a campaign does
this once). Medians of {options.repeats} rounds each. *Members scored*: those the round's picks were
chosen from (a refresh round first ranks the whole library to build its list, then scores the list). With
`shortlist: {shortlist:,}` a refresh round comes once every {per_refresh} rounds (every {refresh}
registered points) and list rounds in between, so a round costs on average {means}. The machine may be
shared with other jobs (see the load average): wall time is inflated, CPU time much less so.

{table}
"""
    return Section(
        "surrogate",
        "Campaign rounds with the forest surrogate (`agd.active.surrogate`)",
        body,
        ["scikit-learn"],
        _targets(mean_rounds, shortlist),
    )


def _targets(rounds: dict[int, tuple[Timing, Timing, float]], shortlist: int) -> list[Target]:
    """The issue's 3 s round target, judged on every round (refresh rounds included) at 2,000 points."""
    item = f"forest surrogate: a 20-point round at {TARGET_SIZE:,} points (`shortlist: {shortlist:,}`)"
    if TARGET_SIZE not in rounds:
        largest = max(rounds)
        refresh_t, list_t, mean = rounds[largest]
        measured = (
            f"list {list_t.wall:.2f} s, refresh {refresh_t.wall:.2f} s at {largest:,} points "
            f"({TARGET_SIZE:,} not measured)"
        )
        return [Target(item, f"<= {TARGET_SECONDS:g} s", measured, None)]
    refresh_t, list_t, mean = rounds[TARGET_SIZE]
    measured = (
        f"list rounds {list_t.wall:.2f} s, refresh rounds {refresh_t.wall:.2f} s; {mean:.2f} s on average"
    )
    return [
        Target(item, f"<= {TARGET_SECONDS:g} s", measured, max(refresh_t.wall, list_t.wall) <= TARGET_SECONDS)
    ]
