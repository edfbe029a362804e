"""Band-gap oracles: anything that labels formulas with gaps, an uncertainty and a per-formula status.

An :class:`Oracle` answers ``label(formulas) -> OracleLabels``. Campaign code sees only that, so an
ML model standing in for DFT (:class:`ModelOracle` around a Roost ensemble or a forest) and a table of
imported DFT results (:class:`TableOracle`) are interchangeable. A batch never fails because of one
formula: a formula that cannot be labelled gets NaN and a status saying why ('unparsable: ...',
'element X unknown to the model', 'no DFT result'); every other formula is labelled.

:func:`run_oracle_stage` is the ``agd train oracle`` stage: the paper's Exp1 protocol (train on the
prepared ``train`` split, early stopping on ``val``, report on the ``test`` hold-out and on the
paper's 500 "independent test" rows), then the deployed oracle, refit on all the data. Its folder
holds ``oracle.json`` naming the deployed model, which :func:`load_oracle` reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from agd.chem.formula import FormulaError, formula_key
from agd.config import OracleConfig

log = logging.getLogger(__name__)

OK = "ok"
NO_RESULT = "no DFT result"
ORACLE_FILE = "oracle.json"


@dataclass
class OracleLabels:
    """Labels of a batch: ``gaps`` (eV, NaN where not labelled), ``std`` (eV, or None) and ``status``."""

    gaps: np.ndarray
    std: np.ndarray | None
    status: list[str]

    def __len__(self) -> int:
        return len(self.status)

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the labelled formulas."""
        return np.array([s == OK for s in self.status], dtype=bool)

    def to_frame(self, formulas: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per formula: (formula,) gap, std, status."""
        frame = pd.DataFrame(
            {"gap": self.gaps, "std": self.std if self.std is not None else np.nan, "status": self.status}
        )
        if formulas is not None:
            frame.insert(0, "formula", list(formulas))
        return frame


@runtime_checkable
class Oracle(Protocol):
    """Labels formulas with band gaps; never raises for a bad formula."""

    name: str

    def label(self, formulas: Sequence[str]) -> OracleLabels: ...


class Predictor(Protocol):
    """A trained model: :class:`agd.models.roost.RoostEnsemble` or :class:`agd.models.forest.ForestModel`."""

    def predict(self, formulas: Sequence[str]) -> OracleLabels: ...


class ModelOracle:
    """An ML model as the oracle: gap = ensemble mean, std = ensemble (or tree) spread."""

    def __init__(self, model: Predictor, name: str = "model") -> None:
        self.model = model
        self.name = name

    def label(self, formulas: Sequence[str]) -> OracleLabels:
        """Label formulas with the model; unlabelled ones carry the model's reason."""
        return self.model.predict(list(formulas))

    def __repr__(self) -> str:
        return f"ModelOracle({self.name!r}, {type(self.model).__name__})"


class TableOracle:
    """Known results (e.g. imported DFT gaps) keyed by reduced formula; unknown formulas get 'no DFT result'.

    Rows whose formula does not parse or whose gap is not a finite number are skipped (counted in
    ``skipped``); several rows of one composition are merged by their median gap.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        gap_column: str = "band_gap",
        formula_column: str | None = None,
        std_column: str | None = None,
        name: str = "dft-table",
    ) -> None:
        formula_column = formula_column or next(
            (c for c in ("reduced_formula", "formula", "composition") if c in table.columns), None
        )
        if formula_column is None or formula_column not in table.columns:
            raise ValueError(f"table needs a formula column; got {list(table.columns)}")
        if gap_column not in table.columns:
            raise ValueError(f"table has no {gap_column!r} column; got {list(table.columns)}")
        keys, keep = [], []
        for text in table[formula_column]:
            try:
                keys.append(formula_key(text))
                keep.append(True)
            except FormulaError:
                keys.append(None)
                keep.append(False)
        gaps = pd.to_numeric(table[gap_column], errors="coerce").to_numpy(dtype=float)
        keep = np.asarray(keep) & np.isfinite(gaps)
        frame = pd.DataFrame({"key": keys, "gap": gaps})
        if std_column is not None:
            frame["std"] = pd.to_numeric(table[std_column], errors="coerce").to_numpy(dtype=float)
        grouped = frame[keep].groupby("key", sort=True).median()
        self.name = name
        self.skipped = int((~keep).sum())
        self._gaps: dict[str, float] = grouped["gap"].to_dict()
        self._std: dict[str, float] | None = grouped["std"].to_dict() if std_column is not None else None

    def __len__(self) -> int:
        return len(self._gaps)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> TableOracle:
        """Read a CSV (formula text kept as text) or parquet table."""
        path = Path(path)
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, keep_default_na=False, na_values=[""])
        return cls(table, **kwargs)

    def label(self, formulas: Sequence[str]) -> OracleLabels:
        """Known gaps by composition; 'no DFT result' or 'unparsable: ...' otherwise."""
        n = len(formulas)
        gaps = np.full(n, np.nan)
        std = np.full(n, np.nan) if self._std is not None else None
        status = []
        for i, text in enumerate(formulas):
            try:
                key = formula_key(text)
            except FormulaError as exc:
                status.append(f"unparsable: {exc}")
                continue
            if key not in self._gaps:
                status.append(NO_RESULT)
                continue
            gaps[i] = self._gaps[key]
            if std is not None:
                std[i] = self._std[key]
            status.append(OK)
        return OracleLabels(gaps, std, status)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``table.parquet`` and ``oracle.json`` so :func:`load_oracle` can reopen it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame({"reduced_formula": list(self._gaps), "band_gap": list(self._gaps.values())})
        if self._std is not None:
            table["std"] = [self._std[k] for k in self._gaps]
        table.to_parquet(folder / "table.parquet", index=False)
        meta = {"kind": "table", "path": "table.parquet", "name": self.name, "std": self._std is not None}
        (folder / ORACLE_FILE).write_text(json.dumps(meta, indent=2))
        return folder


def _saved_oracle(folder: Path) -> tuple[str, Path, str, dict]:
    """(kind, model path, name, oracle.json's content or {}) of the oracle saved in ``folder``."""
    meta_path = folder / ORACLE_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return meta["kind"], folder / meta["path"], meta.get("name", meta["kind"]), meta
    if (folder / "ensemble.json").is_file():
        return "roost", folder, "roost", {}
    if (folder / "forest.joblib").is_file():
        return "forest", folder / "forest.joblib", "forest", {}
    raise FileNotFoundError(f"{folder}: no {ORACLE_FILE}, ensemble.json or forest.joblib")


def oracle_files(folder: str | os.PathLike) -> list[Path]:
    """The files :func:`load_oracle` reads from ``folder``, sorted: what the oracle's labels depend on.

    A stage output's metrics, history and hold-out models are not among them, so a hash of these files
    changes only when the deployed oracle does."""
    folder = Path(folder)
    _, path, _, meta = _saved_oracle(folder)
    files = [folder / ORACLE_FILE] if meta else []
    files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return sorted(files)


def load_oracle(folder: str | os.PathLike, device: str = "cpu") -> Oracle:
    """Open the oracle saved in ``folder`` (a stage output, a Roost ensemble, a forest or a table)."""
    from agd.models.forest import ForestModel
    from agd.models.roost import RoostEnsemble

    folder = Path(folder)
    meta_path = folder / ORACLE_FILE
    kind, path, name, meta = _saved_oracle(folder)
    if kind == "roost":
        return ModelOracle(RoostEnsemble.load(path, device), name)
    if kind == "forest":
        return ModelOracle(ForestModel.load(path), name)
    if kind == "table":
        return TableOracle.from_file(path, std_column="std" if meta.get("std") else None, name=name)
    raise ValueError(f"{meta_path}: unknown oracle kind {kind!r}")


# -- the stage -----------------------------------------------------------------------------------------


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """R2, MAE, RMSE (eV) over the rows with a finite prediction, and how many rows that is."""
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    ok = np.isfinite(y_pred)
    n = int(ok.sum())
    if n == 0:
        return {"n": 0, "n_unlabelled": int(len(ok)), "r2": math.nan, "mae": math.nan, "rmse": math.nan}
    err = y_pred[ok] - y_true[ok]
    ss_tot = float(((y_true[ok] - y_true[ok].mean()) ** 2).sum())
    return {
        "n": n,
        "n_unlabelled": int((~ok).sum()),
        "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else math.nan,
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
    }


#: What the metric groups of ``metrics.json`` mean (written into the file's ``notes``).
NOTES = {
    "test": "the prepared 'test' split: a seeded 20% hold-out never used for training or early stopping",
    "val": "the 'val' split used for early stopping (optimistic for Roost)",
    "paper500_heldout": "the paper's 500 'independent test' rows that fall in our test split (a fair subset)",
    "paper500_all": (
        "all of the paper's 500 'independent test' rows; they are also in Exp1, so some of them are in our "
        "training split (dataset.paper500_rows_by_split): an optimistic figure, kept only for comparison with the paper"
    ),
    "blend_roost_forest": "diagnostic: equal-weight mean of the Roost ensemble and the forest (not deployed)",
    "deployed": (
        "the deployed oracle has seen ALL rows (train + val + test). refit=finetune: each early-stopped Roost "
        "member is trained further on all rows for finetune_epochs at finetune_lr_factor x learning_rate "
        "(cosine decay); refit=scratch: each member is retrained from its seed for the epoch count early "
        "stopping chose, under the same schedule; the forest is refit on all rows. All figures here are "
        "those of the hold-out models; the deployed ones cannot be scored on data they have seen."
    ),
}


def _evaluate(pred: np.ndarray, data: pd.DataFrame, groups: Mapping[str, np.ndarray]) -> dict[str, dict]:
    y = data["band_gap"].to_numpy(dtype=float)
    return {name: regression_metrics(y[mask], pred[mask]) for name, mask in groups.items() if mask.any()}


def run_oracle_stage(
    prepared_parquet: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: OracleConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train, evaluate (Exp1 protocol) and save the oracle models; returns and writes ``metrics.json``.

    Layout of ``out_dir``: ``holdout/<model>`` (trained on 'train', evaluated on 'test'),
    ``deployed/<model>`` (trained on all rows; absent when ``cfg.refit`` is 'none'), ``oracle.json``
    (the deployed primary model, for :func:`load_oracle`), ``metrics.json``, ``predictions.parquet``
    (hold-out predictions of every model for every row) and ``history.csv`` (Roost epochs).
    ``on_epoch(epoch, metrics)`` receives keys like ``roost.holdout.m0.val_mae``, so one MLflow run can
    log every member with ``step=epoch``.
    """
    from agd.models.forest import train_forest
    from agd.models.roost import finetune_ensemble, train_ensemble

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = pd.read_parquet(prepared_parquet)
    missing = [c for c in ("reduced_formula", "band_gap", "split") if c not in data.columns]
    if missing:
        raise ValueError(f"{prepared_parquet}: prepared data lacks column(s) {missing}")
    formulas = data["reduced_formula"].astype(str).tolist()
    gaps = data["band_gap"].to_numpy(dtype=float)
    split = data["split"].to_numpy(dtype=str)
    masks = {s: split == s for s in ("train", "val", "test")}
    groups = {"test": masks["test"], "val": masks["val"]}
    paper = cfg.paper_test_column
    paper_split: dict[str, int] = {}
    if paper in data.columns:
        in_paper = data[paper].fillna(False).astype(bool).to_numpy()
        groups["paper500_heldout"] = in_paper & masks["test"]
        groups["paper500_all"] = in_paper
        paper_split = {s: int((in_paper & m).sum()) for s, m in masks.items()}
    train_f = [f for f, m in zip(formulas, masks["train"], strict=True) if m]
    val_f = [f for f, m in zip(formulas, masks["val"], strict=True) if m]

    metrics: dict = {
        "dataset": {
            "path": str(prepared_parquet),
            "rows": len(data),
            **{f"{s}_rows": int(m.sum()) for s, m in masks.items()},
            "frac_metal": float((gaps == 0).mean()),
            **({"paper500_rows_by_split": paper_split} if paper_split else {}),
        },
        "primary": cfg.primary,
        "models": {},
        "notes": NOTES,
    }
    predictions = pd.DataFrame({"reduced_formula": formulas, "band_gap": gaps, "split": split})
    history_rows: list[dict] = []
    deployed: dict[str, Path] = {}

    def epoch_hook(phase: str) -> Callable[[int, int, dict[str, float]], None]:
        def hook(member: int, epoch: int, values: dict[str, float]) -> None:
            history_rows.append({"phase": phase, "member": member, "epoch": epoch, **values})
            if on_epoch is not None:
                on_epoch(epoch, {f"roost.{phase}.m{member}.{k}": v for k, v in values.items()})

        return hook

    if "roost" in cfg.models:
        rc = cfg.roost
        t0 = time.perf_counter()
        ensemble = train_ensemble(
            train_f, gaps[masks["train"]], val_f, gaps[masks["val"]], rc, cfg.seed,
            on_epoch=epoch_hook("holdout"), progress=progress,
        )  # fmt: skip
        train_minutes = (time.perf_counter() - t0) / 60
        ensemble.save(out / "holdout" / "roost")
        member_pred, _, _ = ensemble.predict_members(formulas)
        labels = ensemble.predict(formulas)
        roost_metrics: dict = {
            "ensemble": _evaluate(labels.gaps, data, groups),
            "members": {
                f"m{i}": _evaluate(member_pred[:, i], data, groups) for i in range(member_pred.shape[1])
            },
            "best_epochs": [m.best_epoch for m in ensemble.members],
            "epochs_run": [len(m.history) for m in ensemble.members],
            "seconds_per_epoch": float(np.mean([h["seconds"] for m in ensemble.members for h in m.history])),
            "train_minutes": train_minutes,
        }
        predictions["roost"] = labels.gaps
        predictions["roost_std"] = labels.std if labels.std is not None else np.nan
        for i in range(member_pred.shape[1]):
            predictions[f"roost_m{i}"] = member_pred[:, i]
        t0 = time.perf_counter()
        if cfg.refit == "finetune":
            final = finetune_ensemble(
                ensemble, formulas, gaps, on_epoch=epoch_hook("deployed"), progress=progress
            )
        elif cfg.refit == "scratch":
            final = train_ensemble(
                formulas, gaps, None, None, rc, cfg.seed, epochs=roost_metrics["best_epochs"],
                on_epoch=epoch_hook("deployed"), progress=progress,
            )  # fmt: skip
        if cfg.refit == "none":
            deployed["roost"] = out / "holdout" / "roost"
        else:
            roost_metrics["refit_minutes"] = (time.perf_counter() - t0) / 60
            deployed["roost"] = final.save(out / "deployed" / "roost")
        metrics["models"]["roost"] = roost_metrics

    if "forest" in cfg.models:
        fc = cfg.forest
        forest = train_forest(train_f, gaps[masks["train"]], fc, cfg.seed)
        forest.save(out / "holdout" / "forest.joblib")
        labels = forest.predict(formulas)
        predictions["forest"] = labels.gaps
        predictions["forest_std"] = labels.std
        forest_metrics = {"model": _evaluate(labels.gaps, data, groups), "train_minutes": forest.seconds / 60}
        if cfg.refit == "none":
            deployed["forest"] = out / "holdout" / "forest.joblib"
        else:
            final_forest = train_forest(formulas, gaps, fc, cfg.seed)
            forest_metrics["refit_minutes"] = final_forest.seconds / 60
            deployed["forest"] = final_forest.save(out / "deployed" / "forest.joblib")
        metrics["models"]["forest"] = forest_metrics

    if {"roost", "forest"} <= set(predictions.columns):
        # a diagnostic only: how much an equal-weight average of the two model kinds would gain
        blend = predictions[["roost", "forest"]].mean(axis=1, skipna=False).to_numpy()
        metrics["models"]["blend_roost_forest"] = {"model": _evaluate(blend, data, groups)}

    primary = cfg.primary if cfg.primary in deployed else next(iter(deployed), None)
    if primary is not None:
        meta = {
            "kind": primary,
            "path": os.path.relpath(deployed[primary], out),
            "name": f"{primary}-{'train-split' if cfg.refit == 'none' else 'all-data'}",
            "trained_on": "train split" if cfg.refit == "none" else f"all rows (refit: {cfg.refit})",
            "others": {k: os.path.relpath(v, out) for k, v in deployed.items() if k != primary},
        }
        (out / ORACLE_FILE).write_text(json.dumps(meta, indent=2))
    metrics["minutes"] = (time.perf_counter() - start) / 60
    predictions.to_parquet(out / "predictions.parquet", index=False)
    if history_rows:
        pd.DataFrame(history_rows).to_csv(out / "history.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=2))
    return metrics


def _json_ready(value):
    """NaN -> None so metrics.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value
