"""The ``agd screen`` stage: screening models on every training set, judged against the oracle's own screening.

For each (experiment, repeat, training_set) group of ``training_sets.parquet`` and each model in
``screening.models`` (random forest on Magpie features, Roost), a model is trained on a seeded
``1 - holdout_fraction`` of the group's rows and scored (R2, MAE, RMSE) on the rest and on a common
external test set: the prepared 'test' split minus every composition that appears in any training
set. The model then screens the generated candidates for each band-gap window, and its hits are
compared with the oracle's hits on the same candidates (recovery, precision, F1; see
:mod:`agd.screening.metrics`).

Streaming: the candidates are read in pyarrow batches of ``chunk_size``; the oracle labels each
batch once and the result is cached (``state/oracle/<fingerprint>/part-*.parquet``, resumable part
by part). A screening pass then trains up to ``groups_per_pass`` models and reads the cached parts
once for all of them: every chunk is featurised once (Magpie for the forests, Roost's graph arrays
for the Roost models) and every model predicts it. Only one chunk's formulas exist as Python
objects at a time.

Resume: each finished group writes ``state/groups/<group>.hits.parquet``, ``<group>.test.parquet``
(its model's predictions for the whole prepared 'test' split) then ``<group>.json``; a fingerprint
of everything the group depends on (its rows, the model's config, the windows, the oracle's
screening, the test set) decides whether a stored group is reused. The test set is the one input
that does not change the model: when only it changed (a new campaign adds or drops compositions of
the 'test' split in some training set), a stored group is rescored from its stored predictions
instead of retrained. The final tables are rebuilt from the stored groups in a fixed order, so a
rerun, or a run resumed after a kill, writes the same files.

Outputs in ``out_dir``: ``metrics.parquet`` (catalog table ``screening_metrics``), ``hits.parquet``
(catalog table ``screening``), ``table1.parquet`` (the aggregated Table 1), ``labels_kept.parquet``
(each screener of the hit windows judged again with its own training set's labels in place of its
predictions for the candidates that set labels), ``check.parquet`` (with ``screening.check_margins``: each
such screener after the oracle checks what it calls in its widened windows; empty otherwise),
``domain.parquet`` (with ``screening.domain_min_rows``: each such screener without its calls on elements
its training set barely holds; empty otherwise),
``rejected_rows.csv`` (training rows that could not be used, with row number and reason) and
``summary.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from agd.chem.formula import FormulaError, formula_key, parse_formula
from agd.config import ScreeningConfig
from agd.executors import Executor, is_local
from agd.screening.metrics import (
    CHECK_METRICS,
    DOMAIN_METRICS,
    LABELS_KEPT_METRICS,
    SCREENER_KEYS,
    aggregate_check,
    aggregate_domain,
    aggregate_labels_kept,
    aggregate_table1,
    check_json,
    check_markdown,
    check_scores,
    counts_metrics,
    describe_window,
    domain_json,
    domain_markdown,
    domain_scores,
    labels_kept_frame,
    labels_kept_markdown,
    labels_kept_scores,
    paired_differences,
    paired_json,
    table1_json,
    table1_markdown,
    widen_window,
    window_mask,
)

log = logging.getLogger(__name__)

#: Columns ``training_sets.parquet`` must have (``origin`` is optional).
TRAINING_COLUMNS = ("experiment", "repeat", "training_set", "reduced_formula", "band_gap")
#: Columns of ``metrics.parquet``: the catalog table ``screening_metrics`` without provenance.
METRICS_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("repeat", pa.int32()),
        ("model", pa.string()),
        ("training_set", pa.string()),
        ("gap_window", pa.string()),
        ("n_train", pa.int32()),
        ("r2_holdout", pa.float64()),
        ("mae_holdout", pa.float64()),
        ("rmse_holdout", pa.float64()),
        ("r2_test", pa.float64()),
        ("mae_test", pa.float64()),
        ("rmse_test", pa.float64()),
        ("n_candidates", pa.int64()),
        ("n_oracle", pa.int64()),
        ("n_recovered", pa.int64()),
        ("recovery", pa.float64()),
        ("precision", pa.float64()),
        ("f1", pa.float64()),
    ]
)
#: Columns of ``hits.parquet``: the catalog table ``screening`` without provenance.
HITS_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("repeat", pa.int32()),
        ("model", pa.string()),
        ("training_set", pa.string()),
        ("gap_window", pa.string()),
        ("formula", pa.string()),
        ("reduced_formula", pa.string()),
        ("predicted_gap", pa.float64()),
        ("oracle_gap", pa.float64()),
        # the prediction lies outside the range of labels its model trained on: an extrapolation,
        # which tree models cannot make and which a neural model makes with little to back it
        ("beyond_training", pa.bool_()),
    ]
)
#: Columns of a screener's near-misses (``state/groups/<group>.near.parquet``, with ``check_margins``):
#: candidates it predicts inside a hit window widened by the largest margin, but outside the window.
NEAR_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("repeat", pa.int32()),
        ("model", pa.string()),
        ("training_set", pa.string()),
        ("gap_window", pa.string()),
        ("reduced_formula", pa.string()),
        ("predicted_gap", pa.float64()),
    ]
)
#: Columns of a cached oracle part: the screened candidates in order, with the oracle's gap.
ORACLE_SCHEMA = pa.schema(
    [
        ("formula", pa.string()),
        ("reduced_formula", pa.string()),
        ("oracle_gap", pa.float64()),
        ("oracle_status", pa.string()),
    ]
)
_STATE_VERSION = 2  # 2: hits carry beyond_training

GroupCallback = Callable[[int, dict[str, float]], None]


class ScreeningError(ValueError):
    """Input the screening stage cannot use; the message names the file, row or field."""


# -- inputs ----------------------------------------------------------------------------------------


def read_training_sets(source: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The usable training rows and the rejected ones (source row number and reason).

    A row is rejected, never the whole table, when its experiment or training set is empty, its
    repeat is not an integer, its formula does not parse or its band gap is not a finite number.
    ``key`` (the canonical reduced formula) is added to the usable rows.
    """
    if isinstance(source, pd.DataFrame):
        frame, where = source.copy(), "training sets"
    else:
        path = Path(source)
        if not path.is_file():
            raise ScreeningError(f"{path}: no training-sets table")
        frame, where = pd.read_parquet(path), str(path)
    missing = [c for c in TRAINING_COLUMNS if c not in frame.columns]
    if missing:
        raise ScreeningError(f"{where}: missing column(s) {missing}; it has {list(frame.columns)}")
    frame = frame.reset_index(drop=True)
    reasons: list[str | None] = [None] * len(frame)
    keys: list[str | None] = [None] * len(frame)
    gaps = pd.to_numeric(frame["band_gap"], errors="coerce").to_numpy(dtype=float)
    repeats = pd.to_numeric(frame["repeat"], errors="coerce").to_numpy(dtype=float)
    for i, (exp, tset, text) in enumerate(
        zip(frame["experiment"], frame["training_set"], frame["reduced_formula"], strict=True)
    ):
        if not isinstance(exp, str) or not exp:
            reasons[i] = "experiment is empty"
        elif not isinstance(tset, str) or not tset:
            reasons[i] = "training_set is empty"
        elif not math.isfinite(repeats[i]) or repeats[i] != int(repeats[i]):
            reasons[i] = f"repeat {_shown(frame['repeat'].iat[i])} is not an integer"
        elif not math.isfinite(gaps[i]):
            reasons[i] = f"band_gap {_shown(frame['band_gap'].iat[i])} is not a finite number"
        else:
            try:
                keys[i] = formula_key(str(text)) if isinstance(text, str) else None
                if keys[i] is None:
                    reasons[i] = "reduced_formula is empty"
            except FormulaError as exc:
                reasons[i] = f"reduced_formula {text!r}: {exc}"
    bad = np.array([r is not None for r in reasons], dtype=bool)
    rejected = frame.loc[bad, ["experiment", "repeat", "training_set", "reduced_formula", "band_gap"]].copy()
    rejected.insert(0, "row", np.flatnonzero(bad))
    rejected["reason"] = [r for r in reasons if r is not None]
    good = frame.loc[~bad].copy()
    good["repeat"] = repeats[~bad].astype(np.int64)
    good["band_gap"] = gaps[~bad]
    good["key"] = [k for k, b in zip(keys, bad, strict=True) if not b]
    good["reduced_formula"] = good["reduced_formula"].astype(str)
    for _, row in rejected.head(5).iterrows():
        log.warning("%s row %d skipped: %s", where, row["row"], row["reason"])
    if len(rejected) > 5:
        log.warning("%s: %d rows skipped in all (see rejected_rows.csv)", where, len(rejected))
    return good.reset_index(drop=True), rejected.reset_index(drop=True)


def test_pool(prepared: str | os.PathLike | pd.DataFrame, training_keys: set[str]) -> pd.DataFrame:
    """The prepared 'test' split (key, formula, gap), in key order, with ``in_test``: False where the
    composition is in a training set. Every model predicts the whole pool; it is scored on ``in_test``."""
    data = prepared if isinstance(prepared, pd.DataFrame) else pd.read_parquet(prepared)
    missing = [c for c in ("reduced_formula", "band_gap", "split") if c not in data.columns]
    if missing:
        raise ScreeningError(f"prepared dataset lacks column(s) {missing}")
    pool = data.loc[data["split"] == "test", ["reduced_formula", "band_gap"]].copy()
    pool["key"] = [_safe_key(f) for f in pool["reduced_formula"]]
    pool = pool[pool["key"].notna() & np.isfinite(pool["band_gap"].to_numpy(dtype=float))]
    pool = pool.sort_values("key", kind="stable").reset_index(drop=True)
    pool["in_test"] = ~pool["key"].isin(training_keys)
    return pool


def external_test_set(prepared: str | os.PathLike | pd.DataFrame, training_keys: set[str]) -> pd.DataFrame:
    """The prepared 'test' split without any composition present in a training set (key, formula, gap)."""
    return _scored_rows(test_pool(prepared, training_keys))


def _scored_rows(pool: pd.DataFrame) -> pd.DataFrame:
    """The rows of a test pool that models are scored on; ``attrs['removed_overlap']`` counts the others."""
    test = pool.loc[pool["in_test"], ["reduced_formula", "band_gap", "key"]].reset_index(drop=True)
    test.attrs["removed_overlap"] = int((~pool["in_test"]).sum())
    return test


def _shown(value: Any) -> str:
    """A cell value for an error message: strings quoted, numbers plain."""
    return repr(value) if isinstance(value, str) else str(value)


def _safe_key(text: Any) -> str | None:
    try:
        return formula_key(str(text))
    except FormulaError:
        return None


# -- fingerprints ------------------------------------------------------------------------------------


def _hash_file(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def _hash_path(path: Path) -> str:
    """sha256 over a file, or over every file (relative name and bytes) of a folder."""
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
    else:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode())
            _hash_file(file, digest)
    return digest.hexdigest()


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# -- the oracle's screening (cached) -------------------------------------------------------------------


def _candidate_batches(path: Path, cfg: ScreeningConfig) -> Iterator[pa.Table]:
    """Filtered candidate chunks (formula, reduced_formula) of at most ``chunk_size`` rows, in file order."""
    file = pq.ParquetFile(path)
    names = set(file.schema_arrow.names)
    if "formula" not in names:
        raise ScreeningError(f"{path}: the candidate table has no 'formula' column; it has {sorted(names)}")
    columns = ["formula"] + [c for c in ("reduced_formula", "valid", "novel") if c in names]
    for flag, column in ((cfg.valid_only, "valid"), (cfg.novel_only, "novel")):
        if flag and column not in names:
            raise ScreeningError(
                f"{path}: screening.{column}_only is set but the table has no {column!r} column"
            )
    left = cfg.max_candidates
    pending: list[pa.Table] = []
    n_pending = 0
    for batch in file.iter_batches(batch_size=cfg.chunk_size, columns=columns):
        table = pa.Table.from_batches([batch])
        keep = pc.is_valid(table["formula"])
        if cfg.valid_only:
            keep = pc.and_(keep, pc.fill_null(table["valid"], False))
        if cfg.novel_only:
            keep = pc.and_(keep, pc.fill_null(table["novel"], False))
        table = table.filter(keep)
        if "reduced_formula" not in table.column_names:
            table = table.append_column(
                "reduced_formula", pa.array([_safe_key(f) for f in table["formula"].to_pylist()], pa.string())
            )
        table = table.select(["formula", "reduced_formula"])
        if left is not None:
            table = table.slice(0, left)
            left -= len(table)
        pending.append(table)
        n_pending += len(table)
        # filtered batches are regrouped into full chunks so the part layout depends on the data only
        while n_pending >= cfg.chunk_size:
            merged = pa.concat_tables(pending).combine_chunks()
            yield merged.slice(0, cfg.chunk_size)
            rest = merged.slice(cfg.chunk_size)
            pending, n_pending = [rest], len(rest)
        if left is not None and left <= 0:
            break
    if n_pending:
        yield pa.concat_tables(pending).combine_chunks()


@dataclass
class OracleScreen:
    """The oracle's labels of the screened candidates: ordered parquet parts and their fingerprint."""

    folder: Path
    parts: list[Path]
    fingerprint: str
    n_screened: int
    n_unlabelled: int
    oracle_name: str
    #: a hash of the labels themselves (formula, gap, status of every candidate): what the groups depend on,
    #: so an oracle folder that changes without changing a label (a retrain with the same seeds, a
    #: timing file) keeps every stored group
    labels_hash: str = ""
    #: the key this labelling had before it was keyed by the oracle's files (the hash of its whole folder)
    folder_key: str = ""

    def gaps(self) -> np.ndarray:
        """All oracle gaps, in candidate order (one float per candidate)."""
        if not self.parts:
            return np.zeros(0)
        return np.concatenate(
            [pq.read_table(p, columns=["oracle_gap"])["oracle_gap"].to_numpy() for p in self.parts]
        )

    def labels(self) -> pd.Series:
        """The oracle's gap of each screened candidate (NaN where unlabelled), indexed by reduced formula."""
        if not self.parts:
            return pd.Series(np.zeros(0), index=pd.Index([], dtype=object, name="reduced_formula"))
        tables = [pq.read_table(p, columns=["reduced_formula", "oracle_gap"]) for p in self.parts]
        table = pa.concat_tables(tables)
        return pd.Series(
            table["oracle_gap"].to_numpy(),
            index=pd.Index(table["reduced_formula"].to_pylist(), name="reduced_formula"),
            name="oracle_gap",
        )


def oracle_screen(
    candidates: str | os.PathLike,
    oracle_dir: str | os.PathLike,
    state_dir: str | os.PathLike,
    cfg: ScreeningConfig,
    progress: bool = True,
) -> OracleScreen:
    """Label the screened candidates with the oracle once, chunk by chunk, cached and resumable."""
    from agd.models.oracle import load_oracle

    candidates, oracle_dir = Path(candidates), Path(oracle_dir)
    if not candidates.is_file():
        raise ScreeningError(f"{candidates}: no candidate table")
    if not oracle_dir.is_dir():
        raise ScreeningError(f"{oracle_dir}: no oracle folder")
    from agd.models.oracle import oracle_files

    selection = {k: getattr(cfg, k) for k in ("valid_only", "novel_only", "max_candidates", "chunk_size")}
    key = {"version": _STATE_VERSION, "candidates": _hash_path(candidates), "selection": selection}
    # the labelling is cached under the files the oracle is loaded from; groups stored before their key
    # held the labels' hash were keyed with the hash of the whole folder (``folder_key``)
    files = {p.relative_to(oracle_dir).as_posix(): _hash_path(p) for p in oracle_files(oracle_dir)}
    fingerprint = _hash_json(key | {"oracle_files": files})[:16]
    folder_key = _hash_json(key | {"oracle": _hash_path(oracle_dir)})[:16]
    root = Path(state_dir) / "oracle"
    folder = root / fingerprint
    done = folder / "complete.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        parts = [folder / name for name in meta["parts"]]
        if all(p.is_file() for p in parts):
            log.info("oracle screening reused from %s", folder)
            if "labels_hash" not in meta:  # stored before the labels were hashed
                meta["labels_hash"] = _labels_hash(parts)
                _write_json(done, meta)
            return OracleScreen(
                folder, parts, fingerprint, meta["n_screened"], meta["n_unlabelled"], meta["oracle"],
                meta["labels_hash"], folder_key,
            )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    oracle = None
    parts: list[Path] = []
    n_screened = n_unlabelled = 0
    bar = tqdm(desc="oracle screening", unit="formula", disable=not progress)
    for i, chunk in enumerate(_candidate_batches(candidates, cfg)):
        part = folder / f"part-{i:05d}.parquet"
        if part.is_file():  # a finished chunk of a killed run
            done_part = pq.read_table(part)
        else:
            if oracle is None:
                oracle = load_oracle(oracle_dir)
            labels = oracle.label(chunk["formula"].to_pylist())
            done_part = pa.table(
                {
                    "formula": chunk["formula"],
                    "reduced_formula": chunk["reduced_formula"],
                    "oracle_gap": pa.array(labels.gaps, pa.float64()),
                    "oracle_status": pa.array(labels.status, pa.string()),
                },
                schema=ORACLE_SCHEMA,
            )
            tmp = part.with_name(f".{part.name}.tmp")
            pq.write_table(done_part, tmp)
            tmp.replace(part)
        parts.append(part)
        n_screened += len(done_part)
        n_unlabelled += int(pc.sum(pc.not_equal(done_part["oracle_status"], "ok")).as_py() or 0)
        bar.update(len(done_part))
    bar.close()
    name = getattr(oracle, "name", None) or _oracle_name(oracle_dir)
    meta = {
        "parts": [p.name for p in parts],
        "n_screened": n_screened,
        "n_unlabelled": n_unlabelled,
        "oracle": name,
        "labels_hash": _labels_hash(parts),
    }
    _write_json(done, meta)
    for other in root.iterdir():  # screenings of other candidates or oracles are stale now
        if other.is_dir() and other != folder:
            shutil.rmtree(other, ignore_errors=True)
    return OracleScreen(
        folder, parts, fingerprint, n_screened, n_unlabelled, name, meta["labels_hash"], folder_key
    )


def _labels_hash(parts: list[Path]) -> str:
    """sha256 of every candidate's formula, oracle gap (its float64 bytes) and status, in order."""
    digest = hashlib.sha256()
    for part in parts:
        table = pq.read_table(part, columns=["formula", "oracle_gap", "oracle_status"])
        digest.update("\n".join(table["formula"].to_pylist()).encode())
        digest.update(np.ascontiguousarray(table["oracle_gap"].to_numpy(), dtype="<f8").tobytes())
        digest.update("\n".join(table["oracle_status"].to_pylist()).encode())
    return digest.hexdigest()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def _oracle_name(oracle_dir: Path) -> str:
    meta = oracle_dir / "oracle.json"
    if meta.is_file():
        return str(json.loads(meta.read_text()).get("name", "oracle"))
    return "oracle"


# -- groups and models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One screening model: the training set of (experiment, repeat, training_set), and the model kind."""

    experiment: str
    repeat: int
    training_set: str
    model: str

    @property
    def name(self) -> str:
        """A file-name-safe identifier."""
        raw = f"{self.experiment}__r{self.repeat}__{self.training_set}__{self.model}"
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in raw)

    def seed(self, base: int) -> int:
        """Seed of the split and the model; the same for every model kind of a training set."""
        text = f"{base}/{self.experiment}/{self.repeat}/{self.training_set}"
        return zlib.crc32(text.encode()) & 0x7FFFFFFF


_ROOST_BATCH = 256  # formulas per Roost forward pass when screening (what RoostModel.predict uses)


@dataclass
class _ChunkInputs:
    """One candidate chunk, featurised lazily and at most once per representation."""

    formulas: list[str]
    cfg: ScreeningConfig
    _features: Any = None
    _encoded: Any = None
    _graphs: list[tuple[np.ndarray, Any]] | None = None
    _elements: tuple[list[str], np.ndarray] | None = None

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """Magpie features and the mask of featurised rows."""
        if self._features is None:
            from agd.chem.magpie import MagpieFeaturizer

            result = MagpieFeaturizer().featurize_formulas(self.formulas)
            self._features = (result.features, result.ok)
        return self._features

    def encoded(self) -> Any:
        """Roost graph arrays for every formula whose elements the embedding knows."""
        if self._encoded is None:
            from agd.models.roost import embedding_elements, encode_formulas

            self._encoded = encode_formulas(self.formulas, embedding_elements(self.cfg.roost.embedding))
        return self._encoded

    def graphs(self) -> list[tuple[np.ndarray, Any]]:
        """The encoded rows as Roost input batches ``(rows, tensors)`` on the CPU.

        Built once per chunk and fed to every member of every Roost screener in the pass: building a
        batch costs about half a member's forward pass, and a pass runs 8 screeners of k members each.
        """
        if self._graphs is None:
            from agd.models.roost import graph_batch

            enc = self.encoded()
            rows = np.flatnonzero(enc.ok)
            self._graphs = [
                (rows[first : first + _ROOST_BATCH], graph_batch(enc, rows[first : first + _ROOST_BATCH]))
                for first in range(0, len(rows), _ROOST_BATCH)
            ]
        return self._graphs

    def known_mask(self, known: frozenset[str]) -> np.ndarray:
        """Rows whose elements are all in ``known``."""
        if self._elements is None:
            symbols: dict[str, int] = {}
            rows, cols = [], []
            for i, text in enumerate(self.formulas):
                try:
                    elements = parse_formula(text)
                except FormulaError:
                    elements = {"?": 1}
                for el in elements:
                    rows.append(i)
                    cols.append(symbols.setdefault(el, len(symbols)))
            presence = np.zeros((len(self.formulas), max(len(symbols), 1)), dtype=bool)
            presence[rows, cols] = True
            self._elements = (list(symbols), presence)
        symbols, presence = self._elements
        unknown = np.array([el not in known for el in symbols] + [False] * (presence.shape[1] - len(symbols)))
        return ~presence[:, unknown].any(axis=1)


@dataclass
class _Screener:
    """A trained model and how it predicts a chunk."""

    kind: str
    model: Any
    elements: frozenset[str]
    cfg: ScreeningConfig
    label_range: tuple[float, float]  # lowest and highest band gap the model trained on

    def beyond(self, predicted: np.ndarray) -> np.ndarray:
        """Which predictions lie outside the training labels' range (extrapolations)."""
        low, high = self.label_range
        return (predicted < low) | (predicted > high)

    def predict(self, inputs: _ChunkInputs) -> np.ndarray:
        """Predicted gaps of a chunk; NaN where the model cannot (or, by config, may not) predict."""
        n = len(inputs.formulas)
        pred = np.full(n, np.nan)
        if self.kind == "forest":
            features, ok = inputs.features()
            rows = np.flatnonzero(ok)
            if len(rows):
                pred[rows] = self.model.forest.predict(features[rows])
        else:
            pred = np.mean(_roost_member_gaps(self.model.members, inputs), axis=0)
        if not self.cfg.predict_unknown_elements:
            pred[~inputs.known_mask(self.elements)] = np.nan
        return pred

    def predict_formulas(self, formulas: Sequence[str]) -> np.ndarray:
        """Predicted gaps of a list of formulas (hold-out and test rows)."""
        return self.predict(_ChunkInputs(list(formulas), self.cfg))


def _roost_member_gaps(members: Sequence[Any], inputs: _ChunkInputs) -> np.ndarray:
    """(members x formulas) gaps in eV, NaN where a formula cannot be encoded; each row equals
    ``member.predict_encoded(inputs.encoded())[0]`` (same batches, same forward), on shared batches."""
    import torch

    from agd.models.roost import roost_forward

    gaps = np.full((len(members), len(inputs.formulas)), np.nan)
    threads = members[0].config.num_threads if members else None
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            for j, member in enumerate(members):
                member.net.eval()
                device = next(member.net.parameters()).device
                for rows, batch in inputs.graphs():
                    if device.type != "cpu":
                        batch = tuple(t.to(device) for t in batch)
                    out = roost_forward(member.net, batch).double().cpu().numpy()
                    gaps[j, rows] = out[:, 0] * member.std + member.mean
    finally:
        torch.set_num_threads(before)
    return gaps


def _train_screener(
    kind: str, formulas: list[str], gaps: np.ndarray, cfg: ScreeningConfig, seed: int, progress: bool
) -> _Screener:
    label_range = (float(np.min(gaps)), float(np.max(gaps)))
    if kind == "forest":
        from agd.models.forest import train_forest

        model = train_forest(formulas, gaps, cfg.forest, seed)
        return _Screener(kind, model, model.elements, cfg, label_range)
    from agd.models.roost import train_ensemble

    model = train_ensemble(formulas, gaps, None, None, cfg.roost, seed, progress=progress)
    return _Screener(kind, model, model.elements, cfg, label_range)


def _usable_for(kind: str, formulas: Sequence[str], cfg: ScreeningConfig) -> np.ndarray:
    """Rows a model kind can train on: Roost needs every element in its embedding."""
    if kind != "roost":
        return np.ones(len(formulas), dtype=bool)
    from agd.models.roost import embedding_elements

    known = embedding_elements(cfg.roost.embedding)
    return np.array([all(el in known for el in parse_formula(f)) for f in formulas], dtype=bool)


def _regression(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from agd.models.oracle import regression_metrics

    if len(y) == 0:
        return {"n": 0, "r2": math.nan, "mae": math.nan, "rmse": math.nan}
    return regression_metrics(y, pred)


@dataclass
class _Prepared:
    """A trained group waiting for its pass over the candidates."""

    group: Group
    screener: _Screener
    fingerprint: str
    info: dict[str, Any]
    test_predictions: np.ndarray  # the screener's gaps for every row of the test pool, in pool order
    n_candidates: dict[str, int] = field(default_factory=dict)
    n_recovered: dict[str, int] = field(default_factory=dict)
    n_unpredicted: int = 0
    hits: list[pa.Table] = field(default_factory=list)
    near: list[pa.Table] = field(default_factory=list)


def _prepare_group(
    group: Group,
    rows: pd.DataFrame,
    test: pd.DataFrame,
    fingerprint: str,
    cfg: ScreeningConfig,
    progress: bool,
) -> _Prepared:
    """Split, train, score on the hold-out and the external test set.

    ``test`` is the pool of :func:`test_pool` (or any frame of test rows: without ``in_test``, all
    are scored). The screener predicts every pool row, so a later test set, a subset of the same
    pool, can be scored from the stored predictions alone.
    """
    # a composition listed twice (e.g. a data row and an oracle row) could sit on both sides of the split
    unique = rows.drop_duplicates("key", keep="first")
    duplicates = len(rows) - len(unique)
    rows = unique
    usable = _usable_for(group.model, rows["reduced_formula"].tolist(), cfg)
    dropped = int((~usable).sum())
    rows = rows.loc[usable].reset_index(drop=True)
    n = len(rows)
    if n < 2:
        raise ScreeningError(f"{group.name}: {n} usable training row(s); a model needs at least 2")
    seed = group.seed(cfg.seed)
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(max(int(round(cfg.holdout_fraction * n)), 1), n - 1)
    hold, train = order[:n_hold], order[n_hold:]
    formulas = rows["reduced_formula"].tolist()
    gaps = rows["band_gap"].to_numpy(dtype=float)
    start = time.perf_counter()
    model = _train_screener(group.model, [formulas[i] for i in train], gaps[train], cfg, seed, progress)
    holdout = _regression(gaps[hold], model.predict_formulas([formulas[i] for i in hold]))
    screener = model
    if cfg.refit_all:
        screener = _train_screener(group.model, formulas, gaps, cfg, seed, progress)
    predicted = screener.predict_formulas(test["reduced_formula"].tolist())
    scored = test["in_test"].to_numpy(dtype=bool) if "in_test" in test else np.ones(len(test), dtype=bool)
    test_scores = _regression(test["band_gap"].to_numpy(dtype=float)[scored], predicted[scored])
    info = {
        "n_train": int(len(train)),
        "n_holdout": int(n_hold),
        "n_dropped": dropped,
        "n_duplicates": duplicates,
        "train_seconds": time.perf_counter() - start,
        **{f"{k}_holdout": holdout[k] for k in ("r2", "mae", "rmse")},
        **{f"{k}_test": test_scores[k] for k in ("r2", "mae", "rmse")},
        "n_test": int(test_scores["n"]),
    }
    return _Prepared(group, screener, fingerprint, info, predicted)


def _prepare_item(
    item: tuple[Group, pd.DataFrame, str], test: pd.DataFrame, cfg: ScreeningConfig
) -> _Prepared:
    """``_prepare_group`` of one (group, rows, fingerprint) item: what a worker process or Ray task runs."""
    group, rows, fingerprint = item
    return _prepare_group(group, rows, test, fingerprint, cfg, progress=False)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _train_pass(
    items: Sequence[tuple[Group, pd.DataFrame, str]],
    test: pd.DataFrame,
    cfg: ScreeningConfig,
    progress: bool,
    desc: str,
    executor: Executor | None,
    pool: Any = None,
) -> list[_Prepared]:
    """Train and score a pass's groups: in this process, in a process ``pool``, or as Ray tasks.

    Each group's split and model are seeded by the group alone, so every way gives the same models.
    """
    if not is_local(executor):
        return executor.map(_prepare_item, items, test, cfg, progress=progress, desc=desc)
    if pool is None or len(items) <= 1:
        return [
            _prepare_group(group, rows, test, fingerprint, cfg, progress)
            for group, rows, fingerprint in tqdm(items, desc=desc, disable=not progress)
        ]
    from itertools import repeat

    results = pool.map(_prepare_item, items, repeat(test), repeat(cfg))  # in input order
    return list(tqdm(results, total=len(items), desc=desc, disable=not progress))


def _worker_pool(jobs: int, executor: Executor | None) -> Any:
    """A pool of ``jobs`` spawned one-thread processes for the whole stage, or None (work in this process)."""
    if jobs <= 1 or not is_local(executor):
        return None
    from agd.executors import spawn_pool

    return spawn_pool(jobs, initializer=_one_thread)


def _screen_pass(
    prepared: list[_Prepared],
    screen: OracleScreen,
    cfg: ScreeningConfig,
    progress: bool,
    desc: str,
    executor: Executor | None = None,
    pool: Any = None,
) -> None:
    """Stream the cached candidates once; every model predicts every chunk; counts and hits accumulate.

    Each cached part can be screened apart from the others: in a process ``pool`` (``screen_jobs``)
    or as a Ray task (the pass's screeners go to the object store once). The results are merged in
    part order, so counts and hit tables are those of the loop in this process.
    """
    for item in prepared:
        item.n_candidates = dict.fromkeys(cfg.windows, 0)
        item.n_recovered = dict.fromkeys(cfg.windows, 0)
    screeners = [(item.group, item.screener) for item in prepared]
    parts = [str(p.resolve()) for p in screen.parts]  # a Ray worker's working directory is not ours
    if not is_local(executor):
        results = executor.map(_screen_part_file, parts, screeners, cfg, progress=progress, desc=desc)
    elif pool is not None and len(parts) > 1:
        from itertools import repeat

        results = pool.map(_screen_part_file, parts, repeat(screeners), repeat(cfg))  # in part order
    else:
        results = (_screen_part_file(part, screeners, cfg) for part in parts)
    for result in tqdm(results, total=len(parts), desc=desc, unit="chunk", disable=not progress):
        _merge_part(prepared, result)


@dataclass
class _PartResult:
    """What one model found in one candidate part."""

    n_candidates: dict[str, int]
    n_recovered: dict[str, int]
    n_unpredicted: int
    hits: list[pa.Table]
    near: list[pa.Table] = field(default_factory=list)


def _screen_part(
    chunk: pa.Table, screeners: Sequence[tuple[Group, _Screener]], cfg: ScreeningConfig
) -> list[_PartResult]:
    """Every screener's window counts, unpredicted rows and hits on one oracle-labelled part."""
    windows = cfg.windows
    hit_windows = list(windows) if cfg.hit_windows is None else list(cfg.hit_windows)
    oracle_gap = chunk["oracle_gap"].to_numpy(zero_copy_only=False)
    in_oracle = {name: window_mask(oracle_gap, window) for name, window in windows.items()}
    inputs = _ChunkInputs(chunk["formula"].to_pylist(), cfg)
    results = []
    for group, screener in screeners:
        pred = screener.predict(inputs)
        found = _PartResult(
            dict.fromkeys(windows, 0), dict.fromkeys(windows, 0), int(np.isnan(pred).sum()), []
        )
        for name, window in windows.items():
            mask = window_mask(pred, window)
            found.n_candidates[name] = int(mask.sum())
            found.n_recovered[name] = int((mask & in_oracle[name]).sum())
            if name in hit_windows and mask.any():
                idx = np.flatnonzero(mask)
                found.hits.append(
                    _hit_table(group, name, chunk.take(pa.array(idx)), pred[idx], screener.beyond(pred[idx]))
                )
            if name in hit_windows and cfg.check_margins:
                near = window_mask(pred, widen_window(window, max(cfg.check_margins))) & ~mask
                if near.any():
                    idx = np.flatnonzero(near)
                    found.near.append(
                        _near_table(group, name, chunk["reduced_formula"].take(pa.array(idx)), pred[idx])
                    )
        results.append(found)
    return results


def _screen_part_file(
    part: str, screeners: Sequence[tuple[Group, _Screener]], cfg: ScreeningConfig
) -> list[_PartResult]:
    """``_screen_part`` of a cached part file (what a Ray task runs)."""
    return _screen_part(pq.read_table(part), screeners, cfg)


def _merge_part(prepared: Sequence[_Prepared], results: Sequence[_PartResult]) -> None:
    for item, found in zip(prepared, results, strict=True):
        item.n_unpredicted += found.n_unpredicted
        for name in item.n_candidates:
            item.n_candidates[name] += found.n_candidates[name]
            item.n_recovered[name] += found.n_recovered[name]
        item.hits.extend(found.hits)
        item.near.extend(found.near)


def _group_columns(group: Group, window: str, n: int) -> dict[str, pa.Array]:
    """The columns that say which screener and window ``n`` rows of a hits or near-miss table belong to."""
    return {
        "experiment": pa.array([group.experiment] * n, pa.string()),
        "repeat": pa.array(np.full(n, group.repeat, dtype=np.int32)),
        "model": pa.array([group.model] * n, pa.string()),
        "training_set": pa.array([group.training_set] * n, pa.string()),
        "gap_window": pa.array([window] * n, pa.string()),
    }


def _hit_table(
    group: Group, window: str, rows: pa.Table, predicted: np.ndarray, beyond: np.ndarray
) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            **_group_columns(group, window, n),
            "formula": rows["formula"],
            "reduced_formula": rows["reduced_formula"],
            "predicted_gap": pa.array(predicted, pa.float64()),
            "oracle_gap": rows["oracle_gap"],
            "beyond_training": pa.array(beyond, pa.bool_()),
        },
        schema=HITS_SCHEMA,
    )


def _near_table(group: Group, window: str, formulas: pa.Array, predicted: np.ndarray) -> pa.Table:
    n = len(formulas)
    return pa.table(
        {
            **_group_columns(group, window, n),
            "reduced_formula": formulas,
            "predicted_gap": pa.array(predicted, pa.float64()),
        },
        schema=NEAR_SCHEMA,
    )


def _metric_rows(item: _Prepared, n_oracle: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for name in item.n_candidates:
        g, info = item.group, item.info
        rows.append(
            {
                "experiment": g.experiment,
                "repeat": g.repeat,
                "model": g.model,
                "training_set": g.training_set,
                "gap_window": name,
                "n_train": info["n_train"],
                **{
                    k: info[k]
                    for k in ("r2_holdout", "mae_holdout", "rmse_holdout", "r2_test", "mae_test", "rmse_test")
                },
                **counts_metrics(item.n_candidates[name], n_oracle[name], item.n_recovered[name]),
            }
        )
    return rows


def _store_group(
    state: Path,
    item: _Prepared,
    n_oracle: dict[str, int],
    model_fingerprint: str,
    pool: pd.DataFrame,
    check: bool = False,
) -> dict[str, Any]:
    """Write a finished group: hits (near-misses with ``check``) and test-pool predictions first, then the
    JSON that marks it complete."""
    state.mkdir(parents=True, exist_ok=True)
    hits = pa.concat_tables(item.hits) if item.hits else HITS_SCHEMA.empty_table()
    _write_parquet(hits, state / f"{item.group.name}.hits.parquet")
    near_path = state / f"{item.group.name}.near.parquet"
    if check:
        near = pa.concat_tables(item.near) if item.near else NEAR_SCHEMA.empty_table()
        _write_parquet(near, near_path)
    else:  # near-misses of an earlier model of this group would not be this model's
        near_path.unlink(missing_ok=True)
    predictions = pa.table(
        {"key": pa.array(pool["key"].tolist(), pa.string()), "predicted_gap": item.test_predictions}
    )
    _write_parquet(predictions, state / f"{item.group.name}.test.parquet")
    record = {
        "fingerprint": item.fingerprint,
        "model_fingerprint": model_fingerprint,
        "group": item.group.__dict__,
        "info": item.info | {"n_unpredicted": item.n_unpredicted},
        "rows": _metric_rows(item, n_oracle),
    }
    _write_record(state, item.group, record)
    return record


def _write_record(state: Path, group: Group, record: dict[str, Any]) -> None:
    json_path = state / f"{group.name}.json"
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(record), indent=1))
    tmp.replace(json_path)


def _load_group(state: Path, group: Group, check: bool = False) -> dict[str, Any] | None:
    """A stored group if it is complete (whatever inputs it was computed from; with ``check``, its
    near-misses too)."""
    json_path = state / f"{group.name}.json"
    if not json_path.is_file() or not (state / f"{group.name}.hits.parquet").is_file():
        return None
    if check and not (state / f"{group.name}.near.parquet").is_file():
        return None
    try:
        return json.loads(json_path.read_text())
    except json.JSONDecodeError:
        return None


def _adopt_legacy(
    state: Path, group: Group, record: dict[str, Any], fingerprints: tuple[str, str], args: tuple
) -> dict[str, Any]:
    """A group stored under the folder-hash key of the oracle whose labels are the current ones: the
    same group, stored again under the labels' key (either fingerprint that matches is carried over)."""
    legacy = _group_fingerprints(*args, legacy=True)
    if record.get("model_fingerprint") != legacy[1]:
        return record
    record = record | {"model_fingerprint": fingerprints[1]}
    if record.get("fingerprint") == legacy[0]:
        record["fingerprint"] = fingerprints[0]
    _write_record(state, group, record)
    return record


def _rescore_group(
    state: Path,
    group: Group,
    record: dict[str, Any],
    fingerprints: tuple[str, str],
    test: pd.DataFrame,
) -> dict[str, Any] | None:
    """A stored group whose model is current but whose test set changed, scored on the new test set
    from its stored predictions (and stored so); None when it must be trained again.

    Records written before the predictions were stored, and those whose predictions miss a row of the
    new test set (a changed prepared split), cannot be rescored.
    """
    full, model = fingerprints
    path = state / f"{group.name}.test.parquet"
    if record.get("model_fingerprint") != model or not path.is_file():
        return None
    stored = pq.read_table(path).to_pandas()
    predicted = pd.Series(stored["predicted_gap"].to_numpy(dtype=float), index=stored["key"])
    predicted = predicted[~predicted.index.duplicated()]
    if not test["key"].isin(predicted.index).all():
        return None
    scores = _regression(
        test["band_gap"].to_numpy(dtype=float), predicted.loc[test["key"]].to_numpy(dtype=float)
    )
    renamed = {f"{k}_test": scores[k] for k in ("r2", "mae", "rmse")}
    record = record | {"fingerprint": full, "info": record["info"] | renamed | {"n_test": int(scores["n"])}}
    record["rows"] = [row | renamed for row in record["rows"]]
    _write_record(state, group, record)
    return record


def _report_group(on_group: GroupCallback | None, group: Group, record: dict[str, Any]) -> None:
    """Hand a finished group's numbers to the callback (keys like ``Exp2.AL.forest.gt6.recovery``)."""
    if on_group is None:
        return
    values = {}
    for row in record["rows"]:
        prefix = f"{group.experiment}.{group.training_set}.{group.model}.{row['gap_window']}"
        for key in ("n_candidates", "n_recovered", "recovery", "precision", "f1", "r2_test"):
            value = row[key]
            if isinstance(value, int | float) and math.isfinite(value):
                values[f"{prefix}.{key}"] = value
    on_group(group.repeat, values)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _from_json(value: Any) -> float:
    return math.nan if value is None else value


# -- the stage -----------------------------------------------------------------------------------------------


def plan_groups(training: pd.DataFrame, cfg: ScreeningConfig) -> list[Group]:
    """Every (experiment, repeat, training_set) x model, in a fixed order."""
    keys = training[["experiment", "repeat", "training_set"]].drop_duplicates()
    keys = keys.sort_values(["experiment", "repeat", "training_set"], kind="stable")
    groups = []
    for e, r, t in keys.itertuples(index=False):
        for model in cfg.models:
            limit = cfg.limits.get(model)
            if limit is not None and limit.repeats is not None and int(r) >= limit.repeats:
                continue
            if limit is not None and limit.training_sets is not None and str(t) not in limit.training_sets:
                continue
            groups.append(Group(str(e), int(r), str(t), model))
    return groups


def _group_fingerprints(
    group: Group,
    rows: pd.DataFrame,
    cfg: ScreeningConfig,
    screen: OracleScreen,
    test_hash: str,
    legacy: bool = False,
) -> tuple[str, str]:
    """(everything the group's figures depend on, everything its model and hits depend on): the
    second leaves out the test set. The oracle enters through its labels (``legacy``: through the
    hash of its folder, as groups stored before the labels were hashed were keyed)."""
    data = hashlib.sha256()
    ordered = rows.sort_values(["key", "band_gap"], kind="stable")
    for key, text, gap in zip(ordered["key"], ordered["reduced_formula"], ordered["band_gap"], strict=True):
        data.update(f"{key}|{text}|{gap!r}\n".encode())
    settings = cfg.model_dump(
        include={
            "seed",
            "holdout_fraction",
            "refit_all",
            "windows",
            "hit_windows",
            "predict_unknown_elements",
        }
    )
    settings["model"] = getattr(cfg, group.model).model_dump()
    if cfg.check_margins:  # only when set, so the groups stored before the option existed stay valid
        settings["check_margins"] = sorted(cfg.check_margins)
    model = {
        "version": _STATE_VERSION,
        "group": group.__dict__,
        "rows": data.hexdigest(),
        "settings": settings,
        "oracle": screen.folder_key if legacy else {"labels": screen.labels_hash},
    }
    return _hash_json(model | {"test": test_hash}), _hash_json(model)


def run_screening_stage(
    training_sets: str | os.PathLike | pd.DataFrame,
    candidates: str | os.PathLike,
    prepared: str | os.PathLike | pd.DataFrame,
    oracle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: ScreeningConfig,
    progress: bool = True,
    report: str | os.PathLike | None = None,
    on_group: GroupCallback | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Train, score and screen every group (resumably); write the tables and Table 1; return the summary.

    ``report`` is where the markdown Table 1 goes (default ``out_dir/table1.md``). ``on_group(repeat,
    metrics)`` is called once per group, when it is found stored or has just finished, with keys like
    ``Exp2.AL.forest.gt6.recovery`` (an MLflow hook: ``step=repeat``). ``executor``: None or local
    screens in this process; a Ray executor screens each cached candidate part as one task (same tables).
    """
    out = Path(out_dir)
    state = out / "state"
    groups_state = state / "groups"
    out.mkdir(parents=True, exist_ok=True)
    training, rejected = read_training_sets(training_sets)
    if training.empty:
        raise ScreeningError(
            "no usable training rows" + (f" ({len(rejected)} rejected)" if len(rejected) else "")
        )
    rejected.to_csv(out / "rejected_rows.csv", index=False)
    pool = test_pool(prepared, set(training["key"]))
    test = _scored_rows(pool)
    if test.empty:
        raise ScreeningError(
            "the external test set is empty: every prepared 'test' composition is in a training set"
        )
    test_hash = _hash_json(list(zip(test["key"], test["band_gap"].round(12), strict=True)))
    screen = oracle_screen(candidates, oracle_dir, state, cfg, progress)
    oracle_gaps = screen.gaps()
    n_oracle = {name: int(window_mask(oracle_gaps, w).sum()) for name, w in cfg.windows.items()}
    del oracle_gaps

    groups = plan_groups(training, cfg)
    by_set = {k: g for k, g in training.groupby(["experiment", "repeat", "training_set"], sort=False)}
    records: dict[Group, dict[str, Any]] = {}
    fingerprints: dict[Group, tuple[str, str]] = {}
    todo: list[Group] = []
    rescored = 0
    for group in groups:
        rows = by_set[(group.experiment, group.repeat, group.training_set)]
        fingerprints[group] = _group_fingerprints(group, rows, cfg, screen, test_hash)
        record = _load_group(groups_state, group, check=bool(cfg.check_margins))
        if record is not None and record.get("fingerprint") != fingerprints[group][0]:
            record = _adopt_legacy(
                groups_state, group, record, fingerprints[group], (group, rows, cfg, screen, test_hash)
            )
        if record is not None and record.get("fingerprint") != fingerprints[group][0]:
            record = _rescore_group(groups_state, group, record, fingerprints[group], test)
            rescored += record is not None
        if record is None:
            todo.append(group)
        else:
            records[group] = record
            _report_group(on_group, group, record)
    log.info(
        "screening: %d groups, %d stored (%d of them rescored on a changed test set), %d to run",
        len(groups),
        len(records),
        rescored,
        len(todo),
    )
    n_passes = math.ceil(len(todo) / cfg.groups_per_pass)
    workers = _worker_pool(min(cfg.train_jobs, len(todo)), executor)
    screen_pool = _worker_pool(min(cfg.screen_jobs, len(screen.parts)) if todo else 1, executor)
    test_rows = pool[["reduced_formula", "band_gap", "in_test"]]  # what a worker needs of the pool
    with (
        workers if workers is not None else contextlib.nullcontext(),
        screen_pool if screen_pool is not None else contextlib.nullcontext(),
    ):
        for p in range(n_passes):
            batch = todo[p * cfg.groups_per_pass : (p + 1) * cfg.groups_per_pass]
            items = [
                (group, by_set[(group.experiment, group.repeat, group.training_set)], fingerprints[group][0])
                for group in batch
            ]
            ready = _train_pass(
                items, test_rows, cfg, progress, f"training pass {p + 1}/{n_passes}", executor, workers
            )
            _screen_pass(
                ready, screen, cfg, progress, f"screening pass {p + 1}/{n_passes}", executor, screen_pool
            )
            for item in ready:
                records[item.group] = _store_group(
                    groups_state, item, n_oracle, fingerprints[item.group][1], pool, bool(cfg.check_margins)
                )
                _report_group(on_group, item.group, records[item.group])
            del ready

    # stored groups that are not part of this plan would only confuse a later reader of the state
    wanted = {g.name for g in groups}
    for file in groups_state.glob("*") if groups_state.is_dir() else ():
        stem = file.name.removesuffix(".json")
        for suffix in (".hits.parquet", ".test.parquet", ".near.parquet"):
            stem = stem.removesuffix(suffix)
        if stem not in wanted and not file.name.startswith("."):
            file.unlink()

    metric_rows = [row for group in groups for row in records[group]["rows"]]
    for row in metric_rows:
        for key in (
            "r2_holdout",
            "mae_holdout",
            "rmse_holdout",
            "r2_test",
            "mae_test",
            "rmse_test",
            "recovery",
            "precision",
            "f1",
        ):
            row[key] = _from_json(row[key])
    metrics = pa.Table.from_pylist(metric_rows, schema=METRICS_SCHEMA)
    _write_parquet(metrics, out / "metrics.parquet")
    n_hits, n_beyond = _write_hits(groups, groups_state, out / "hits.parquet")

    frame = metrics.to_pandas()
    table = aggregate_table1(frame, windows=list(cfg.windows))
    judging = _judging(training, screen, out / "hits.parquet", cfg)
    kept = _labels_kept(frame, judging)
    _write_parquet(pa.Table.from_pandas(kept, preserve_index=False), out / "labels_kept.parquet")
    kept_table = aggregate_labels_kept(kept, windows=list(cfg.windows))
    kept_paired = paired_differences(kept)
    checked = _checked(frame, judging, groups, groups_state, cfg)
    domain = _domain(frame, judging, cfg)
    del judging
    _write_parquet(pa.Table.from_pandas(checked, preserve_index=False), out / "check.parquet")
    check_table = aggregate_check(checked, windows=list(cfg.windows))
    _write_parquet(pa.Table.from_pandas(domain, preserve_index=False), out / "domain.parquet")
    domain_table = aggregate_domain(domain, windows=list(cfg.windows))
    _write_parquet(pa.Table.from_pandas(table, preserve_index=False), out / "table1.parquet")
    sizes = training.groupby(["experiment", "training_set"])["repeat"].agg(["nunique", "size"])
    context = {
        "oracle (reference)": f"{screen.oracle_name}, labelled {screen.n_screened - screen.n_unlabelled:,} "
        f"of {screen.n_screened:,} screened candidates",
        "candidates": ("valid only" if cfg.valid_only else "all")
        + (", novel only" if cfg.novel_only else "")
        + (f", first {cfg.max_candidates:,}" if cfg.max_candidates else ""),
        "external test set": f"{len(test):,} compositions ({test.attrs['removed_overlap']:,} test rows dropped as "
        "they appear in a training set)",
        "training sets": "; ".join(
            f"{e} {t}: {int(r['nunique'])} repeat(s), {int(r['size']) / int(r['nunique']):.0f} rows each on average"
            for (e, t), r in sizes.iterrows()
        ),
        "hits beyond training": f"{n_beyond:,} of the {n_hits:,} stored hits predict a gap outside the range of "
        "labels their model trained on (column beyond_training: extrapolations, to be treated with care)",
        "models": ", ".join(cfg.models)
        + f" (trained on {100 * (1 - cfg.holdout_fraction):.0f}% of each set"
        + ("; screening with a refit on all rows)" if cfg.refit_all else ")"),
    }
    report_path = Path(report) if report is not None else out / "table1.md"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    paired = paired_differences(frame)
    report_path.write_text(
        table1_markdown(table, cfg.windows, n_oracle, context, paired=paired)
        + "".join(line + "\n" for line in labels_kept_markdown(kept_table, kept_paired))
        + "".join(line + "\n" for line in check_markdown(check_table))
        + "".join(line + "\n" for line in domain_markdown(domain_table))
    )

    summary = {
        "table1": table1_json(table),
        "paired": paired_json(paired),
        "labels_kept": {"table1": table1_json(kept_table), "paired": paired_json(kept_paired)},
        "check": check_json(check_table),
        "domain": domain_json(domain_table),
        "oracle": {
            "name": screen.oracle_name,
            "screened": screen.n_screened,
            "unlabelled": screen.n_unlabelled,
            "hits": n_oracle,
            "windows": {name: describe_window(w) for name, w in cfg.windows.items()},
        },
        "test_set": {"rows": len(test), "removed_overlap": test.attrs["removed_overlap"]},
        "groups": len(groups),
        "training_rows": len(training),
        "rejected_training_rows": len(rejected),
        "hits": n_hits,
        "hits_beyond_training": n_beyond,
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2))
    return _json_safe(summary)


@dataclass
class _Judging:
    """What the labels-kept and check tables read, read once: the hit windows, the training sets' labels
    by canonical key, the oracle's label of each screened candidate, and the stored hits."""

    windows: dict[str, Any]
    sets: pd.DataFrame
    oracle: pd.Series
    hits: pd.DataFrame


def _judging(training: pd.DataFrame, screen: OracleScreen, hits_path: Path, cfg: ScreeningConfig) -> _Judging:
    names = cfg.hit_windows if cfg.hit_windows is not None else list(cfg.windows)
    sets = training[["experiment", "repeat", "training_set", "key", "band_gap"]]
    return _Judging(
        {name: cfg.windows[name] for name in names},
        sets.rename(columns={"key": "reduced_formula"}),
        screen.labels(),
        pd.read_parquet(hits_path, columns=[*SCREENER_KEYS, "reduced_formula", "predicted_gap"]),
    )


def _labels_kept(metrics: pd.DataFrame, judging: _Judging) -> pd.DataFrame:
    """Each screener of the hit windows judged with its training set's labels kept
    (:func:`~agd.screening.metrics.labels_kept_scores`)."""
    scores = labels_kept_scores(
        metrics, judging.hits, judging.sets, judging.oracle, judging.windows, strict=False
    )
    if scores.empty:
        return pd.DataFrame(columns=[*SCREENER_KEYS, *LABELS_KEPT_METRICS])
    return labels_kept_frame(scores)


def _checked(
    metrics: pd.DataFrame, judging: _Judging, groups: Sequence[Group], state: Path, cfg: ScreeningConfig
) -> pd.DataFrame:
    """Each screener of the hit windows after the oracle checks its calls in the widened windows
    (:func:`~agd.screening.metrics.check_scores`); an empty table when ``check_margins`` is off."""
    if not cfg.check_margins:
        return pd.DataFrame(columns=[*SCREENER_KEYS, "margin", *CHECK_METRICS])
    columns = list(judging.hits.columns)
    near = [pd.read_parquet(state / f"{g.name}.near.parquet", columns=columns) for g in groups]
    calls = pd.concat([judging.hits, *near], ignore_index=True)
    return check_scores(
        calls, metrics[[*SCREENER_KEYS]], judging.sets, judging.oracle, judging.windows, cfg.check_margins
    )


def _domain(metrics: pd.DataFrame, judging: _Judging, cfg: ScreeningConfig) -> pd.DataFrame:
    """Each screener of the hit windows without its calls outside its set's element domain
    (:func:`~agd.screening.metrics.domain_scores`); an empty table when ``domain_min_rows`` is off."""
    if not cfg.domain_min_rows:
        return pd.DataFrame(columns=[*SCREENER_KEYS, "min_rows", *DOMAIN_METRICS])
    return domain_scores(
        metrics, judging.hits, judging.sets, judging.oracle, judging.windows, cfg.domain_min_rows
    )


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _write_hits(groups: Sequence[Group], state: Path, path: Path) -> tuple[int, int]:
    """Concatenate the stored hits of ``groups`` in plan order, one group in memory at a time.

    Returns the number of hits and how many of them are predictions beyond the training labels.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    n = n_beyond = 0
    with pq.ParquetWriter(tmp, HITS_SCHEMA) as writer:
        for group in groups:
            table = pq.read_table(state / f"{group.name}.hits.parquet").cast(HITS_SCHEMA)
            if len(table):
                writer.write_table(table)
                n += len(table)
                n_beyond += int(pc.sum(table["beyond_training"]).as_py() or 0)
    tmp.replace(path)
    return n, n_beyond
