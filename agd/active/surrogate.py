"""A random forest on the formulas' Magpie features as the surrogate of a library campaign.

With ``experiments.campaign.surrogate: forest`` (and ``search: candidates``) a campaign still runs
round by round on the same budget, accept rules and oracle, but the model that the acquisition reads
is no longer a GP on the autoencoder's latents. Each round a random forest (scikit-learn) is fitted
on the Magpie features of every registered formula and predicts every member of the candidate
library; the mean over its trees and their spread (std) go into the package's acquisition function
(``UpperConfidenceBound(kappa)``, ``ExpectedImprovement(xi)``, or the straddle), and the batch is the
best-scoring members that ``accept`` lets through, one per formula. This is Bayesian optimisation in
the manner of SMAC (Hutter et al., LION 2011): a tree ensemble's spread as the uncertainty.

Why: a GP on 128 latent dimensions learns little about band gaps from 1,000-2,000 labels (the latent
GP campaigns of ``params.yaml`` label about 166 of the oracle's 472 hits per 1,000 suggestions),
while the same features that the screening forests use generalise across chemistries.

Ranking the whole library takes most of a round (about 8 s of 10 here). With
``surrogate_forest.shortlist`` the whole library is ranked only every ``refresh`` registered points, and
the rounds in between rank again, with their own forest, the best ``shortlist`` members of that ranking
(the whole library when the list cannot fill a batch): 3 s a round instead of 10, and about as many hits
(``reports/campaign_surrogate_forest_shortlist.md``).

Like :class:`~agd.active.acquisition.BatchOptimizer`, the optimiser's state is its registered
``(x, y)`` (latents and values, in order) plus the formulas of points that are not library members
(the initial samples); the forest's seed is ``(seed, number of registered points)``, so a campaign
resumed from its table suggests what the uninterrupted one would have (a shortlist's forest is rebuilt
from the first points registered).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from agd.active.acquisition import (
    AcceptFn,
    NoAcceptableCandidateError,
    Quota,
    RoundReport,
    Suggestions,
    _AcceptGate,
    _advance,
    _scores,
    make_acquisition,
)
from agd.config import AcquisitionConfig, SurrogateForestConfig

if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestRegressor

    from agd.active.library import CandidateLibrary

log = logging.getLogger(__name__)

_PREDICT_CHUNK = 100_000  # members per prediction block: 100 trees x 100k float64 is 80 MB


def magpie_rows(formulas: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Magpie features (float32) of ``formulas`` and a mask of the rows that could be featurised."""
    from agd.chem.magpie import MagpieFeaturizer

    result = MagpieFeaturizer().featurize_formulas(formulas)
    ok = result.ok & np.isfinite(result.features).all(axis=1)
    return np.ascontiguousarray(result.features, dtype=np.float32), ok


def _tree_predict(tree, block: np.ndarray) -> np.ndarray:
    return tree.predict(block, check_input=False)  # block is float32 and contiguous, as trees want it


class ForestOptimizer:
    """Bayesian optimisation over a :class:`~agd.active.library.CandidateLibrary` with a random forest
    on Magpie features as the surrogate (the :class:`~agd.active.acquisition.LatentOptimizer` protocol).

    ``x``/``y``/``formulas`` are the points registered so far (``formulas[i]`` featurises ``x[i]``;
    needed for points that are not members, such as initial samples). Later points come through
    :meth:`register` and must be members.
    """

    method = "forest"

    def __init__(
        self,
        bounds: ArrayLike,
        library: CandidateLibrary,
        forest: SurrogateForestConfig,
        config: AcquisitionConfig,
        x: ArrayLike,
        y: ArrayLike,
        formulas: list[str],
        n_initial: int = 0,
    ) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.library = library
        self.forest = forest
        self.config = config
        self.acquisition = make_acquisition(config)
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if not (len(x) == len(y) == len(formulas)):
            raise ValueError(f"{len(x)} points, {len(y)} values and {len(formulas)} formulas")
        if not len(y):
            raise ValueError("the forest surrogate needs at least one registered point")
        self._member_features, self._member_ok = library.features()
        self._taken = np.zeros(len(library), dtype=bool)
        features, ok = magpie_rows([str(f) for f in formulas])
        if not ok.all():
            bad = np.flatnonzero(~ok)
            log.warning(
                "%d registered formulas cannot be featurised and do not train the forest (first: row %d, %r)",
                len(bad),
                bad[0],
                formulas[bad[0]],
            )
        self._x, self._y = x, y
        self._features, self._fits = features, ok
        self._members = library.lookup(x)  # each registered point's member index (-1: not a member)
        self._taken[self._members[self._members >= 0]] = True  # initial members are not suggested
        if not 0 <= n_initial <= len(y):
            raise ValueError(f"n_initial must lie in [0, {len(y)}], got {n_initial}")
        self.n_initial = n_initial
        self._shortlist: tuple[int, np.ndarray] | None = None  # (refresh count, member indices)

    @property
    def registered_x(self) -> np.ndarray:
        return self._x

    @property
    def registered_y(self) -> np.ndarray:
        return self._y

    def __len__(self) -> int:
        return len(self._y)

    def register(self, x: ArrayLike, y: ArrayLike) -> None:
        """Append labelled library members (m, d) and their values (m,)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} points but {len(y)} values")
        index = self.library.lookup(x)
        if (index < 0).any():
            raise ValueError(
                f"{int((index < 0).sum())} of {len(x)} registered points are not library members; the forest "
                "surrogate registers the members it suggested"
            )
        self._x = np.concatenate([self._x, x])
        self._y = np.concatenate([self._y, y])
        self._features = np.concatenate([self._features, self._member_features[index]])
        self._fits = np.concatenate([self._fits, self._member_ok[index]])
        self._members = np.concatenate([self._members, index])
        self._taken[index] = True

    def fit(self, n: int | None = None) -> RandomForestRegressor:
        """The forest on the first ``n`` registered points (all by default) that could be featurised,
        seeded by ``(seed, n)``: the forest of any earlier round can be rebuilt exactly."""
        from sklearn.ensemble import RandomForestRegressor

        n = len(self) if n is None else n
        seed = int(np.random.SeedSequence([self.config.seed, n]).generate_state(1)[0])
        model = RandomForestRegressor(
            n_estimators=self.forest.n_estimators,
            max_features=self.forest.max_features,
            min_samples_leaf=self.forest.min_samples_leaf,
            n_jobs=self.forest.n_jobs,
            random_state=seed,
        )
        fits = self._fits[:n]
        return model.fit(self._features[:n][fits], self._y[:n][fits])

    def shortlist(self, model: RandomForestRegressor | None = None) -> np.ndarray | None:
        """The members a round ranks with ``surrogate_forest.shortlist`` set (None: all of them).

        The whole library is ranked at every ``refresh`` registered points after the initial ones, by
        the forest of that moment (rebuilt from the first points when a campaign resumes), and its
        ``shortlist`` best unregistered members are kept until the next refresh; each round ranks them
        again with its own forest, and ranks the whole library when the list cannot fill its batch."""
        size = self.forest.shortlist
        if size is None or size >= len(self.library):
            return None
        count = (len(self) - self.n_initial) // self.forest.refresh
        if self._shortlist is None or self._shortlist[0] != count:
            n = self.n_initial + count * self.forest.refresh
            refit = model if model is not None and n == len(self) else self.fit(n)  # ``model``: this round's
            mean, std = self.predict(refit, self._member_features)
            scores = _scores(make_acquisition(self.config), mean, std, float(np.max(self._y[:n])))
            members = self._members[:n]
            scores[members[members >= 0]] = -np.inf
            scores[~self._member_ok] = -np.inf
            top = np.argpartition(-scores, size - 1)[:size]
            self._shortlist = (count, np.sort(top[np.isfinite(scores[top])]))
        return self._shortlist[1]

    def predict(self, model: RandomForestRegressor, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std over the trees at each row of ``features`` (float32), in blocks."""
        mean = np.empty(len(features))
        std = np.empty(len(features))
        trees = model.estimators_
        with ThreadPoolExecutor(self.forest.n_jobs) as pool:  # tree prediction releases the GIL
            for start in range(0, len(features), _PREDICT_CHUNK):
                block = features[start : start + _PREDICT_CHUNK]
                per_tree = np.stack(list(pool.map(partial(_tree_predict, block=block), trees)))
                mean[start : start + len(block)] = per_tree.mean(axis=0)
                std[start : start + len(block)] = per_tree.std(axis=0)
        return mean, std

    def _ranked(
        self, model: RandomForestRegressor, rows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, std and acquisition score of every member under ``model``; only ``rows`` are
        predicted when given (the others score -inf), and registered members score -inf."""
        if rows is None:
            mean, std = self.predict(model, self._member_features)
        else:
            mean, std = np.full(len(self.library), np.nan), np.full(len(self.library), np.nan)
            mean[rows], std[rows] = self.predict(model, self._member_features[rows])
        scores = _scores(self.acquisition, mean, std, float(np.max(self._y)))
        scores[self._taken | ~self._member_ok] = -np.inf
        return mean, std, scores

    def suggest(self, n: int, accept: AcceptFn | None = None, quota: Quota | None = None) -> Suggestions:
        """The ``n`` best-scoring members that ``accept`` lets through (none registered before)."""
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        wall, cpu = time.perf_counter(), time.process_time()
        model = self.fit()
        fit_s, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        rows = self.shortlist(model)
        mean, std, scores = self._ranked(model, rows)
        gate = _AcceptGate(accept, self.config.accept_chunk, quota) if accept is not None else None
        status = np.zeros(len(scores), dtype=np.int8)  # 0 unchecked, 1 accepted, -1 refused
        picks: list[int] = []
        values: list[float] = []
        while len(picks) < n:
            if gate is None:
                i = int(np.argmax(scores))
                i = i if np.isfinite(scores[i]) else None
            else:
                i = gate.best(scores, status, self.library.latents)
            if i is None and rows is not None:  # the list ran out: rank the whole library this once
                rows = None
                mean, std, scores = self._ranked(model, None)
                scores[picks] = -np.inf
                continue
            if i is None:
                break
            picks.append(i)
            values.append(float(scores[i]))
            scores[i] = -np.inf
            _advance(self.acquisition)
        accept_s = gate.seconds if gate is not None else 0.0
        report = RoundReport(
            method=self.method,
            n_registered=len(self),
            n_suggested=len(picks),
            gp_fit_s=fit_s,
            gp_fit_cpu_s=fit_cpu,
            acquisition_s=time.perf_counter() - wall - accept_s,
            acquisition_cpu_s=time.process_time() - cpu - (gate.cpu_seconds if gate is not None else 0.0),
            accept_s=accept_s,
            n_candidates=int(np.isfinite(scores).sum()) + len(picks),
            n_checked=gate.checked if gate is not None else 0,
            n_rejected=gate.rejected if gate is not None else 0,
            length_scale=math.nan,
            log_marginal_likelihood=math.nan,
        )
        index = np.asarray(picks, dtype=np.int64)
        x = self.library.latents[index].astype(np.float64)
        if len(picks) < n:
            raise NoAcceptableCandidateError(
                f"only {len(picks)} of {n} suggestions: accept() refused every other unregistered member", x
            )
        return Suggestions(x, np.asarray(values), mean[index], std[index], report)
