"""DuckDB catalog over the pipeline's tables: schema, idempotent loads, read-only queries.

``SCHEMA_SQL`` is the one place the catalog's tables are defined; ``TABLES`` is read back from it by
DuckDB itself, so the two cannot drift. Every table carries two provenance columns filled by the
loader: ``source_file`` (the file, or label, the rows came from) and ``loaded_at`` (UTC time of the
load). A load is keyed (by default on ``source_file``): it deletes the rows matching its key and
inserts the new ones in one transaction, so running it twice leaves one copy.

The ``catalog`` stage owns ``agd.duckdb``: ``build_catalog`` writes a fresh database next to it and
renames it into place, so a crash never leaves a half-written catalog and a dashboard that holds the
old file open does not block the build. The dashboard reads through ``CatalogReader`` (read-only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import pandas as pd

from agd.config import DesignMapConfig

log = logging.getLogger(__name__)

BUILD_HINT = "build it with `agd catalog` (or `dvc repro pipelines/dvc.yaml`)"

#: Filled by the loader on every row; never taken from a source.
PROVENANCE_COLUMNS = ("source_file", "loaded_at")

SCHEMA_SQL = """
-- One row per prepared composition (output of the data stage).
CREATE TABLE IF NOT EXISTS datasets (
    dataset VARCHAR NOT NULL,                 -- dataset name, e.g. 'matbench_mp_gap'
    row BIGINT NOT NULL,                      -- row of the source table the composition came from
    material_id VARCHAR,                      -- Materials Project id, where the source has one
    formula VARCHAR NOT NULL,
    reduced_formula VARCHAR NOT NULL,         -- composition key for joins and de-duplication
    n_elements INTEGER,
    n_atoms INTEGER,                          -- atoms in the integer formula
    band_gap DOUBLE,                          -- eV
    formation_energy_per_atom DOUBLE,         -- eV/atom
    energy_above_hull DOUBLE,                 -- eV/atom
    split VARCHAR NOT NULL CHECK (split IN ('train', 'val', 'test')),
    n_merged INTEGER,                         -- source rows merged into this one by de-duplication
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL              -- UTC
);

-- Generated formulas (GAN samples, active-learning registrations, ...).
CREATE TABLE IF NOT EXISTS candidates (
    run_id VARCHAR NOT NULL,                  -- generator run that produced the formula
    formula VARCHAR NOT NULL,
    reduced_formula VARCHAR,
    n_elements INTEGER,
    n_atoms INTEGER,
    charge_neutral BOOLEAN,
    electronegativity_balanced BOOLEAN,
    valid BOOLEAN,                            -- charge neutral and electronegativity balanced
    novel BOOLEAN,                            -- reduced formula absent from the training data
    source VARCHAR NOT NULL,                  -- 'gan', 'active', ...
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

-- Active-learning suggestions: one row per suggested latent point, whatever became of it.
CREATE TABLE IF NOT EXISTS al_samples (
    campaign VARCHAR NOT NULL,                -- campaign run name
    experiment VARCHAR,                       -- 'Exp1'..'Exp4', 'random', ...
    repeat INTEGER NOT NULL,
    round INTEGER NOT NULL,
    idx INTEGER NOT NULL,                     -- position in the round's batch
    latent FLOAT[],                           -- suggested point in the autoencoder's latent box
    formula VARCHAR,                          -- NULL when the point does not decode to a formula
    valid BOOLEAN,
    fate VARCHAR,                             -- 'initial', 'registered', 'duplicate', 'undecodable', 'invalid', 'unlabelled'
    label DOUBLE,                             -- band gap (eV): data label for 'initial' rows, oracle label otherwise
    label_std DOUBLE,                         -- oracle spread (eV), where the oracle gives one
    acquisition DOUBLE,                       -- acquisition-function value at the point
    kappa DOUBLE,                             -- UCB exploration weight of the campaign
    method VARCHAR,                           -- 'bo' (Bayesian optimisation) or 'random' (control)
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

-- Screening hits: candidates a model places inside a band-gap window.
CREATE TABLE IF NOT EXISTS screening (
    experiment VARCHAR NOT NULL,
    repeat INTEGER,
    model VARCHAR NOT NULL,                   -- screening model, e.g. 'roost', 'forest'
    training_set VARCHAR NOT NULL,            -- 'BS', 'AL', 'random'
    gap_window VARCHAR,                       -- band-gap window label, e.g. 'gt6' or '2-4'
    formula VARCHAR NOT NULL,
    reduced_formula VARCHAR,
    predicted_gap DOUBLE,                     -- eV, from the screening model
    oracle_gap DOUBLE,                        -- eV, from the oracle
    beyond_training BOOLEAN,                  -- predicted_gap lies outside the labels its model trained on
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

-- Screening performance (the paper's Table 1): one row per experiment, repeat, model, training set and window.
CREATE TABLE IF NOT EXISTS screening_metrics (
    experiment VARCHAR NOT NULL,
    repeat INTEGER,
    model VARCHAR NOT NULL,
    training_set VARCHAR NOT NULL,            -- 'BS', 'AL', 'random', 'ALL'
    gap_window VARCHAR NOT NULL,
    n_train INTEGER,
    r2_holdout DOUBLE,                        -- on a hold-out of the model's own training set
    mae_holdout DOUBLE,
    rmse_holdout DOUBLE,
    r2_test DOUBLE,                           -- on the common external test set
    mae_test DOUBLE,
    rmse_test DOUBLE,
    n_candidates BIGINT,                      -- candidates the model places in the window
    n_oracle BIGINT,                          -- ... the oracle places there
    n_recovered BIGINT,                       -- ... both place there
    recovery DOUBLE,                          -- n_recovered / n_oracle (the paper's metric)
    precision DOUBLE,                         -- n_recovered / n_candidates
    f1 DOUBLE,
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

-- Table 1 again, with each training set's own labels kept: a candidate the set labels is judged by its
-- label, the others by the model (agd screen, labels_kept.parquet; the hit windows only).
CREATE TABLE IF NOT EXISTS screening_labels_kept (
    experiment VARCHAR NOT NULL,
    repeat INTEGER,
    training_set VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    gap_window VARCHAR NOT NULL,
    n_labelled BIGINT,                        -- screened candidates the training set labels
    n_labelled_truth BIGINT,                  -- ... of them oracle hits
    n_candidates BIGINT,                      -- candidates called hits (by label, else by the model)
    n_oracle BIGINT,
    n_recovered BIGINT,
    recovery DOUBLE,
    precision DOUBLE,
    f1 DOUBLE,
    recovery_gain DOUBLE,                     -- recovery minus the model's own (screening_metrics)
    precision_gain DOUBLE,
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

-- Table 1 after a verify round (agd screen with screening.check_margins, check.parquet; the hit windows
-- only): per margin, the oracle checks what each screener calls in its window widened by the margin.
CREATE TABLE IF NOT EXISTS screening_check (
    experiment VARCHAR NOT NULL,
    repeat INTEGER,
    training_set VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    gap_window VARCHAR NOT NULL,
    margin DOUBLE NOT NULL,                   -- eV the window is widened by for the check
    n_checked BIGINT,                         -- labels the check costs
    n_candidates BIGINT,                      -- the list after the check
    n_oracle BIGINT,
    n_recovered BIGINT,
    recovery DOUBLE,
    precision DOUBLE,
    f1 DOUBLE,
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

-- Table 1 within each screener's element domain (agd screen with screening.domain_min_rows,
-- domain.parquet; the hit windows only): the model's calls on candidates with an element that occurs in
-- fewer than min_rows formulas of the screener's training set are left out.
CREATE TABLE IF NOT EXISTS screening_domain (
    experiment VARCHAR NOT NULL,
    repeat INTEGER,
    training_set VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    gap_window VARCHAR NOT NULL,
    min_rows INTEGER NOT NULL,
    n_dropped BIGINT,                         -- the model's calls left out
    n_candidates BIGINT,                      -- the model alone, within the domain
    n_oracle BIGINT,
    n_recovered BIGINT,
    recovery DOUBLE,
    precision DOUBLE,
    f1 DOUBLE,
    kept_n_candidates BIGINT,                 -- the same with the training set's labels kept
    kept_n_recovered BIGINT,
    kept_recovery DOUBLE,
    kept_precision DOUBLE,
    kept_f1 DOUBLE,
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

-- Structures built for candidate formulas by template substitution, then relaxed.
CREATE TABLE IF NOT EXISTS structures (
    formula VARCHAR NOT NULL,
    template_id VARCHAR,                      -- id of the template structure (e.g. an MP id)
    template_formula VARCHAR,
    elmd_distance DOUBLE,                     -- ElMD between formula and template formula
    status VARCHAR,                           -- outcome of substitution and relaxation
    cif VARCHAR,
    formation_energy_per_atom DOUBLE,         -- eV/atom, CHGNet
    energy_per_atom DOUBLE,                   -- eV/atom, CHGNet
    relax_steps INTEGER,
    converged BOOLEAN,
    vasp_dir VARCHAR,                         -- exported VASP input folder
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

-- Imported DFT (VASP) results.
-- The design-space map of the default selection (the paper's Fig. 8), embedded once by `agd catalog`.
CREATE TABLE IF NOT EXISTS design_map (
    experiments VARCHAR NOT NULL,             -- the selection, comma-separated and sorted
    n_points INTEGER NOT NULL,                -- at most this many points (half round 0, half suggestions)
    perplexity DOUBLE NOT NULL,
    seed INTEGER NOT NULL,
    experiment VARCHAR,
    campaign VARCHAR NOT NULL,
    repeat INTEGER NOT NULL,
    round INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    formula VARCHAR,
    band_gap DOUBLE,
    sample VARCHAR NOT NULL,                  -- 'training (round 0)' or 'active learning'
    tsne_1 DOUBLE NOT NULL,
    tsne_2 DOUBLE NOT NULL,
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS dft_results (
    formula VARCHAR NOT NULL,
    path VARCHAR NOT NULL,                    -- VASP run folder the result was read from
    band_gap DOUBLE,                          -- eV
    total_energy DOUBLE,                      -- eV per cell
    formation_energy_per_atom DOUBLE,         -- eV/atom
    converged BOOLEAN,
    status VARCHAR,
    imported_at TIMESTAMP,                    -- when the VASP output was read (loaded_at: catalog load)
    source_file VARCHAR NOT NULL,
    loaded_at TIMESTAMP NOT NULL
);
"""

_FLOAT_TYPES = {"DOUBLE", "FLOAT", "REAL"}
#: Columns pandas adds to parquet files for a non-default index; not data.
_PANDAS_INDEX = re.compile(r"^__index_level_\d+__$")
_STAGED = "_agd_staged"


class CatalogError(Exception):
    """A catalog load or query that cannot proceed; the message says why and what to do."""


class CatalogMissingError(CatalogError, FileNotFoundError):
    """The catalog database file does not exist yet."""


@dataclass(frozen=True)
class Column:
    """One column of a catalog table: name, DuckDB type, and whether a load must supply it."""

    name: str
    type: str
    required: bool


def _read_schema() -> dict[str, tuple[Column, ...]]:
    """Let DuckDB parse ``SCHEMA_SQL`` and report the tables it defines."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(SCHEMA_SQL)
        rows = con.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM duckdb_columns() "
            "WHERE NOT internal ORDER BY table_oid, column_index"
        ).fetchall()
    finally:
        con.close()
    tables: dict[str, list[Column]] = {}
    for table, name, type_, nullable in rows:
        required = not nullable and name not in PROVENANCE_COLUMNS
        tables.setdefault(table, []).append(Column(name, type_, required))
    return {table: tuple(columns) for table, columns in tables.items()}


#: Table name -> its columns in order, provenance columns included.
TABLES: dict[str, tuple[Column, ...]] = _read_schema()


def _quote(identifier: str) -> str:
    """Quote an identifier from the fixed schema for SQL text."""
    return '"' + identifier.replace('"', '""') + '"'


def _columns(table: str) -> dict[str, Column]:
    """Columns of a catalog table by name; unknown tables are an error."""
    if table not in TABLES:
        raise CatalogError(f"unknown catalog table {table!r}; the catalog has {', '.join(TABLES)}")
    return {column.name: column for column in TABLES[table]}


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create any missing catalog tables and check existing ones against ``TABLES``."""
    con.execute(SCHEMA_SQL)
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM duckdb_columns() "
        "WHERE NOT internal AND database_name = current_database() AND schema_name = current_schema() "
        "ORDER BY table_oid, column_index"
    ).fetchall()
    found: dict[str, list[tuple[str, str]]] = {}
    for table, name, type_ in rows:
        found.setdefault(table, []).append((name, type_))
    for table, columns in TABLES.items():
        expected = [(column.name, column.type) for column in columns]
        if found.get(table) != expected:
            raise CatalogError(
                f"table {table!r} in this catalog does not match the current schema "
                f"(has {found.get(table)}, expected {expected}); delete the database and {BUILD_HINT}"
            )


def _source_label(source: str | os.PathLike[str]) -> str:
    """Provenance label of a source file: the path as given, normalised, with forward slashes."""
    return Path(os.path.normpath(os.fspath(source))).as_posix()


def _load(
    con: duckdb.DuckDBPyConnection,
    table: str,
    source: str | os.PathLike[str] | pd.DataFrame,
    *,
    key: Mapping[str, Any] | None,
    source_file: str | None,
    ignore_unknown: bool,
) -> int:
    """Replace the rows of ``table`` matching the load key with ``source``; the caller owns the transaction."""
    spec = _columns(table)
    key = dict(key or {})
    if isinstance(source, pd.DataFrame):
        if source_file is None and not key:
            raise CatalogError(
                f"loading a DataFrame into {table!r} needs source_file= or key= to identify the load"
            )
        label = source_file or key.get("source_file") or "<DataFrame>"
        staged: Any = source
        names = [str(name) for name in source.columns]
    else:
        path = Path(source)
        if not path.is_file():
            raise CatalogError(f"cannot load {table!r}: source file {path} does not exist")
        label = source_file or key.get("source_file") or _source_label(path)
        # a pyarrow dataset streams the file and, unlike read_parquet, never treats the path as a glob
        import pyarrow.dataset as pa_dataset  # a second to import; readers (the dashboard) never need it

        staged = pa_dataset.dataset(path, format="parquet")
        names = [name for name in staged.schema.names if not _PANDAS_INDEX.match(name)]
    key = key or {"source_file": label}
    where = f"{table!r} from {label}"

    for name, value in key.items():
        if name not in spec or name == "loaded_at":
            raise CatalogError(f"load key column {name!r} is not a loadable column of table {table!r}")
        if value is None:
            raise CatalogError(f"load key column {name!r} for table {table!r} is None; a key needs a value")
    if key.get("source_file", label) != label:
        raise CatalogError(f"load key source_file={key['source_file']!r} differs from source_file={label!r}")

    if len(set(names)) != len(names):
        raise CatalogError(f"loading {where}: duplicate column names {names}")
    reserved = [name for name in names if name in PROVENANCE_COLUMNS]
    if reserved:
        raise CatalogError(f"loading {where}: columns {reserved} are set by the loader, drop them")
    unknown = [name for name in names if name not in spec]
    if unknown and not ignore_unknown:
        known = [name for name in spec if name not in PROVENANCE_COLUMNS]
        raise CatalogError(
            f"loading {where}: unknown column(s) {unknown} for table {table!r}; its columns are {known}"
        )
    if unknown:
        log.info("loading %s: ignoring columns not in the schema: %s", where, unknown)
    names = [name for name in names if name in spec]
    missing = [c.name for c in spec.values() if c.required and c.name not in names and c.name not in key]
    if missing:
        raise CatalogError(f"loading {where}: missing required column(s) {missing} for table {table!r}")

    con.register(_STAGED, staged)
    try:
        targets, exprs, params = [], [], []
        for name in names:
            targets.append(name)
            # pandas NaN arrives as NULL but parquet NaN as NaN; store both as NULL so aggregates agree
            if spec[name].type in _FLOAT_TYPES:
                exprs.append(f"NULLIF(CAST({_quote(name)} AS DOUBLE), 'NaN'::DOUBLE)")
            else:
                exprs.append(_quote(name))
        for name, value in key.items():
            if name not in names and name != "source_file":
                targets.append(name)
                exprs.append(f"CAST(? AS {spec[name].type})")
                params.append(value)
        targets += ["source_file", "loaded_at"]
        exprs += ["CAST(? AS VARCHAR)", "CAST(? AS TIMESTAMP)"]
        params += [label, datetime.now(UTC).replace(tzinfo=None)]

        conditions = " AND ".join(f"{_quote(name)} = CAST(? AS {spec[name].type})" for name in key)
        try:
            # rows that disagree with the key would escape the next load's delete, so reject them
            for name in (name for name in key if name in names):
                (n_off,) = con.execute(
                    f"SELECT count(*) FROM {_STAGED} WHERE {_quote(name)} IS DISTINCT FROM CAST(? AS {spec[name].type})",
                    [key[name]],
                ).fetchone()
                if n_off:
                    raise CatalogError(
                        f"loading {where}: {n_off} row(s) have {name} other than the load key {key[name]!r}"
                    )
            con.execute(f"DELETE FROM {_quote(table)} WHERE {conditions}", list(key.values()))
            (n_rows,) = con.execute(
                f"INSERT INTO {_quote(table)} ({', '.join(map(_quote, targets))}) "
                f"SELECT {', '.join(exprs)} FROM {_STAGED}",
                params,
            ).fetchone()
        except duckdb.Error as exc:
            raise CatalogError(f"loading {where}: {exc}") from exc
    finally:
        # after a failed statement the transaction is aborted and unregistering fails; the rollback
        # and the closing connection drop the temporary view anyway
        with contextlib.suppress(duckdb.Error):
            con.unregister(_STAGED)
    log.info("loaded %d rows into %s (key %s)", n_rows, where, key)
    return int(n_rows)


def _connect_writable(db_path: Path) -> duckdb.DuckDBPyConnection:
    """Open the database for writing, turning lock conflicts into an actionable error."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return duckdb.connect(str(db_path))
    except (duckdb.IOException, duckdb.ConnectionException) as exc:
        raise CatalogError(
            f"cannot open {db_path} for writing; is it open elsewhere (dashboard, another load)? {exc}"
        ) from exc


def load_table(
    db_path: str | os.PathLike[str],
    table: str,
    source: str | os.PathLike[str] | pd.DataFrame,
    *,
    key: Mapping[str, Any] | None = None,
    source_file: str | None = None,
) -> int:
    """Replace the rows of ``table`` matching ``key`` (default: same source_file); returns rows loaded.

    ``source`` is a parquet path or a DataFrame (which needs ``source_file`` or ``key``). Columns are
    matched by name; absent optional columns become NULL; key columns absent from the source take the
    key's value. Delete and insert run in one transaction, so a failed load changes nothing.
    """
    with _connect_writable(Path(db_path)) as con:
        con.begin()
        try:
            create_schema(con)
            n_rows = _load(con, table, source, key=key, source_file=source_file, ignore_unknown=False)
        except BaseException:
            con.rollback()
            raise
        con.commit()
    return n_rows


@dataclass(frozen=True)
class Load:
    """One stage output for ``build_catalog``: target table, parquet path or DataFrame, and load key."""

    table: str
    source: str | os.PathLike[str] | pd.DataFrame
    key: Mapping[str, Any] | None = None
    source_file: str | None = None


def _remove_database_files(path: Path) -> None:
    """Delete a database file and its write-ahead log, if present."""
    for file in (path, path.with_name(path.name + ".wal")):
        file.unlink(missing_ok=True)


def _row_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Rows per catalog table present in the database."""
    present = {
        row[0]
        for row in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()
    }
    counts = {}
    for table in TABLES:
        if table in present:
            (counts[table],) = con.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()
    return counts


def _load_design_map(con: duckdb.DuckDBPyConnection, cfg: DesignMapConfig) -> None:
    """Embed the default selection of ``al_samples`` into ``design_map`` (nothing when there are no latents)."""
    from agd.tracking.design_map import compute_design_map

    frame = compute_design_map(con, cfg.n_points, cfg.perplexity, cfg.seed)
    if frame.empty:
        return
    label = f"t-SNE of al_samples ({cfg.n_points} points, perplexity {cfg.perplexity:g}, seed {cfg.seed})"
    _load(con, "design_map", frame, key=None, source_file=label, ignore_unknown=False)
    log.info("design map: %d points embedded", len(frame))


def build_catalog(
    db_path: str | os.PathLike[str],
    dataset_parquet: str | os.PathLike[str],
    dataset_name: str,
    *,
    extra: Sequence[Load] = (),
    design_map: DesignMapConfig | None = None,
) -> dict[str, int]:
    """Build the catalog afresh from the prepared dataset (and ``extra`` loads); returns rows per table.

    The prepared dataset goes into ``datasets`` keyed by ``dataset_name``. Unlike ``load_table``, this
    builder ignores (and logs) source columns the schema does not know, since stage outputs may carry
    working columns. The database is written to a temporary file in one transaction and renamed over
    ``db_path`` only when complete, so a crash leaves the previous catalog untouched. With
    ``design_map``, the t-SNE map of the loaded ``al_samples`` (see ``agd.tracking.design_map``) is
    embedded into the ``design_map`` table, so the dashboard need not compute it on a first visit.
    """
    db_path = Path(db_path)
    loads = [Load("datasets", dataset_parquet, key={"dataset": dataset_name}), *extra]
    building = db_path.with_name(f".{db_path.name}.building-{os.getpid()}")
    _remove_database_files(building)
    try:
        with _connect_writable(building) as con:
            con.begin()
            create_schema(con)
            for load in loads:
                _load(
                    con,
                    load.table,
                    load.source,
                    key=load.key,
                    source_file=load.source_file,
                    ignore_unknown=True,
                )
            if design_map is not None:
                _load_design_map(con, design_map)
            con.commit()
            counts = _row_counts(con)
        # a WAL left by a crashed writer of the old file would be replayed onto the new one
        db_path.with_name(db_path.name + ".wal").unlink(missing_ok=True)
        os.replace(building, db_path)
    except BaseException:
        _remove_database_files(building)
        raise
    log.info("built catalog %s: %s", db_path, counts)
    return counts


class CatalogReader:
    """Read-only access to the catalog for the dashboard and notebooks; use as a context manager."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.path = Path(db_path)
        if not self.path.is_file():
            raise CatalogMissingError(f"no catalog database at {self.path}; {BUILD_HINT}")
        try:
            self._con = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error as exc:
            raise CatalogError(f"cannot open catalog {self.path} read-only: {exc}") from exc

    def tables(self) -> dict[str, int]:
        """Row count of every catalog table in the database."""
        return _row_counts(self._con)

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Run a read-only SQL query with bound parameters (``?`` or ``$name``) and return a DataFrame."""
        return self._con.execute(sql, params).fetchdf()

    def table(
        self,
        name: str,
        where: Mapping[str, Any] | None = None,
        *,
        columns: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Rows of one table filtered by column equality (None -> IS NULL, list -> IN), as a DataFrame."""
        spec = _columns(name)
        selected = list(columns) if columns is not None else list(spec)
        for column in [*selected, *(where or {})]:
            if column not in spec:
                raise CatalogError(
                    f"unknown column {column!r} for table {name!r}; its columns are {list(spec)}"
                )
        conditions, params = [], []
        for column, value in (where or {}).items():
            if value is None:
                conditions.append(f"{_quote(column)} IS NULL")
            elif isinstance(value, list | tuple | set | frozenset):
                values = list(value)
                placeholders = ", ".join("?" for _ in values)
                conditions.append(f"{_quote(column)} IN ({placeholders})" if values else "FALSE")
                params += values
            else:
                conditions.append(f"{_quote(column)} = ?")
                params.append(value)
        sql = f"SELECT {', '.join(map(_quote, selected))} FROM {_quote(name)}"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self.query(sql, params)

    def close(self) -> None:
        """Close the connection (and release the file)."""
        self._con.close()

    def __enter__(self) -> CatalogReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
