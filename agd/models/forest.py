"""Random forest on the 132 Magpie descriptors: the fast band-gap oracle and screener.

Features come from :class:`agd.chem.magpie.MagpieFeaturizer` (matminer's Magpie preset). The forest
is scikit-learn's ``RandomForestRegressor``; its uncertainty is the spread of the individual trees'
predictions. A formula is refused (NaN gap, a status naming the reason) when it does not parse or
holds an element absent from the training formulas, where the descriptors say nothing the trees
have seen. Saved with joblib (compressed), next to the element list and the config.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import joblib
import numpy as np
from sklearn.ensemble import RandomForestRegressor

from agd.chem.formula import FormulaError, parse_formula
from agd.chem.magpie import MagpieFeaturizer
from agd.config import ForestConfig
from agd.models.oracle import OracleLabels

#: Formulas featurised and predicted at a time; bounds the (trees x formulas) spread matrix.
_PREDICT_CHUNK = 20_000


@dataclass
class ForestModel:
    """A trained forest, the elements of its training data and its config."""

    forest: RandomForestRegressor
    elements: frozenset[str]
    config: ForestConfig
    seconds: float = 0.0

    def predict(self, formulas: Sequence[str], chunk_size: int = _PREDICT_CHUNK) -> OracleLabels:
        """Gaps (mean over trees) and the trees' standard deviation; NaN with a reason for refused rows."""
        featurizer = MagpieFeaturizer()
        n = len(formulas)
        gaps = np.full(n, np.nan)
        std = np.full(n, np.nan)
        status: list[str] = []
        for first in range(0, n, chunk_size):
            chunk = list(formulas[first : first + chunk_size])
            chunk_status = self._status(chunk)
            result = featurizer.featurize_formulas(chunk)
            for err in result.errors:
                if chunk_status[err.row] == "ok":
                    chunk_status[err.row] = f"unparsable: {err.reason}"
            rows = np.flatnonzero([s == "ok" for s in chunk_status])
            if len(rows):
                per_tree = np.stack([tree.predict(result.features[rows]) for tree in self.forest.estimators_])
                gaps[first + rows] = per_tree.mean(axis=0)
                std[first + rows] = per_tree.std(axis=0)
            status.extend(chunk_status)
        return OracleLabels(gaps, std, status)

    def predict_chunks(
        self, formulas: Iterable[str], chunk_size: int = _PREDICT_CHUNK
    ) -> Iterator[OracleLabels]:
        """Stream labels for an iterable of formulas, ``chunk_size`` at a time."""
        iterator = iter(formulas)
        while chunk := list(islice(iterator, chunk_size)):
            yield self.predict(chunk, chunk_size)

    def _status(self, formulas: Sequence[str]) -> list[str]:
        status = []
        for text in formulas:
            try:
                counts = parse_formula(text)
            except FormulaError as exc:
                status.append(f"unparsable: {exc}")
                continue
            unknown = [el for el in counts if el not in self.elements]
            status.append(f"element {unknown[0]} unknown to the model" if unknown else "ok")
        return status

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model with joblib (zlib level 3) atomically; its training time stays out of the
        file, so a retrain that grows the same trees writes the same bytes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        payload = {
            "format": "agd.forest/1",
            "forest": self.forest,
            "elements": sorted(self.elements),
            "config": self.config.model_dump(),
        }
        joblib.dump(payload, tmp, compress=3)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ForestModel:
        """Read a model written by :meth:`save`."""
        data = joblib.load(path)
        return cls(
            data["forest"],
            frozenset(data["elements"]),
            ForestConfig.model_validate(data["config"]),
        )  # files written before the seconds were left out still carry them; they are not read


def train_forest(
    formulas: Sequence[str], gaps: Sequence[float], cfg: ForestConfig, seed: int = 0
) -> ForestModel:
    """Fit the forest on Magpie features of (valid) training formulas."""
    start = time.perf_counter()
    result = MagpieFeaturizer().featurize_formulas(list(formulas))
    if result.errors:
        shown = ", ".join(f"{formulas[e.row]!r} ({e.reason})" for e in result.errors[:3])
        raise ValueError(f"training formulas must all be valid; e.g. {shown}")
    forest = RandomForestRegressor(
        n_estimators=cfg.n_estimators,
        max_features=cfg.max_features,
        min_samples_leaf=cfg.min_samples_leaf,
        max_samples=cfg.max_samples,
        n_jobs=cfg.n_jobs,
        random_state=seed,
    )
    forest.fit(result.features, np.asarray(gaps, dtype=np.float64))
    elements = frozenset(el for text in formulas for el in parse_formula(text))
    return ForestModel(forest, elements, cfg, time.perf_counter() - start)
