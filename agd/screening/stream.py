"""Screen a large candidate table with an already trained model, in bounded memory.

``agd screen-candidates CANDIDATES --model-dir models/oracle --out hits.parquet`` is the user-facing
tool: "which of my million generated formulas does the deployed forest (or Roost ensemble) put in a
band-gap window?". Unlike the ``agd screen`` stage it trains nothing and compares with nothing; it
only predicts and keeps the hits.

How memory stays bounded: the parquet file is read in pyarrow batches regrouped into chunks of
``chunk_size`` file rows; only one chunk's formulas exist as Python objects and only one chunk's
feature matrix (float32, as scikit-learn's trees compare float32 anyway) exists at a time. A chunk's
hits and rejected rows go to a part file as soon as it is done; at the end the parts are copied one
at a time into the output with a ``ParquetWriter``, so nothing ever holds all rows.

Resume and idempotence: the part files live in ``.<out>.parts/`` next to the output with a manifest
(a fingerprint of the candidate file, the model files, the windows and the selection). A killed run
continues at the first missing part; a changed input or setting discards the old parts. The output
and the rejected-row report are written to temporary names and renamed into place, so a rerun
replaces them atomically and always writes the same files.

A formula that cannot be screened (empty, unparsable, an element the model never saw) never stops the
run: it is listed with its file row number and the reason in ``<out stem>.rejected.csv`` and counted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from agd.chem.formula import FormulaError, formula_key, parse_formula
from agd.config import GapWindowConfig, ScreeningConfig
from agd.screening.metrics import describe_window, window_mask

ModelChoice = Literal["primary", "forest", "roost"]
MODEL_CHOICES: tuple[str, ...] = ("primary", "forest", "roost")

#: Columns of the hits table: one row per (candidate, window) hit; ``row`` is the candidate's file row.
HITS_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("formula", pa.string()),
        ("reduced_formula", pa.string()),
        ("gap_window", pa.string()),
        ("predicted_gap", pa.float64()),
        ("predicted_std", pa.float64()),
        ("model", pa.string()),
    ]
)
#: Columns of the rejected-row report.
REJECTED_COLUMNS = ("row", "formula", "reason")
_REJECTED_SCHEMA = pa.schema([("row", pa.int64()), ("formula", pa.string()), ("reason", pa.string())])
_STATS_KEY = b"agd_stream_chunk"
_STATE_VERSION = 1
PHASES = ("read", "featurise", "predict", "write")


class StreamError(ValueError):
    """Input the streaming screen cannot use; the message names the file, column or option."""


# -- models ------------------------------------------------------------------------------------------


@dataclass
class ScreeningModel:
    """A trained forest or Roost ensemble ready to screen chunks: featurise, then predict."""

    kind: Literal["forest", "roost"]
    name: str
    files: list[Path]
    model: Any
    n_jobs: int = 1
    _featurizer: Any = field(default=None, repr=False)

    def featurise(self, formulas: Sequence[str]) -> tuple[Any, dict[int, str]]:
        """Model inputs for a chunk and the reasons of the rows that cannot be predicted (row -> reason)."""
        if self.kind == "forest":
            return self._forest_inputs(formulas)
        from agd.models.roost import encode_formulas

        enc = encode_formulas(formulas, self.model.elements)
        reasons = {i: status for i, status in enumerate(enc.status) if status != "ok"}
        return enc, reasons

    def predict(self, inputs: Any, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Gaps and spreads (eV) of the ``n`` rows of a chunk; NaN where a row was refused."""
        if self.kind == "forest":
            ok_rows, features = inputs
            gaps, std = np.full(n, np.nan), np.full(n, np.nan)
            if len(ok_rows):
                gaps[ok_rows], std[ok_rows] = forest_mean_std(self.model.forest, features, self.n_jobs)
            return gaps, std
        members = np.stack([member.predict_encoded(inputs)[0] for member in self.model.members], axis=1)
        # the ensemble's mean and member spread, as RoostEnsemble.predict gives them
        return members.mean(axis=1), (members.std(axis=1) if members.shape[1] > 1 else None)

    def _forest_inputs(self, formulas: Sequence[str]) -> tuple[tuple[np.ndarray, np.ndarray], dict[int, str]]:
        from agd.chem.magpie import MagpieFeaturizer

        if self._featurizer is None:
            self._featurizer = MagpieFeaturizer()  # loads the element tables once per model
        known = self.model.elements
        reasons: dict[int, str] = {}
        counts: list[Mapping[str, int]] = []
        for i, text in enumerate(formulas):
            try:
                comp = parse_formula(text)
            except FormulaError as exc:
                reasons[i] = f"unparsable: {exc}"
                counts.append({})
                continue
            if not known.issuperset(comp):
                unknown = next(el for el in comp if el not in known)
                reasons[i] = f"element {unknown} unknown to the model"
                counts.append({})  # not featurised: the trees never saw this element
                continue
            counts.append(comp)
        result = self._featurizer.featurize_counts(counts)
        for err in result.errors:
            reasons.setdefault(err.row, err.reason)
        ok = np.ones(len(formulas), dtype=bool)
        ok[list(reasons)] = False
        ok_rows = np.flatnonzero(ok)
        # sklearn's trees cast to float32 before comparing with their thresholds: casting once here
        # gives the same predictions, halves the chunk's feature memory and skips 100 casts per chunk
        features = np.ascontiguousarray(result.features[ok_rows], dtype=np.float32)
        return (ok_rows, features), reasons


def forest_mean_std(forest: Any, features: np.ndarray, n_jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over a fitted forest's trees for float32 ``features``, in threads.

    Running sums replace the (trees x rows) matrix of per-tree predictions; tree prediction releases
    the GIL, so ``n_jobs`` threads share the trees.
    """
    trees = forest.estimators_
    features = np.ascontiguousarray(features, dtype=np.float32)

    def partial(indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        total = np.zeros(len(features))
        squares = np.zeros(len(features))
        for i in indices:
            pred = trees[i].predict(features, check_input=False)
            total += pred
            squares += pred * pred
        return total, squares

    jobs = max(1, min(n_jobs, len(trees)))
    if jobs == 1:
        total, squares = partial(range(len(trees)))
    else:
        groups = np.array_split(np.arange(len(trees)), jobs)
        with ThreadPoolExecutor(jobs) as pool:
            parts = list(pool.map(partial, groups))
        total = sum(p[0] for p in parts)
        squares = sum(p[1] for p in parts)
    mean = total / len(trees)
    return mean, np.sqrt(np.maximum(squares / len(trees) - mean * mean, 0.0))


def _resolve_jobs(n_jobs: int | None) -> int:
    if n_jobs is None or n_jobs == 0:
        return 1
    if n_jobs < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_jobs)  # joblib's convention: -1 = all cores
    return n_jobs


def load_screening_model(
    model_dir: str | os.PathLike, model: str = "primary", n_jobs: int | None = None, device: str = "cpu"
) -> ScreeningModel:
    """Open a trained model for screening: an oracle folder (``agd train oracle``), a Roost ensemble
    folder, a forest folder or a ``forest.joblib`` file.

    In an oracle folder ``model='primary'`` is the deployed model named by ``oracle.json``, and
    ``'forest'`` / ``'roost'`` pick that kind among the deployed models. ``n_jobs``: threads over the
    forest's trees (None: the forest's own ``n_jobs``; -1: all cores).
    """
    if model not in MODEL_CHOICES:
        raise StreamError(f"model must be one of {', '.join(MODEL_CHOICES)}, got {model!r}")
    path = Path(model_dir)
    if not path.exists():
        raise StreamError(f"{path}: no such model folder or file")
    kind, target, name = _locate(path, model)
    if kind == "forest":
        from agd.models.forest import ForestModel

        forest = ForestModel.load(target)
        jobs = _resolve_jobs(n_jobs if n_jobs is not None else forest.config.n_jobs)
        return ScreeningModel("forest", name, [target], forest, jobs)
    from agd.models.roost import RoostEnsemble

    ensemble = RoostEnsemble.load(target, device)
    files = [target / "ensemble.json", *sorted(target.glob("member_*.pt"))]
    return ScreeningModel("roost", name, files, ensemble, _resolve_jobs(n_jobs))


def _locate(path: Path, model: str) -> tuple[str, Path, str]:
    """(kind, path, name) of the requested model in a file or folder."""
    if path.is_file():
        if path.suffix != ".joblib":
            raise StreamError(f"{path}: a model file must be a forest .joblib; give a folder for Roost")
        if model == "roost":
            raise StreamError(f"{path} is a forest; --model roost needs a Roost ensemble folder")
        return "forest", path, "forest"
    meta_path = path / "oracle.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        deployed = {meta["kind"]: meta["path"], **meta.get("others", {})}
        kind = meta["kind"] if model == "primary" else model
        if kind not in deployed:
            raise StreamError(
                f"{path}: no deployed {kind} model; it has {', '.join(sorted(deployed))} (see oracle.json)"
            )
        if kind not in ("forest", "roost"):
            raise StreamError(f"{path}: the {kind!r} oracle is a lookup table, not a model that can screen")
        name = meta.get("name", kind) if kind == meta["kind"] else f"{kind}-{path.name}"
        return kind, path / deployed[kind], name
    found = {}
    if (path / "ensemble.json").is_file():
        found["roost"] = path
    if (path / "forest.joblib").is_file():
        found["forest"] = path / "forest.joblib"
    if not found:
        raise StreamError(f"{path}: no oracle.json, ensemble.json or forest.joblib")
    kind = next(iter(found)) if model == "primary" else model
    if kind not in found:
        raise StreamError(f"{path}: no {kind} model here; found {', '.join(sorted(found))}")
    return kind, found[kind], kind


# -- reading -----------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    index: int
    first_row: int
    rows: np.ndarray  # file row numbers of the selected rows
    formulas: list[str | None]
    reduced: list[str | None] | None
    n_file_rows: int


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise StreamError(f"{path}: not a readable parquet file ({exc})") from None


def _read_chunks(
    path: Path, chunk_size: int, formula_column: str, valid_only: bool, novel_only: bool
) -> Iterator[_Chunk]:
    """Chunks of ``chunk_size`` consecutive file rows, filtered; only one chunk is materialised at a time."""
    file = _open_parquet(path)
    names = file.schema_arrow.names
    if formula_column not in names:
        raise StreamError(f"{path}: no {formula_column!r} column; the columns are {', '.join(names)}")
    kind = file.schema_arrow.field(formula_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise StreamError(f"{path}: column {formula_column!r} holds {kind}, not formula text")
    columns = [formula_column]
    for flag, column in ((valid_only, "valid"), (novel_only, "novel")):
        if flag:
            if column not in names:
                raise StreamError(
                    f"{path}: {column}_only needs a {column!r} column; it has {', '.join(names)}"
                )
            columns.append(column)
    has_reduced = "reduced_formula" in names and formula_column != "reduced_formula"
    if has_reduced:
        columns.append("reduced_formula")

    def chunks() -> Iterator[_Chunk]:
        """The chunks, read lazily (the checks above run at once)."""
        pending: list[pa.RecordBatch] = []
        n_pending = 0
        index = 0
        first_row = 0

        def emit(table: pa.Table) -> _Chunk:
            n_file_rows = len(table)
            keep = pa.array(np.ones(len(table), dtype=bool))
            for flag, column in ((valid_only, "valid"), (novel_only, "novel")):
                if flag:
                    keep = pc.and_(keep, pc.fill_null(table[column], False))
            rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False)) + first_row
            table = table.filter(keep)
            return _Chunk(
                index,
                first_row,
                rows,
                table[formula_column].to_pylist(),
                table["reduced_formula"].to_pylist() if has_reduced else None,
                n_file_rows,
            )

        # batches are regrouped into fixed chunks of file rows, so chunk k always covers the same rows
        for batch in file.iter_batches(batch_size=chunk_size, columns=columns):
            pending.append(batch)
            n_pending += batch.num_rows
            while n_pending >= chunk_size:
                table = pa.Table.from_batches(pending).combine_chunks()
                yield emit(table.slice(0, chunk_size))
                rest = table.slice(chunk_size)
                pending, n_pending = rest.to_batches(), len(rest)
                index += 1
                first_row += chunk_size
        if n_pending:
            yield emit(pa.Table.from_batches(pending).combine_chunks())

    return chunks()


# -- the screen ----------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """What a streaming screen did: row counts, hits per window, rejected rows and time per phase."""

    out: Path
    rejected_path: Path
    model: str
    n_rows: int
    n_selected: int
    n_predicted: int
    n_rejected: int
    n_hits: int
    counts: dict[str, int]
    windows: dict[str, str]
    chunks: int
    chunks_resumed: int
    timings: dict[str, float] = field(default_factory=dict)
    rejected_examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as text)."""
        out = dict(self.__dict__)
        out["out"], out["rejected_path"] = str(self.out), str(self.rejected_path)
        return out


def default_windows() -> dict[str, GapWindowConfig]:
    """The screening windows of the default configuration (gt6: > 6 eV, 2-4: [2, 4] eV)."""
    return dict(ScreeningConfig().windows)


def rejected_path_for(out: str | os.PathLike) -> Path:
    """Where the rejected-row report of ``out`` goes: ``hits.parquet`` -> ``hits.rejected.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rejected.csv")


def _sha256(paths: Sequence[Path]) -> str:
    """sha256 over the files' names and bytes (the parts' fingerprint of inputs and model)."""
    from agd.screening.screen import _hash_file

    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        _hash_file(path, digest)
    return digest.hexdigest()


def _write_atomic(table: pa.Table, path: Path, stats: dict[str, Any] | None = None) -> None:
    if stats is not None:
        table = table.replace_schema_metadata({_STATS_KEY: json.dumps(stats).encode()})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _prepare_parts(parts: Path, manifest: dict[str, Any]) -> None:
    """Keep finished parts only when they were made from the same inputs and settings."""
    manifest_path = parts / "manifest.json"
    if parts.is_dir():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = None
        if old == manifest:
            return
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))


def _screen_chunk(
    chunk: _Chunk,
    model: ScreeningModel,
    windows: Mapping[str, GapWindowConfig],
    timings: dict[str, float],
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Featurise, predict and select one chunk: its hits, its rejected rows and its counts."""
    n = len(chunk.formulas)
    formulas = ["" if text is None else text for text in chunk.formulas]
    t0 = time.perf_counter()
    inputs, reasons = model.featurise(formulas)
    for i, text in enumerate(chunk.formulas):
        if text is None:
            reasons[i] = "no formula"
    t1 = time.perf_counter()
    gaps, std = model.predict(inputs, n)
    t2 = time.perf_counter()
    del inputs
    hit_tables = []
    counts = {}
    for name, window in windows.items():
        mask = window_mask(gaps, window)
        counts[name] = int(mask.sum())
        idx = np.flatnonzero(mask)
        if not len(idx):
            continue
        hit_formulas = [formulas[i] for i in idx]
        if chunk.reduced is not None:
            reduced = [chunk.reduced[i] for i in idx]
        else:
            reduced = [formula_key(text) for text in hit_formulas]  # hits parsed, so keys exist
        hit_tables.append(
            pa.table(
                {
                    "row": pa.array(chunk.rows[idx], pa.int64()),
                    "formula": pa.array(hit_formulas, pa.string()),
                    "reduced_formula": pa.array(reduced, pa.string()),
                    "gap_window": pa.array([name] * len(idx), pa.string()),
                    "predicted_gap": pa.array(gaps[idx], pa.float64()),
                    "predicted_std": pa.nulls(len(idx), pa.float64())
                    if std is None
                    else pa.array(std[idx], pa.float64()),
                    "model": pa.array([model.name] * len(idx), pa.string()),
                },
                schema=HITS_SCHEMA,
            )
        )
    hits = pa.concat_tables(hit_tables) if hit_tables else HITS_SCHEMA.empty_table()
    bad = sorted(reasons)
    rejected = pa.table(
        {
            "row": pa.array(chunk.rows[bad] if bad else [], pa.int64()),
            "formula": pa.array([chunk.formulas[i] for i in bad], pa.string()),
            "reason": pa.array([reasons[i] for i in bad], pa.string()),
        },
        schema=_REJECTED_SCHEMA,
    )
    stats = {
        "n_file_rows": chunk.n_file_rows,
        "n_selected": n,
        "n_predicted": int(np.isfinite(gaps).sum()),
        "n_rejected": len(bad),
        "counts": counts,
        "seconds": {"featurise": t1 - t0, "predict": t2 - t1},
    }
    timings["featurise"] += t1 - t0
    timings["predict"] += t2 - t1
    timings["write"] += time.perf_counter() - t2  # selecting the hits counts as writing them
    return hits, rejected, stats


def stream_screen(
    candidates: str | os.PathLike,
    model: ScreeningModel,
    out: str | os.PathLike,
    windows: Mapping[str, GapWindowConfig] | None = None,
    *,
    chunk_size: int = 50_000,
    valid_only: bool = False,
    novel_only: bool = False,
    formula_column: str = "formula",
    keep_parts: bool = False,
    progress: bool = True,
) -> StreamResult:
    """Screen every candidate of a parquet file chunk by chunk; write the hits of each window to ``out``.

    Returns counts per window, rows read, selected, predicted and rejected, and seconds per phase
    (read, featurise, predict, write = selecting and writing the hits; resumed chunks cost only their
    read). Rejected rows (file row, formula, reason) go to :func:`rejected_path_for` ``(out)``.
    Rerunning with the same inputs rewrites the same files; a killed run resumes at its first
    unfinished chunk.
    """
    start = time.perf_counter()
    candidates, out = Path(candidates), Path(out)
    if chunk_size < 1:
        raise StreamError(f"chunk_size must be positive, got {chunk_size}")
    if not candidates.is_file():
        raise StreamError(f"{candidates}: no candidate table")
    windows = dict(default_windows() if windows is None else windows)
    if not windows:
        raise StreamError("no band-gap window to screen for")
    n_file_rows = _open_parquet(candidates).metadata.num_rows
    rejected_out = rejected_path_for(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(f".{out.name}.parts")
    manifest = {
        "version": _STATE_VERSION,
        "candidates": _sha256([candidates]),
        "model": {"kind": model.kind, "name": model.name, "sha256": _sha256(model.files)},
        "windows": {k: w.model_dump() for k, w in windows.items()},
        "chunk_size": chunk_size,
        "valid_only": valid_only,
        "novel_only": novel_only,
        "formula_column": formula_column,
    }
    # the file's columns are checked before any state is touched
    chunks = _read_chunks(candidates, chunk_size, formula_column, valid_only, novel_only)
    _prepare_parts(parts, manifest)
    timings = dict.fromkeys(PHASES, 0.0)
    totals = {"n_rows": 0, "n_selected": 0, "n_predicted": 0, "n_rejected": 0}
    counts = dict.fromkeys(windows, 0)
    n_chunks = resumed = 0
    bar = tqdm(
        total=n_file_rows,
        desc=f"screen ({model.name})",
        unit="row",
        unit_scale=True,
        disable=not progress,
    )
    while True:
        t0 = time.perf_counter()
        chunk = next(chunks, None)
        timings["read"] += time.perf_counter() - t0
        if chunk is None:
            break
        part = parts / f"part-{chunk.index:05d}.parquet"
        if part.is_file():  # finished by an earlier (killed) run
            stats = json.loads(pq.read_schema(part).metadata[_STATS_KEY])
            resumed += 1
        else:
            hits, rejected, stats = _screen_chunk(chunk, model, windows, timings)
            t0 = time.perf_counter()
            # the rejected part first: a hits part on disk means the whole chunk is done
            _write_atomic(rejected, parts / f"rejected-{chunk.index:05d}.parquet")
            _write_atomic(hits, part, stats)
            timings["write"] += time.perf_counter() - t0
            del hits, rejected
        n_chunks += 1
        totals["n_rows"] += stats["n_file_rows"]
        for key in ("n_selected", "n_predicted", "n_rejected"):
            totals[key] += stats[key]
        for name in windows:
            counts[name] += stats["counts"][name]
        bar.update(chunk.n_file_rows)
        bar.set_postfix({name: f"{c:,}" for name, c in counts.items()}, refresh=False)
        del chunk
    bar.close()

    t0 = time.perf_counter()
    n_hits, examples = _assemble(parts, n_chunks, out, rejected_out)
    timings["write"] += time.perf_counter() - t0
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    timings["total"] = time.perf_counter() - start
    return StreamResult(
        out=out,
        rejected_path=rejected_out,
        model=model.name,
        **totals,
        n_hits=n_hits,
        counts=counts,
        windows={name: describe_window(w) for name, w in windows.items()},
        chunks=n_chunks,
        chunks_resumed=resumed,
        timings=timings,
        rejected_examples=examples,
    )


def _assemble(parts: Path, n_chunks: int, out: Path, rejected_out: Path) -> tuple[int, list[dict[str, Any]]]:
    """Copy the parts, one at a time, into the hits file and the rejected CSV; both renamed into place."""
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_rejected = rejected_out.with_name(f".{rejected_out.name}.tmp")
    n_hits = 0
    examples: list[dict[str, Any]] = []
    with pq.ParquetWriter(tmp_out, HITS_SCHEMA) as writer, tmp_rejected.open("w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(REJECTED_COLUMNS)
        for k in range(n_chunks):
            hits = pq.read_table(parts / f"part-{k:05d}.parquet").replace_schema_metadata(None)
            if len(hits):
                writer.write_table(hits.cast(HITS_SCHEMA))
                n_hits += len(hits)
            rejected = pq.read_table(parts / f"rejected-{k:05d}.parquet")
            for record in rejected.to_pylist():
                rows.writerow([record["row"], record["formula"], record["reason"]])
                if len(examples) < 5:
                    examples.append(record)
    os.replace(tmp_out, out)
    os.replace(tmp_rejected, rejected_out)
    return n_hits, examples
