"""Acquisition rounds in the 128-d latent box: BatchOptimizer against the package's suggest() loop.

No trained model is needed: the box has per-dimension widths drawn like an autoencoder's latent
ranges, the registered points are uniform in it and the target is a smooth band-gap-like function.
A round is one ``suggest(20)`` on n registered points. The package's path fits its GP and searches
the acquisition once per suggestion; it is timed on a few suggestions and scaled to 20. Both paths
run with one BLAS thread (``AcquisitionConfig.blas_threads``, the default).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from agd.active.acquisition import (
    AcquisitionConfig,
    BatchOptimizer,
    StockOptimizer,
    Suggestions,
    fit_matern_gp,
)
from bench import (
    BenchOptions,
    Section,
    Target,
    Timing,
    format_exponent,
    growth_exponent,
    markdown_table,
    measure,
)

DIM = 128
BATCH = 20
DEFAULT_SIZES = [500, 1_000, 2_000]
QUICK_SIZES = [100, 200, 400]  # ``--quick``: a smoke run
STOCK_POINTS = 2  # suggest() calls timed per size on the package's path (BenchOptions.stock_suggestions)
TARGET_SIZE, TARGET_SECONDS = 2_000, 3.0  # the target: one 20-point round at 2,000 points
SEED = 0


def synthetic_campaign(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A latent box (DIM, 2), n points uniform in it and a smooth target in band-gap units (0-8 eV)."""
    rng = np.random.default_rng(seed)
    half = rng.uniform(0.5, 3.0, DIM)
    centre = rng.normal(0.0, 0.5, DIM)
    bounds = np.stack([centre - half, centre + half], axis=1)
    x = rng.uniform(bounds[:, 0], bounds[:, 1], size=(n, DIM))
    direction = rng.normal(size=DIM) / np.sqrt(DIM)
    z = (x - centre) / half
    y = 4.0 + 2.5 * np.tanh(z @ direction) + 0.5 * np.sin(2.0 * z[:, 0]) * z[:, 1] - 0.3 * (z**2).mean(axis=1)
    return bounds, x, y


def _stock_with_points(bounds: np.ndarray, x: np.ndarray, y: np.ndarray) -> StockOptimizer:
    """A StockOptimizer holding (x, y), filled through TargetSpace.register.

    Same state as ``StockOptimizer.register`` (which calls BayesianOptimization.register and so
    rebuilds the logger's list of every result on each call: minutes at 2,000 points); that cost
    is timed separately on the round's last 20 points.
    """
    stock = StockOptimizer(bounds)
    for row, target in zip(x, y, strict=True):
        stock.optimizer.space.register(row, float(target))
    return stock


def _one_size(
    n: int, config: AcquisitionConfig, repeats: int, stock_points: int = STOCK_POINTS
) -> tuple[list[list[str]], list[str], list[str], Timing, Timing]:
    """Timing rows (ours, stock), the registering row, the quality row and both round timings for n points."""
    bounds, x, y = synthetic_campaign(n)

    # registering: a restore (everything at once) and one round's labels onto n - 20 points
    restore = measure(lambda: BatchOptimizer.from_points(bounds, x, y, config), repeats)
    holder: dict[str, BatchOptimizer | StockOptimizer] = {}

    def fresh_batch() -> None:
        holder["opt"] = BatchOptimizer.from_points(bounds, x[:-BATCH], y[:-BATCH], config)

    def fresh_stock() -> None:
        holder["opt"] = _stock_with_points(bounds, x[:-BATCH], y[:-BATCH])

    def register_round() -> None:
        holder["opt"].register(x[-BATCH:], y[-BATCH:])

    ours_round = measure(register_round, repeats, fresh_batch)
    stock_round = measure(register_round, repeats, fresh_stock)
    register_row = [
        f"{n:,}",
        f"{restore.wall:.4f}",
        f"{restore.cpu:.4f}",
        f"{ours_round.wall:.5f}",
        f"{stock_round.wall:.3f}",
        f"{stock_round.cpu:.3f}",
    ]

    # one round of suggestions
    ours = BatchOptimizer.from_points(bounds, x, y, config)
    rounds: list[Suggestions] = []
    ours_time = measure(lambda: rounds.append(ours.suggest(BATCH)), repeats)
    stock = _stock_with_points(bounds, x, y)
    walls, cpus, fits, searches, stock_x = [], [], [], [], []
    for _ in range(stock_points):
        wall, cpu = time.perf_counter(), time.process_time()
        out = stock.suggest(1)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
        fits.append(out.report.gp_fit_s)
        searches.append(out.report.acquisition_s)
        stock_x.append(out.x[0])
    stock_time = Timing(statistics.median(walls) * BATCH, statistics.median(cpus) * BATCH)
    timing_rows = [
        [
            f"{n:,}",
            "BatchOptimizer",
            f"{BATCH} (one round)",
            f"{ours_time.wall:.2f}",
            f"{ours_time.cpu:.2f}",
            f"{statistics.median(r.report.gp_fit_s for r in rounds):.2f}",
            f"{statistics.median(r.report.acquisition_s for r in rounds):.2f}",
            "",
        ],
        [
            f"{n:,}",
            "stock `suggest()` loop",
            f"{stock_points}, x {BATCH / stock_points:g} for a round",
            f"{stock_time.wall:.1f}",
            f"{stock_time.cpu:.1f}",
            f"{statistics.median(fits) * BATCH:.1f}",
            f"{statistics.median(searches) * BATCH:.1f}",
            f"{stock_time.cpu / ours_time.cpu:.0f}x",
        ],
    ]

    # how good the picks are, judged by one GP for both paths
    gp = fit_matern_gp(x, y)

    def ucb(z: np.ndarray) -> np.ndarray:
        mean, std = gp.predict(z)
        return mean + config.kappa * std

    picks, stock_picks = rounds[-1].x, np.array(stock_x)
    ours_ucb, stock_ucb = ucb(picks), ucb(stock_picks)
    closest = np.linalg.norm(picks[:, None] - picks[None], axis=2) + np.diag(np.full(BATCH, np.inf))
    stock_gap = np.linalg.norm(stock_picks[0] - stock_picks[-1]) if len(stock_picks) > 1 else float("nan")
    quality_row = [
        f"{n:,}",
        f"{gp.length_scale:.3f}",
        f"{ours_ucb.max():.3f}",
        f"{ours_ucb.mean():.3f} (min {ours_ucb.min():.3f})",
        f"{closest.min():.2f}",
        f"{stock_ucb.max():.3f}",
        f"{stock_gap:.2g}" if stock_gap == stock_gap else "n/a (one suggestion timed)",
    ]
    return timing_rows, register_row, quality_row, ours_time, stock_time


def run(options: BenchOptions) -> Section:
    """Time one 20-point round and one round's registering on both paths at each size."""
    sizes = options.sizes or (QUICK_SIZES if options.quick else DEFAULT_SIZES)
    repeats = options.repeats
    stock_points = options.stock_suggestions or (1 if options.quick else STOCK_POINTS)
    config = AcquisitionConfig()
    rows, register_rows, quality_rows = [], [], []
    ours_rounds: dict[int, Timing] = {}
    stock_rounds: dict[int, Timing] = {}
    for n in sizes:
        timing_rows, register_row, quality_row, ours_rounds[n], stock_rounds[n] = _one_size(
            n, config, repeats, stock_points
        )
        rows += timing_rows
        register_rows.append(register_row)
        quality_rows.append(quality_row)

    timing = markdown_table(
        [
            "registered",
            "path",
            "suggestions timed",
            "wall s / round",
            "CPU s / round",
            "GP fit s",
            "acquisition s",
            "CPU ratio",
        ],
        rows,
    )
    registering = markdown_table(
        [
            "registered",
            "restore all (bulk) wall s",
            "CPU s",
            "one round's 20, bulk, wall s",
            "one round's 20, stock `register()`, wall s",
            "CPU s",
        ],
        register_rows,
    )
    quality = markdown_table(
        [
            "registered",
            "length scale",
            "ours: best UCB",
            "ours: mean UCB of 20",
            "ours: closest pair",
            "stock: UCB",
            f"stock: distance between its {stock_points} suggestions",
        ],
        quality_rows,
    )
    ours_growth = format_exponent(growth_exponent(list(sizes), [ours_rounds[n].cpu for n in sizes]))
    stock_growth = format_exponent(growth_exponent(list(sizes), [stock_rounds[n].cpu for n in sizes]))
    body = f"""
One acquisition round = `suggest({BATCH})` with n points registered in a {DIM}-d box (synthetic
latents and targets, `bench/acquisition.py`), UCB with kappa {config.kappa}, both paths with one
BLAS thread. BatchOptimizer: medians of {repeats} rounds (one GP fit, {config.n_random:,} uniform +
{config.n_local:,} local candidates, L-BFGS-B polish of {config.n_refine} spread-out starts, greedy
kriging-believer batch). The package's path (`BayesianOptimization.suggest()` per point: GP fit with
5 restarts, 10,000 random points, L-BFGS-B from the best 10) was timed on {stock_points} suggestion(s)
per size; its round figures are the median per suggestion x {BATCH}, an extrapolation (the package
does not refit between suggestions that register nothing, so every suggestion costs the same).
GP fit and acquisition columns are wall seconds. The machine is shared with other jobs (see the load
average): wall time is inflated, CPU time much less so, and the CPU ratio is the fairer speed-up.

{timing}

How CPU time per round grows with n (log-log slope over n = {", ".join(f"{n:,}" for n in sizes)}; 1 is
linear, an exact GP fit is cubic at large n): BatchOptimizer {ours_growth}, stock `suggest()` loop
{stock_growth}.

Registering: rebuilding the optimiser from a campaign's table (`from_points`, all n at once), and
adding one round's {BATCH} labels to n - {BATCH} registered points, in bulk on our side and through
`BayesianOptimization.register()` point by point on the package's (each call rebuilds the logger's
list of all results, so a round's registering grows with n and a full restore with n squared).

{registering}

Quality, judged by one GP fitted to the same data for both paths: the UCB value of the suggestions
(higher is better). The package's best point and our best pick agree; its further suggestions in a
round are the same point again, while ours are spread out (closest pair distance, in latent units).

{quality}
"""
    return Section(
        "acquisition",
        "Batch acquisition in the latent box (`agd.active.acquisition`)",
        body,
        [
            "bayesian-optimization",
            "scikit-learn",
            "scipy",
        ],
        _targets(ours_rounds, stock_rounds),
    )


def _targets(ours: dict[int, Timing], stock: dict[int, Timing]) -> list[Target]:
    """The round-time target (judged only when 2,000 points were measured) and the speed-up."""
    if TARGET_SIZE in ours:
        measured = f"{ours[TARGET_SIZE].wall:.2f} s wall ({ours[TARGET_SIZE].cpu:.2f} s CPU)"
        met: bool | None = ours[TARGET_SIZE].wall <= TARGET_SECONDS
    else:
        largest = max(ours)
        measured = f"{ours[largest].wall:.2f} s wall at {largest:,} points (2,000 not measured)"
        met = None
    ratios = [stock[n].cpu / ours[n].cpu for n in ours]
    return [
        Target(
            f"acquisition: one 20-point round at {TARGET_SIZE:,} points",
            f"<= {TARGET_SECONDS:g} s",
            measured,
            met,
        ),
        Target(
            "acquisition: CPU time of the stock `suggest()` loop over ours, per round",
            "(none set)",
            f"{min(ratios):.0f}x to {max(ratios):.0f}x",
            None,
        ),
    ]
