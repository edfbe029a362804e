"""Batch Bayesian optimisation over the autoencoder's latent box.

Two optimisers share one interface (:class:`LatentOptimizer`): ``register`` labelled latents in bulk,
``suggest(n, accept)`` a batch of new ones, and keep their whole state as two arrays
(``registered_x``, ``registered_y``) that a campaign persists and hands back to ``from_points``.

* :class:`BatchOptimizer` (the default) keeps the model and the acquisition functions of
  ``bayesian-optimization`` but organises a round around a single GP fit:

  1. GP: the one ``BayesianOptimization`` builds (isotropic Matern-5/2 with unit amplitude,
     ``alpha=1e-6``, ``normalize_y=True``, length scale in [1e-5, 1e5] by maximum marginal
     likelihood), fitted once per round. The likelihood is maximised coarse to fine on distances
     computed once: a grid on a 256-point subsample, parabolic steps on subsamples three times
     larger each, and a few (typically 4-8) Cholesky factorisations of the full matrix, where
     sklearn runs six L-BFGS-B searches with gradients, each gradient costing n^3.
  2. Pool: ``n_random`` uniform points in the box and ``n_local`` points around the best
     registered ones, scored with the package's own ``base_acq`` (``UpperConfidenceBound(kappa)``,
     ``ExpectedImprovement(xi)``).
  3. Polish: ``n_refine`` starts, picked greedily from the pool as in step 4 so that they are
     spread out, are polished together by L-BFGS-B with analytic GP gradients. The best start may
     go anywhere in the box (as the package's own polish does); the others stay within
     ``refine_radius`` length scales, else they would all climb to the same peak.
  4. Batch: greedy picks with a kriging believer. Every pick is treated as observed at its
     posterior mean, which leaves the mean unchanged and shrinks the variance around the pick
     (exactly, by a rank-one update over the pool), so the next pick goes elsewhere; for UCB this
     is GP-BUCB (Desautels et al., JMLR 2014). ``accept`` is asked only about candidates that
     reach the top, a chunk at a time.

* :class:`StockOptimizer` is the paper's path: ``BayesianOptimization.register`` per point and one
  ``suggest()`` (GP fit with 5 restarts, 10,000 random points, L-BFGS-B from the best 10) per
  suggestion. Without registering in between, its suggestions in a round are copies of one point.
  It is kept for comparison and for the equivalence tests.

A round runs with ``blas_threads`` BLAS threads (one by default): on a small machine shared with
other jobs, multi-threaded OpenBLAS factorisations measured up to ten times slower than
single-threaded ones, for the GP fits of both paths.

Suggestions depend only on the seed, the configuration and the registered data (the round's random
generator is seeded with ``(seed, number of registered points)``), so a campaign restored from its
table continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import numpy as np
from bayes_opt import BayesianOptimization
from bayes_opt.acquisition import (
    AcquisitionFunction,
    ConstantLiar,
    ExpectedImprovement,
    GPHedge,
    UpperConfidenceBound,
)
from bayes_opt.exception import NotUniqueError
from numpy.typing import ArrayLike
from scipy.linalg import cho_solve, cholesky, solve_triangular
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from agd.config import AcquisitionConfig

#: ``accept(latents (m, d)) -> bool (m,)``: which candidate latents may be suggested. It may instead
#: return ``(mask, keys)`` with one hashable key per latent (e.g. the decoded formula): then no two
#: suggestions of one batch share a key, so a batch does not spend its budget on one formula.
AcceptFn = Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, Sequence[Hashable]]"]


@dataclass(frozen=True)
class Quota:
    """Most picks one batch may take per group of keys (keys as ``AcceptFn`` gives them).

    E.g. with formulas as keys and their chemical systems as groups, a batch puts at most ``room[s]``
    formulas into system ``s`` (``default`` for a system absent from ``room``).
    """

    group: Callable[[Hashable], Hashable | None]  # a key's group; None: in no group, never limited
    room: Mapping[Hashable, int]
    default: int

    def __post_init__(self) -> None:
        if self.default < 0 or any(n < 0 for n in self.room.values()):
            raise ValueError("a quota's room cannot be negative")


class BatchClaims:
    """The keys one batch has taken: refuses a key taken already, or one whose group's quota is full."""

    def __init__(self, quota: Quota | None = None) -> None:
        self.quota = quota
        self.taken: set[Hashable] = set()
        self.per_group: Counter[Hashable] = Counter()

    def claim(self, key: Hashable | None) -> bool:
        """Take ``key`` for the batch if it may be taken; None (a candidate without a key) always may."""
        if key is None:
            return True
        if key in self.taken:
            return False
        group = self.quota.group(key) if self.quota is not None else None
        if group is not None:
            if self.per_group[group] >= self.quota.room.get(group, self.quota.default):
                return False
            self.per_group[group] += 1
        self.taken.add(key)
        return True


# The GP that BayesianOptimization.__init__ builds (bayes_opt 3.x):
# GaussianProcessRegressor(kernel=Matern(nu=2.5), alpha=1e-6, normalize_y=True, n_restarts_optimizer=5);
# Matern's defaults give length_scale=1.0 within (1e-5, 1e5). tests/active checks these against the package.
MATERN_NU = 2.5
GP_ALPHA = 1e-6
LENGTH_SCALE_INIT = 1.0
LENGTH_SCALE_BOUNDS = (1e-5, 1e5)

_SQRT5 = math.sqrt(5.0)
_LOG_2PI = math.log(2.0 * math.pi)
_COARSE_SIZE = 256  # points in the subsample on which the length-scale grid is scanned
_GRID_POINTS = 41
_TINY_STD = 1e-12  # floor on std (in units of y's std) so that EI never divides by zero
_SAME_POINT = (
    1e-6  # points closer than this fraction of the box diagonal count as one (never suggested twice)
)


class NoAcceptableCandidateError(RuntimeError):
    """accept() left fewer candidates than suggestions asked for; ``found`` holds those it accepted."""

    def __init__(self, message: str, found: np.ndarray):
        super().__init__(message)
        self.found = found


@dataclass(frozen=True)
class RoundReport:
    """What one ``suggest`` round cost and saw; ``as_metrics`` gives MLflow-ready numbers."""

    method: str
    n_registered: int
    n_suggested: int
    gp_fit_s: float
    gp_fit_cpu_s: float
    acquisition_s: float  # candidate scoring, polish and selection; accept() calls excluded
    acquisition_cpu_s: float  # process CPU seconds (all threads), accept() excluded
    accept_s: float  # time spent inside the caller's accept()
    n_candidates: int
    n_checked: int  # candidates passed to accept()
    n_rejected: int  # ... and rejected by it
    length_scale: float
    log_marginal_likelihood: float

    def as_metrics(self, prefix: str = "acquisition.") -> dict[str, float]:
        """Numeric fields as a flat dict for ``mlflow.log_metrics(..., step=round)``."""
        skip = {"method"}
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items() if k not in skip}


@dataclass(frozen=True)
class Suggestions:
    """A batch of latents to label, with the acquisition value at which each was picked."""

    x: np.ndarray  # (n, d)
    acquisition: np.ndarray  # value when picked (after the believer updates of the earlier picks)
    mean: np.ndarray  # this round's GP posterior at x (NaN where no GP was fitted)
    std: np.ndarray
    report: RoundReport


class LatentOptimizer(Protocol):
    """What a campaign needs from an optimiser."""

    bounds: np.ndarray

    @property
    def registered_x(self) -> np.ndarray: ...

    @property
    def registered_y(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def register(self, x: ArrayLike, y: ArrayLike) -> None: ...

    def suggest(self, n: int, accept: AcceptFn | None = None, quota: Quota | None = None) -> Suggestions: ...


class Straddle(AcquisitionFunction):
    """The straddle heuristic for a level set (Bryan et al., 2005): ``kappa * std - |mean - level|``.

    It seeks points whose value is uncertain and near ``level`` (a screening threshold) rather than the
    largest values: the labels a screener needs to place its boundary where the oracle's is. It follows
    the package's interface (``base_acq`` on the GP's mean and std), so the batch optimiser, its
    believer updates and its polish use it as they use UCB.
    """

    def __init__(self, level: float, kappa: float = 1.96) -> None:
        super().__init__()
        self.level = float(level)
        self.kappa = float(kappa)

    def base_acq(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return self.kappa * np.asarray(std) - np.abs(np.asarray(mean) - self.level)

    def get_acquisition_params(self) -> dict[str, float]:
        return {"level": self.level, "kappa": self.kappa}

    def set_acquisition_params(self, params: dict[str, float]) -> None:
        self.level, self.kappa = float(params["level"]), float(params["kappa"])


def make_acquisition(config: AcquisitionConfig) -> AcquisitionFunction:
    """The acquisition function the configuration names (bayes_opt's UCB and EI, or :class:`Straddle`)."""
    if config.function == "ucb":
        return UpperConfidenceBound(kappa=config.kappa)
    if config.function == "straddle":
        return Straddle(config.level, config.kappa)
    return ExpectedImprovement(xi=config.xi)


def make_optimizer(
    bounds: ArrayLike,
    config: AcquisitionConfig | None = None,
    x: ArrayLike | None = None,
    y: ArrayLike | None = None,
    source: CandidateSource | None = None,
) -> LatentOptimizer:
    """The optimiser ``config.method`` names, with ``(x, y)`` registered when given.

    ``source`` replaces the batch optimiser's pool (see :class:`CandidateSource`); the stock path has none.
    """
    config = config or AcquisitionConfig()
    if config.method != "batch":
        if config.function == "straddle":
            raise ValueError("the straddle acquisition needs acquisition.method 'batch'")
        if source is not None:
            raise ValueError(
                "a candidate source needs acquisition.method 'batch' (the stock path searches the box)"
            )
        return (
            StockOptimizer(bounds, config) if x is None else StockOptimizer.from_points(bounds, x, y, config)
        )
    if x is None:
        return BatchOptimizer(bounds, config, source=source)
    return BatchOptimizer.from_points(bounds, x, y, config, source=source)


class CandidateSource(Protocol):
    """Where a batch optimiser's pool comes from instead of the box: a finite set of points, for example.

    ``candidates`` returns the pool's points (m, d) for a round; ``local`` is False before anything is
    registered. ``registered_y`` ranks the registered points as centres (larger is better: the values,
    or for the straddle the closeness to its level). Every random choice must come from ``rng``, so
    that a resumed campaign gets the same pool. The points are not polished (that would leave the set).
    """

    def candidates(
        self,
        config: AcquisitionConfig,
        registered_x: np.ndarray,
        registered_y: np.ndarray,
        rng: np.random.Generator,
        local: bool,
    ) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# the GP
def _distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances between the rows of a and b through one matrix product (centre inputs first)."""
    if b_sq is None:
        b_sq = np.einsum("ij,ij->i", b, b)
    d2 = a @ b.T
    d2 *= -2.0
    d2 += np.einsum("ij,ij->i", a, a)[:, None]
    d2 += b_sq[None, :]
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2, out=d2)


def _matern52(
    dist: np.ndarray, length_scale: float, out: np.ndarray | None = None, work: np.ndarray | None = None
) -> np.ndarray:
    """sklearn's Matern(nu=2.5): (1 + u + u^2/3) exp(-u) with u = sqrt(5) r / length_scale.

    ``out`` may be ``dist`` itself; ``out`` and ``work`` may be reused buffers (fresh n x n
    temporaries cost page faults on every call).
    """
    u = np.multiply(dist, _SQRT5 / length_scale, out=work)
    k = np.multiply(u, 1.0 / 3.0, out=out)
    k += 1.0
    k *= u
    k += 1.0
    np.negative(u, out=u)
    np.exp(u, out=u)
    k *= u
    return k


class _Likelihood:
    """sklearn's log marginal likelihood as a function of the log length scale, on fixed distances.

    With ``keep_best`` it keeps the Cholesky factor and weights of the best length scale seen, in
    two reused Fortran-ordered buffers (factorised in place), so the fit ends without refactorising;
    a third buffer holds the scaled distances.
    """

    def __init__(self, dist: np.ndarray, y_n: np.ndarray, alpha: float, keep_best: bool = False):
        self.dist = dist.T  # symmetric: the transpose is the same matrix, Fortran-ordered
        self.y_n = y_n
        self.alpha = alpha
        self.keep_best = keep_best
        self.best: tuple[float, float, np.ndarray, np.ndarray] | None = None  # (t, lml, chol, weights)
        n = len(y_n)
        self._buffers = [np.empty((n, n), order="F") for _ in range(3)] if keep_best else None

    def __call__(self, t: float) -> float:
        out, work = (self._buffers[0], self._buffers[2]) if self._buffers else (None, None)
        k = _matern52(self.dist, math.exp(t), out=out, work=work)
        k.flat[:: len(k) + 1] += self.alpha
        try:
            chol = cholesky(k, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            return -np.inf
        weights = cho_solve((chol, True), self.y_n, check_finite=False)
        lml = -0.5 * float(self.y_n @ weights) - float(np.log(np.diag(chol)).sum())
        lml -= 0.5 * len(self.y_n) * _LOG_2PI
        if self.keep_best and (self.best is None or lml > self.best[1]):
            if np.shares_memory(chol, self._buffers[0]):  # keep this factor: write the next one elsewhere
                self._buffers[:2] = self._buffers[1::-1]
            self.best = (t, lml, chol, weights)
        return lml


def _local_maximum(
    f: Callable[[float], float], t0: float, step: float, tol: float, lo: float, hi: float, max_evals: int
) -> float:
    """Maximise a smooth, nearly quadratic 1-d function near t0 by successive parabolic steps.

    Each step fits a parabola through the best point and the two points nearest to it. Until the
    best point is bracketed the vertex may lie outside them (extrapolation, at most their span
    away); once bracketed it must fall inside the bracket, else the wider side is bisected.
    Stops when the step is shorter than ``tol``.
    """
    seen: dict[float, float] = {}

    def probe(t: float) -> None:
        t = min(max(t, lo), hi)
        if t not in seen:
            seen[t] = f(t)

    for t in (t0 - step, t0, t0 + step):
        probe(t)
    for _ in range(max_evals):
        best = max(seen, key=seen.__getitem__)
        if len(seen) < 3:  # a start squeezed against a bound
            if best in (lo, hi):
                break
            probe(2 * best - next(t for t in seen if t != best))
            continue
        a, m, c = sorted(sorted(seen, key=lambda t: abs(t - best))[:3])
        fa, fm, fc = seen[a], seen[m], seen[c]
        with np.errstate(all="ignore"):  # -inf values (Cholesky failures) and flat stretches give NaN
            d1, d2 = np.float64(fm - fa) / (m - a), np.float64(fc - fm) / (c - m)
            curvature = (d2 - d1) / (c - a)
            vertex = 0.5 * (a + m) - d1 / (2 * curvature)
        concave = bool(np.isfinite(vertex) and curvature < 0)
        left = [t for t in seen if t < best]
        right = [t for t in seen if t > best]
        if left and right:  # bracketed
            lo_b, hi_b = max(left), min(right)
            if not (concave and lo_b < vertex < hi_b) or vertex == best:
                vertex = 0.5 * (lo_b + best) if best - lo_b > hi_b - best else 0.5 * (best + hi_b)
        else:
            if best in (lo, hi):  # the maximum is on a bound
                break
            uphill, reach = (1.0 if left else -1.0), c - a
            if not concave or (vertex - best) * uphill <= 0:
                vertex = best + uphill * reach
            vertex = min(max(vertex, best - reach), best + reach)
        vertex = float(min(max(vertex, lo), hi))
        if abs(vertex - best) < tol:
            break
        probe(vertex)
    return max(seen, key=seen.__getitem__)


def _fit_length_scale(
    dist: np.ndarray, y_n: np.ndarray, alpha: float
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Log length scale maximising the marginal likelihood in LENGTH_SCALE_BOUNDS, its value, factor, weights.

    A Cholesky of all n points is the cost of one evaluation, so the search is coarse to fine: a grid
    on an evenly spaced subsample of 256 points, then parabolic steps on subsamples about three times
    larger each, ending on all points with a tolerance of 0.01 in the log length scale (the
    likelihood's own curvature there is far wider at a few hundred points and more).
    """
    n = len(y_n)
    lo, hi = (math.log(b) for b in LENGTH_SCALE_BOUNDS)

    def subset(m: int) -> tuple[np.ndarray, np.ndarray]:
        if m == n:
            return dist, y_n
        idx = np.linspace(0, n - 1, m).round().astype(np.intp)
        return dist[np.ix_(idx, idx)], y_n[idx]

    full = _Likelihood(dist, y_n, alpha, keep_best=True)
    m0 = min(n, _COARSE_SIZE)
    d0, y0 = subset(m0)
    off = d0[np.triu_indices(m0, 1)]
    off = off[off > 0]
    if off.size == 0:  # one point, or only duplicates: the likelihood is flat in the length scale
        t = math.log(LENGTH_SCALE_INIT)
        full(t)
    else:
        grid = np.linspace(
            max(lo, math.log(off.min()) - 3.0), min(hi, math.log(off.max()) + 3.0), _GRID_POINTS
        )
        coarse = full if m0 == n else _Likelihood(d0, y0, alpha)
        t = float(grid[int(np.argmax([coarse(t) for t in grid]))])
        step = max(float(grid[1] - grid[0]), 0.05) if m0 == n else 0.15
        sizes = [n]
        while sizes[-1] > 3 * m0:
            sizes.append(sizes[-1] // 3)
        for m in reversed(sizes):
            f = full if m == n else _Likelihood(*subset(m), alpha)
            t = _local_maximum(f, t, step, 0.01 if m == n else 0.05, lo, hi, max_evals=12)
            step = 0.15
    if full.best is None:
        raise np.linalg.LinAlgError(f"K + {alpha:g} I is not positive definite at any length scale tried")
    return full.best


@dataclass(frozen=True, eq=False)
class MaternGP:
    """A fitted GP with BayesianOptimization's model; predicts like its GaussianProcessRegressor."""

    centre: np.ndarray  # inputs are centred before distances are taken (accuracy of the BLAS form)
    x_train: np.ndarray  # centred training inputs (n, d)
    chol: np.ndarray  # lower Cholesky factor of K + alpha I
    weights: np.ndarray  # (K + alpha I)^-1 y_normalised
    length_scale: float
    y_mean: float
    y_std: float
    alpha: float
    log_marginal_likelihood: float
    x_sq: np.ndarray = field(repr=False)

    def cross_kernel(self, x: np.ndarray) -> np.ndarray:
        """k(x, X_train), shape (m, n)."""
        xc = np.atleast_2d(np.asarray(x, dtype=np.float64)) - self.centre
        dist = _distances(xc, self.x_train, self.x_sq)
        return _matern52(dist, self.length_scale, out=dist)

    def predict(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation (of the latent function) at x, in target units."""
        k = self.cross_kernel(np.asarray(x, dtype=np.float64))
        mean = (k @ self.weights) * self.y_std + self.y_mean
        v = solve_triangular(self.chol, k.T, lower=True, check_finite=False, overwrite_b=True)
        var = np.maximum(1.0 - np.einsum("ij,ij->j", v, v), 0.0)
        return mean, np.sqrt(var) * self.y_std


def fit_matern_gp(x: ArrayLike, y: ArrayLike, alpha: float = GP_ALPHA) -> MaternGP:
    """Fit BayesianOptimization's GP (Matern-5/2, alpha, normalised y, ML length scale) to (x, y)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("a GP needs at least one registered point")
    centre = x.mean(axis=0)
    xc = x - centre
    x_sq = np.einsum("ij,ij->i", xc, xc)
    y_mean = float(y.mean())
    y_std = float(y.std())
    if y_std < 10 * np.finfo(np.float64).eps:  # sklearn's _handle_zeros_in_scale
        y_std = 1.0
    y_n = (y - y_mean) / y_std
    dist = _distances(xc, xc, x_sq)
    np.fill_diagonal(dist, 0.0)
    log_ls, lml, chol, weights = _fit_length_scale(dist, y_n, alpha)
    return MaternGP(centre, xc, chol, weights, math.exp(log_ls), y_mean, y_std, alpha, lml, x_sq)


# ---------------------------------------------------------------------------------------------
# acquisition over a candidate pool
def _scores(acquisition: AcquisitionFunction, mean: np.ndarray, std: np.ndarray, y_best: float) -> np.ndarray:
    """The package's base acquisition at (mean, std); NaN becomes -inf."""
    if hasattr(acquisition, "y_max"):  # EI / PI read the incumbent from here, as their suggest() sets it
        acquisition.y_max = y_best
    values = np.asarray(acquisition.base_acq(mean, std), dtype=np.float64)
    return np.where(np.isnan(values), -np.inf, values)


def _advance(acquisition: AcquisitionFunction) -> None:
    """Count one suggestion and apply the exploration decay, as the package's suggest() does."""
    acquisition.i += 1
    decay = getattr(acquisition, "decay_exploration", None)
    if decay is not None:
        decay()


class _CandidatePool:
    """Candidates, their posterior under the round's GP, and the believer updates of the picks so far.

    ``var`` is the variance after treating every pick as observed (with noise alpha) at its
    posterior mean: Sigma_t = Sigma_0 - W W^T over the pool, one column of W per pick (a pivoted
    Cholesky of the posterior covariance). The mean does not change under that belief.
    """

    def __init__(self, gp: MaternGP, capacity: int, checked: bool, same_point: float):
        n, d = gp.x_train.shape
        self.gp = gp
        self.capacity = capacity
        self.default_status = 1 if checked else 0
        self.x = np.empty((0, d))
        self.mean_n = np.empty(0)
        self.var0 = np.empty(0)
        self.var = np.empty(0)
        self.vt = np.empty((0, n))  # rows: L^-1 k(X, c)
        self.w = np.empty((0, capacity))
        self.status = np.empty(0, dtype=np.int8)  # 0 unchecked, 1 accepted, -1 rejected
        self.taken = np.empty(0, dtype=bool)  # picked, or a duplicate of a pick or of registered data
        self.near_data = np.empty(0, dtype=bool)
        self.same_point = same_point
        self.picks: list[int] = []
        self.pick_scale: list[float] = []

    def __len__(self) -> int:
        return len(self.x)

    def _prior_cov(self, x: np.ndarray, vt: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Posterior covariance (before any pick) between rows x and pool member p, and their distances."""
        dist = np.sqrt(np.einsum("ij,ij->i", x - self.x[p], x - self.x[p]))
        return _matern52(dist, self.gp.length_scale) - vt @ self.vt[p], dist

    def add(self, x_new: np.ndarray) -> None:
        """Append candidates, with the believer updates of the picks already made."""
        gp = self.gp
        dist = _distances(x_new - gp.centre, gp.x_train, gp.x_sq)
        near_data = dist.min(axis=1) <= self.same_point
        k = _matern52(dist, gp.length_scale, out=dist)
        mean_n = k @ gp.weights
        vt = solve_triangular(gp.chol, k.T, lower=True, check_finite=False, overwrite_b=True).T
        var0 = np.maximum(1.0 - np.einsum("ij,ij->i", vt, vt), 0.0)
        w = np.zeros((len(x_new), self.capacity))
        # copies of a registered point or of a pick are never picked (clipped candidates can coincide)
        taken = near_data.copy()
        for j, p in enumerate(self.picks):
            cov, dist = self._prior_cov(x_new, vt, p)
            w[:, j] = (cov - w[:, :j] @ self.w[p, :j]) / self.pick_scale[j]
            taken |= dist <= self.same_point
        var = np.maximum(var0 - np.einsum("ij,ij->i", w, w), 0.0)
        self.x = np.vstack([self.x, x_new])
        self.mean_n = np.concatenate([self.mean_n, mean_n])
        self.var0 = np.concatenate([self.var0, var0])
        self.var = np.concatenate([self.var, var])
        self.vt = np.vstack([self.vt, vt])
        self.w = np.vstack([self.w, w])
        self.status = np.concatenate([self.status, np.full(len(x_new), self.default_status, np.int8)])
        self.taken = np.concatenate([self.taken, taken])
        self.near_data = np.concatenate([self.near_data, near_data])

    def pick(self, p: int) -> None:
        """Take member p into the batch and shrink the variance around it."""
        j = len(self.picks)
        scale = math.sqrt(self.var[p] + self.gp.alpha)
        cov, dist = self._prior_cov(self.x, self.vt, p)
        self.w[:, j] = (cov - self.w[:, :j] @ self.w[p, :j]) / scale
        self.var -= self.w[:, j] ** 2
        np.maximum(self.var, 0.0, out=self.var)
        self.picks.append(p)
        self.pick_scale.append(scale)
        self.taken |= dist <= self.same_point
        self.taken[p] = True

    def reset(self) -> None:
        """Forget the picks (and their believer updates)."""
        self.picks.clear()
        self.pick_scale.clear()
        self.w[:] = 0.0
        self.var = self.var0.copy()
        self.taken = self.near_data.copy()

    def mean(self) -> np.ndarray:
        return self.mean_n * self.gp.y_std + self.gp.y_mean

    def std(self, prior: bool = False) -> np.ndarray:
        var = self.var0 if prior else self.var
        return np.sqrt(np.maximum(var, _TINY_STD**2)) * self.gp.y_std


class _AcceptGate:
    """Calls the caller's accept() on the best unchecked candidates, in chunks; counts and times it."""

    def __init__(self, accept: AcceptFn | None, chunk: int, quota: Quota | None = None):
        self.accept = accept
        self.chunk = chunk
        self.checked = 0
        self.rejected = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.keys: dict[int, Hashable] = {}  # pool index -> key, when accept() gives keys
        self.claims = BatchClaims(quota)  # keys of this batch's picks

    def check(self, x: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        """accept() on rows x (pool indices ``index``); remembers their keys when accept() gives any."""
        wall, cpu = time.perf_counter(), time.process_time()
        answer = self.accept(x)
        keys = None
        if isinstance(answer, tuple):
            answer, keys = answer
        ok = np.asarray(answer, dtype=bool).reshape(-1)
        self.seconds += time.perf_counter() - wall
        self.cpu_seconds += time.process_time() - cpu
        if ok.shape != (len(x),):
            raise ValueError(f"accept() returned {ok.shape[0]} flags for {len(x)} candidates")
        if keys is not None:
            if len(keys) != len(x):
                raise ValueError(f"accept() returned {len(keys)} keys for {len(x)} candidates")
            index = np.arange(len(x)) if index is None else index
            self.keys.update(zip(index.tolist(), keys, strict=True))
        self.checked += len(x)
        self.rejected += int((~ok).sum())
        return ok

    def claim(self, i: int) -> bool:
        """Reserve candidate i's key for this batch; False when an earlier pick holds it or its quota."""
        return self.claims.claim(self.keys.get(i))

    def best(self, scores: np.ndarray, status: np.ndarray, x: np.ndarray) -> int | None:
        """Index of the best-scoring accepted candidate among rows x (status updated in place), or None."""
        scores = scores.copy()
        scores[status < 0] = -np.inf
        while True:
            i = int(np.argmax(scores))
            if not np.isfinite(scores[i]):
                return None
            if status[i] != 0:
                if self.claim(i):
                    return i
                status[i], scores[i] = -1, -np.inf  # its key (or its group's quota) went to earlier picks
                self.rejected += 1
                continue
            unchecked = np.flatnonzero((status == 0) & np.isfinite(scores))
            batch = unchecked[np.argsort(-scores[unchecked], kind="stable")[: self.chunk]]
            ok = self.check(x[batch], batch)
            status[batch] = np.where(ok, 1, -1)
            scores[batch[~ok]] = -np.inf


def _refine(
    gp: MaternGP,
    starts: np.ndarray,
    acquisition: AcquisitionFunction,
    y_best: float,
    boxes: np.ndarray,
    maxiter: int,
) -> np.ndarray:
    """Polish candidates with L-BFGS-B on the acquisition within their boxes (r, d, 2), all jointly.

    The starts are independent, so the sum of their acquisition values is maximised as one
    problem of r x d variables: one batched GP evaluation per step instead of r separate ones.
    Gradients of the GP are analytic.
    """
    r, d = starts.shape
    x_train, weights, ls = gp.x_train, gp.weights, gp.length_scale
    scale, offset = gp.y_std, gp.y_mean
    h = 1e-6 * scale  # step of the finite differences of base_acq in (mean, std): base_acq is elementwise

    def negative_acquisition(z: np.ndarray) -> tuple[float, np.ndarray]:
        xc = z.reshape(r, d) - gp.centre
        s = _distances(xc, x_train, gp.x_sq) * (_SQRT5 / ls)
        e = np.exp(-s)
        k = (1.0 + s + s * s / 3.0) * e
        slope = -(5.0 / (3.0 * ls * ls)) * (1.0 + s) * e  # d k(x, X_i) / dx = slope_i (x - X_i)
        beta = cho_solve((gp.chol, True), k.T, check_finite=False)  # (n, r)
        mean_n = k @ weights
        var_n = np.maximum(1.0 - np.einsum("ri,ir->r", k, beta), _TINY_STD**2)
        std_n = np.sqrt(var_n)

        def grad_of(coef: np.ndarray) -> np.ndarray:  # sum_i coef_ri slope_ri (x_r - X_i)
            cs = coef * slope
            return xc * cs.sum(axis=1, keepdims=True) - cs @ x_train

        grad_mean = grad_of(np.broadcast_to(weights, k.shape))
        grad_std = -grad_of(beta.T) / std_n[:, None]  # d var = -2 sum beta_i dk_i ; d std = d var / 2 std
        mean, std = mean_n * scale + offset, std_n * scale
        value = _scores(acquisition, mean, std, y_best)
        d_mean = (_scores(acquisition, mean + h, std, y_best) - value) / h
        d_std = (_scores(acquisition, mean, std + h, y_best) - value) / h
        grad = (d_mean * scale)[:, None] * grad_mean + (d_std * scale)[:, None] * grad_std
        finite = np.isfinite(value)
        return -float(value[finite].sum()), -np.where(finite[:, None], grad, 0.0).ravel()

    result = minimize(
        negative_acquisition,
        starts.ravel(),
        jac=True,
        method="L-BFGS-B",
        bounds=boxes.reshape(r * d, 2),
        options={"maxiter": maxiter},
    )
    return np.clip(result.x.reshape(r, d), boxes[..., 0], boxes[..., 1])


# ---------------------------------------------------------------------------------------------
# registered data
def _as_bounds(bounds: ArrayLike) -> np.ndarray:
    b = np.array(bounds, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 2 or len(b) == 0:
        raise ValueError(f"bounds must be a (d, 2) array of [lower, upper] rows, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b[:, 0] > b[:, 1]):
        raise ValueError("bounds must be finite with lower <= upper in every dimension")
    b.flags.writeable = False
    return b


def _as_points(x: ArrayLike, y: ArrayLike, dim: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.ndim == 1 and x.size == dim:
        x = x.reshape(1, dim)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x must have shape (m, {dim}), got {x.shape}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)} values")
    bad = np.flatnonzero(~np.isfinite(y) | ~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(
            f"rows {bad[:10].tolist()} have non-finite x or y: register only labelled points "
            "(a failed decode is not a zero band gap)"
        )
    return x, y


def _warn_outside(x: np.ndarray, bounds: np.ndarray) -> None:
    outside = ~((bounds[:, 0] <= x) & (x <= bounds[:, 1])).all(axis=1)
    if outside.any():
        warnings.warn(f"{int(outside.sum())} registered points lie outside the bounds", stacklevel=3)


class BatchOptimizer:
    """Batch Bayesian optimisation: one GP fit per round, candidate pool, believer-greedy batch.

    The state is ``registered_x`` / ``registered_y``; ``from_points`` rebuilds an identical
    optimiser from them. Everything random in a round comes from ``(config.seed, n_registered)``.
    """

    method = "batch"

    def __init__(
        self,
        bounds: ArrayLike,
        config: AcquisitionConfig | None = None,
        *,
        acquisition: AcquisitionFunction | None = None,
        source: CandidateSource | None = None,
    ):
        self.bounds = _as_bounds(bounds)
        self.config = config or AcquisitionConfig()
        self.source = source
        self.acquisition = acquisition if acquisition is not None else make_acquisition(self.config)
        if isinstance(self.acquisition, GPHedge | ConstantLiar):
            raise TypeError("BatchOptimizer builds batches itself: give it a base acquisition (UCB, EI, PI)")
        dim = len(self.bounds)
        self._x = np.empty((0, dim))
        self._y = np.empty(0)
        self._n = 0
        self._seen: set[bytes] = set()

    @classmethod
    def from_points(
        cls,
        bounds: ArrayLike,
        x: ArrayLike,
        y: ArrayLike,
        config: AcquisitionConfig | None = None,
        *,
        acquisition: AcquisitionFunction | None = None,
        source: CandidateSource | None = None,
    ) -> BatchOptimizer:
        """An optimiser with (x, y) registered: how a resumed campaign rebuilds it from its table.

        Given the same config it suggests what the interrupted optimiser would have. (An
        acquisition with an exploration decay carries state of its own: pass it restored with
        ``set_acquisition_params``.)
        """
        optimizer = cls(bounds, config, acquisition=acquisition, source=source)
        optimizer.register(x, y)
        return optimizer

    @property
    def registered_x(self) -> np.ndarray:
        """Registered latents (n, d), in registration order (read-only view)."""
        view = self._x[: self._n]
        view.flags.writeable = False
        return view

    @property
    def registered_y(self) -> np.ndarray:
        """Registered targets (n,), in registration order (read-only view)."""
        view = self._y[: self._n]
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return self._n

    def register(self, x: ArrayLike, y: ArrayLike) -> None:
        """Append labelled points (m, d) and (m,) in one step; duplicates raise unless allowed."""
        x, y = _as_points(x, y, len(self.bounds))
        if not self.config.allow_duplicate_points:
            keys = [row.tobytes() for row in x + 0.0]  # + 0.0 turns -0.0 into 0.0, as float equality does
            fresh = set(keys)
            if len(fresh) < len(keys) or not self._seen.isdisjoint(fresh):
                raise NotUniqueError(
                    "a registered point is not unique; set allow_duplicate_points=True to allow it"
                )
            self._seen |= fresh
        _warn_outside(x, self.bounds)
        need = self._n + len(x)
        if need > len(self._x):  # amortised growth: bulk and one-by-one registering both stay linear
            capacity = max(need, 2 * len(self._x), 64)
            self._x = np.concatenate([self._x[: self._n], np.empty((capacity - self._n, x.shape[1]))])
            self._y = np.concatenate([self._y[: self._n], np.empty(capacity - self._n)])
        self._x[self._n : need] = x
        self._y[self._n : need] = y
        self._n = need

    def centre_values(self) -> np.ndarray:
        """How good each registered point is as a centre of local candidates: its value, or for the
        straddle its closeness to the level (the boundary is where its candidates should be)."""
        if isinstance(self.acquisition, Straddle):
            return -np.abs(self.registered_y - self.acquisition.level)
        return np.asarray(self.registered_y)

    def fit_gp(self) -> MaternGP:
        """This round's GP on everything registered."""
        return fit_matern_gp(self.registered_x, self.registered_y)

    def _incumbent(self) -> float:
        """Best registered target inside the bounds (TargetSpace's rule), else the best overall."""
        x, y = self.registered_x, self.registered_y
        inside = ((self.bounds[:, 0] <= x) & (x <= self.bounds[:, 1])).all(axis=1)
        return float(y[inside].max() if inside.any() else y.max())

    def _candidates(self, gp: MaternGP | None, rng: np.random.Generator) -> np.ndarray:
        """A pool: uniform points in the box, and points around the best registered ones (or the source's)."""
        if self.source is not None:
            local = gp is not None
            return self.source.candidates(self.config, self.registered_x, self.centre_values(), rng, local)
        cfg, (lo, hi) = self.config, self.bounds.T
        uniform = rng.uniform(lo, hi, size=(cfg.n_random, len(lo)))
        if gp is None or cfg.n_local == 0:
            return uniform
        best = np.argsort(-self.centre_values(), kind="stable")[: cfg.local_centres]
        centres = self.registered_x[best][rng.integers(0, len(best), cfg.n_local)]
        # directions shaped like the box; radii log-uniform over local_radius length scales (1% to 100% by default)
        direction = rng.standard_normal((cfg.n_local, len(lo))) * (hi - lo)
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), np.finfo(float).tiny)
        low, high = np.log10(cfg.local_radius)
        scale = (
            gp.length_scale if cfg.local_scale is None else cfg.local_scale * float(np.linalg.norm(hi - lo))
        )
        radius = scale * 10.0 ** rng.uniform(low, high, size=(cfg.n_local, 1))
        radius = np.minimum(radius, np.linalg.norm(hi - lo))
        return np.vstack([uniform, np.clip(centres + radius * direction, lo, hi)])

    def _select(
        self,
        pool: _CandidatePool,
        k: int,
        y_best: float,
        gate: _AcceptGate | None,
        rng: np.random.Generator,
        final: bool,
    ) -> list[float]:
        """Greedy kriging-believer picks until the pool holds k; with a gate, only accepted members.

        In the final pass an exhausted pool (everything rejected) is topped up with fresh candidates
        up to ``max_extra_pools`` times; each pick also advances the acquisition's decay schedule.
        """
        values: list[float] = []
        extra = 0
        while len(pool.picks) < k:
            scores = _scores(self.acquisition, pool.mean(), pool.std(), y_best)
            scores[pool.taken] = -np.inf
            if gate is None:
                i: int | None = int(np.argmax(scores))
                i = i if np.isfinite(scores[i]) else None
            else:
                i = gate.best(scores, pool.status, pool.x)
            if i is None:
                if not final:
                    break
                if extra == self.config.max_extra_pools:
                    self._give_up(k, pool.x[pool.picks], gate, extra + 1)
                extra += 1
                pool.add(self._candidates(pool.gp, rng))
                continue
            values.append(float(scores[i]))
            y_best = max(y_best, float(pool.mean()[i]))  # the believed value enters EI's incumbent
            pool.pick(i)
            if final:
                _advance(self.acquisition)
        return values

    def _polished(self, pool: _CandidatePool, y_best: float, rng: np.random.Generator) -> np.ndarray:
        """Starts picked greedily (so they are spread out), polished by L-BFGS-B."""
        gp = pool.gp
        self._select(pool, self.config.n_refine, y_best, None, rng, final=False)
        starts = pool.x[pool.picks]
        pool.reset()
        # the best start may go anywhere in the box, as the package's polish does; the others stay
        # within refine_radius length scales, so that they do not all climb to the same peak
        half = self.config.refine_radius * gp.length_scale / math.sqrt(starts.shape[1])
        boxes = np.stack([starts - half, starts + half], axis=-1)
        boxes = np.clip(boxes, self.bounds[:, :1], self.bounds[:, 1:])
        boxes[0] = self.bounds
        # duplicates (of a start, of each other, of registered points) are excluded when picking
        return _refine(gp, starts, self.acquisition, y_best, boxes, self.config.refine_maxiter)

    def suggest(self, n: int, accept: AcceptFn | None = None, quota: Quota | None = None) -> Suggestions:
        """n distinct latents in the box; with ``accept``, only latents it accepts.

        ``accept`` is called on the best unchecked candidates, ``config.accept_chunk`` at a time,
        so it only sees the part of the pool that competes for the batch. When it has rejected a
        whole pool, up to ``config.max_extra_pools`` fresh pools are drawn; if fewer than n
        candidates are accepted after that, NoAcceptableCandidateError is raised carrying those found.
        With ``quota`` (and keys from ``accept``), a candidate whose group's quota earlier picks of the
        batch have filled is passed over like one ``accept`` rejects.
        """
        with threadpool_limits(limits=self.config.blas_threads, user_api="blas"):
            return self._suggest(n, accept, quota)

    def _suggest(self, n: int, accept: AcceptFn | None, quota: Quota | None) -> Suggestions:
        if n < 1:
            raise ValueError("n must be positive")
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self._n])
        gate = _AcceptGate(accept, cfg.accept_chunk, quota)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        gp = self.fit_gp() if self._n else None
        wall1, cpu1 = time.perf_counter(), time.process_time()

        if gp is None:  # nothing registered: uniform points in draw order, as the package does
            x, acq_values, mean, std, n_candidates = self._first_points(n, gate, rng)
        else:
            y_best = self._incumbent()
            same_point = _SAME_POINT * float(np.linalg.norm(self.bounds[:, 1] - self.bounds[:, 0]))
            pool = _CandidatePool(gp, max(n, cfg.n_refine), checked=accept is None, same_point=same_point)
            pool.add(self._candidates(gp, rng))
            if cfg.n_refine and self.source is None:  # a polished point would leave the source's set
                pool.add(self._polished(pool, y_best, rng))
            acq_values = self._select(pool, n, y_best, gate, rng, final=True)
            picks = np.asarray(pool.picks)
            x, mean, std = pool.x[picks], pool.mean()[picks], pool.std(prior=True)[picks]
            acq_values, n_candidates = np.asarray(acq_values), len(pool)

        wall2, cpu2 = time.perf_counter(), time.process_time()
        report = RoundReport(
            method=self.method,
            n_registered=self._n,
            n_suggested=len(x),
            gp_fit_s=wall1 - wall0,
            gp_fit_cpu_s=cpu1 - cpu0,
            acquisition_s=wall2 - wall1 - gate.seconds,
            acquisition_cpu_s=cpu2 - cpu1 - gate.cpu_seconds,
            accept_s=gate.seconds,
            n_candidates=n_candidates,
            n_checked=gate.checked,
            n_rejected=gate.rejected,
            length_scale=gp.length_scale if gp else math.nan,
            log_marginal_likelihood=gp.log_marginal_likelihood if gp else math.nan,
        )
        return Suggestions(x, acq_values, mean, std, report)

    def _first_points(
        self, n: int, gate: _AcceptGate, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Nothing registered: uniform points in draw order (the package's first suggestion is random)."""
        found: list[np.ndarray] = []
        drawn = 0
        for _ in range(1 + self.config.max_extra_pools):
            if self.source is None:
                x = self._uniform(max(n, self.config.n_random), rng)
            else:
                x = self._candidates(None, rng)
            for start in range(0, len(x), gate.chunk):
                chunk = x[start : start + gate.chunk]
                drawn += len(chunk)
                if gate.accept is None:
                    found.extend(chunk)
                    continue
                gate.keys.clear()
                ok = gate.check(chunk)
                found.extend(row for j, row in enumerate(chunk) if ok[j] and gate.claim(j))
                if len(found) >= n:
                    nan = np.full(n, np.nan)
                    return np.array(found[:n]), nan, nan, nan, drawn
        self._give_up(n, np.array(found).reshape(-1, len(self.bounds)), gate, 1 + self.config.max_extra_pools)

    def _uniform(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.bounds[:, 0], self.bounds[:, 1], size=(n, len(self.bounds)))

    @staticmethod
    def _give_up(n: int, found: np.ndarray, gate: _AcceptGate, pools: int) -> NoReturn:
        raise NoAcceptableCandidateError(
            f"accept() rejected {gate.rejected} of {gate.checked} candidates checked in {pools} pools; "
            f"found {len(found)} of the {n} suggestions asked for",
            found,
        )


# ---------------------------------------------------------------------------------------------
# the paper's path
class StockOptimizer:
    """``BayesianOptimization`` used as the paper does: register per point, ``suggest()`` per point.

    A rejected suggestion (``accept`` says no) is dropped and suggested again, at most
    ``max_attempts_per_point`` times per point asked for.
    """

    method = "stock"

    def __init__(
        self,
        bounds: ArrayLike,
        config: AcquisitionConfig | None = None,
        *,
        acquisition: AcquisitionFunction | None = None,
        max_attempts_per_point: int = 5,
    ):
        self.bounds = _as_bounds(bounds)
        self.config = config or AcquisitionConfig(method="stock")
        self.max_attempts_per_point = max_attempts_per_point
        width = len(str(len(self.bounds) - 1))
        self.keys = [f"z{i:0{width}d}" for i in range(len(self.bounds))]
        self.optimizer = BayesianOptimization(
            f=None,
            pbounds={k: (float(lo), float(hi)) for k, (lo, hi) in zip(self.keys, self.bounds, strict=True)},
            acquisition_function=acquisition if acquisition is not None else make_acquisition(self.config),
            random_state=self.config.seed,
            verbose=0,
            allow_duplicate_points=self.config.allow_duplicate_points,
        )

    @classmethod
    def from_points(
        cls,
        bounds: ArrayLike,
        x: ArrayLike,
        y: ArrayLike,
        config: AcquisitionConfig | None = None,
        *,
        acquisition: AcquisitionFunction | None = None,
    ) -> StockOptimizer:
        """An optimiser with (x, y) registered one point at a time."""
        optimizer = cls(bounds, config, acquisition=acquisition)
        optimizer.register(x, y)
        return optimizer

    @property
    def registered_x(self) -> np.ndarray:
        """Registered latents (n, d) (read-only view of the package's TargetSpace)."""
        view = self.optimizer.space.params.view()
        view.flags.writeable = False
        return view

    @property
    def registered_y(self) -> np.ndarray:
        """Registered targets (n,) (read-only view)."""
        view = self.optimizer.space.target.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self.optimizer.space)

    def register(self, x: ArrayLike, y: ArrayLike) -> None:
        """BayesianOptimization.register for every row (quadratic in the total: the package's cost)."""
        x, y = _as_points(x, y, len(self.bounds))
        for row, target in zip(x, y, strict=True):
            self.optimizer.register(params=row, target=float(target))

    def _suggest_one(self) -> tuple[np.ndarray, np.ndarray]:
        """``BayesianOptimization.suggest()`` split into its GP fit and its acquisition search.

        Same calls in the same order as the package's suggest() (tests/active checks that they agree);
        returns the point and [fit wall, fit CPU, search wall, search CPU] seconds.
        """
        bo = self.optimizer
        if len(bo.space) == 0:
            return bo.space.params_to_array(bo.suggest()), np.zeros(4)
        t0 = time.perf_counter(), time.process_time()
        bo.acquisition_function._fit_gp(gp=bo._gp, target_space=bo.space)
        t1 = time.perf_counter(), time.process_time()
        x = bo.acquisition_function.suggest(
            gp=bo._gp, target_space=bo.space, fit_gp=False, random_state=bo._random_state
        )
        t2 = time.perf_counter(), time.process_time()
        return x, np.array([t1[0] - t0[0], t1[1] - t0[1], t2[0] - t1[0], t2[1] - t1[1]])

    def suggest(self, n: int, accept: AcceptFn | None = None, quota: Quota | None = None) -> Suggestions:
        """n suggestions, each from a fresh ``suggest()`` (no registering in between, as in the paper).

        With ``accept``, only latents it accepts; with its keys, no two of a batch share one, and
        ``quota`` limits the picks per group of keys (as :meth:`BatchOptimizer.suggest`).
        """
        with threadpool_limits(limits=self.config.blas_threads, user_api="blas"):
            return self._suggest(n, accept, quota)

    def _suggest(self, n: int, accept: AcceptFn | None, quota: Quota | None) -> Suggestions:
        if n < 1:
            raise ValueError("n must be positive")
        gate = _AcceptGate(accept, 1, quota)
        found: list[np.ndarray] = []
        seconds = np.zeros(4)
        for _ in range(self.max_attempts_per_point * n):
            x, spent = self._suggest_one()
            seconds += spent
            if accept is not None:
                gate.keys.clear()
                if not gate.check(x[None, :])[0]:
                    continue
                if not gate.claim(0):
                    gate.rejected += 1  # its key, or its group's quota, went to an earlier pick
                    continue
            found.append(x)
            if len(found) == n:
                break
        if len(found) < n:
            BatchOptimizer._give_up(n, np.array(found).reshape(-1, len(self.bounds)), gate, 1)
        x = np.array(found)
        bo = self.optimizer
        if len(bo.space):
            mean, std = bo._gp.predict(x, return_std=True)
            y_best = bo.space._target_max()
            values = _scores(bo.acquisition_function, mean, std, y_best if y_best is not None else -np.inf)
            length_scale = float(bo._gp.kernel_.length_scale)
            lml = float(bo._gp.log_marginal_likelihood_value_)
        else:
            mean = std = values = np.full(n, np.nan)
            length_scale = lml = math.nan
        report = RoundReport(
            method=self.method,
            n_registered=len(bo.space),
            n_suggested=n,
            gp_fit_s=seconds[0],
            gp_fit_cpu_s=seconds[1],
            acquisition_s=seconds[2],
            acquisition_cpu_s=seconds[3],
            accept_s=gate.seconds,
            n_candidates=gate.checked or n,
            n_checked=gate.checked,
            n_rejected=gate.rejected,
            length_scale=length_scale,
            log_marginal_likelihood=lml,
        )
        return Suggestions(x, values, mean, std, report)
