"""Data access for the dashboard: the DuckDB catalog (read-only, parameterised queries), MLflow, DVC.

Nothing here imports Streamlit, so every query can be tested on its own. The catalog is opened only
through ``agd.tracking.catalog.CatalogReader`` (read-only). Values a user types or picks reach SQL as
bound parameters; the few identifiers that SQL cannot bind (a sort column) come from fixed whitelists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pandas as pd
import yaml

from agd.config import ConfigError, find_project_root, load_params
from agd.screening.metrics import paired_cells, paired_differences
from agd.tracking.catalog import TABLES, CatalogError, CatalogMissingError, CatalogReader
from agd.tracking.design_map import latent_sample_query, selection_key

#: Commands that produce each table (then ``agd catalog`` loads it); shown when a table is empty.
PRODUCERS = {
    "datasets": "agd data prepare",
    "candidates": "agd generate",
    "al_samples": "agd experiments",
    "screening": "agd screen",
    "screening_metrics": "agd screen",
    "screening_labels_kept": "agd screen",
    "screening_check": "agd screen (params screening.check_margins)",
    "screening_domain": "agd screen (params screening.domain_min_rows)",
    "structures": "agd structures / agd energy / agd export-vasp",
    "dft_results": "agd import-dft DIR",
    "design_map": "agd catalog (t-SNE of al_samples; params catalog.design_map)",
}
BUILD_COMMAND = "dvc repro pipelines/dvc.yaml"

#: Table 1 columns: catalog column -> (label, kind); kind picks the display format.
TABLE1_METRICS: dict[str, tuple[str, str]] = {
    "r2_holdout": ("R² hold-out", "ratio"),
    "r2_test": ("R² test", "ratio"),
    "mae_test": ("MAE test (eV)", "ratio"),
    "rmse_test": ("RMSE test (eV)", "ratio"),
    "n_candidates": ("Candidates (n)", "count"),
    "recovery": ("Recovery (%)", "percent"),
    "precision": ("Precision (%)", "percent"),
    "f1": ("F1 (%)", "percent"),
}
#: Columns of a Table 1 that are not screening metrics of the paper's: catalog column -> (label, kind).
EXTRA_COLUMNS: dict[str, tuple[str, str]] = {"n_labelled": ("Labelled candidates (n)", "count")}
#: The Table 1 columns ``screening_labels_kept`` has (the screener's R² does not change with the labels).
LABELS_KEPT_METRICS = ("n_candidates", "recovery", "precision", "f1")
TRAINING_SET_ORDER = ["ALL", "BS", "AL", "random"]
#: The screen stage's further views of Table 1 (the hit windows only): catalog table -> (the column of its
#: levels, that column's label, and its metrics as catalog column -> (label, kind)).
VERIFY_VIEWS: dict[str, tuple[str, str, dict[str, tuple[str, str]]]] = {
    "screening_check": (
        "margin",
        "Margin (eV)",
        {
            "n_checked": ("Checked (n)", "count"),
            "n_candidates": ("Listed (n)", "count"),
            "recovery": ("Recovery (%)", "percent"),
            "precision": ("Precision (%)", "percent"),
        },
    ),
    "screening_domain": (
        "min_rows",
        "Min formulas",
        {
            "n_dropped": ("Calls left out (n)", "count"),
            "n_candidates": ("Listed (n)", "count"),
            "recovery": ("Recovery (%)", "percent"),
            "precision": ("Precision (%)", "percent"),
            "kept_recovery": ("Recovery, labels kept (%)", "percent"),
            "kept_precision": ("Precision, labels kept (%)", "percent"),
        },
    ),
}


# ---------------------------------------------------------------------------------------------
# settings
@dataclass(frozen=True)
class Settings:
    """Where the dashboard finds its inputs."""

    root: Path
    catalog: Path
    tracking_uri: str
    dvc_file: Path
    mlflow_ui: str
    params_error: str | None = None


def _project_root() -> Path:
    """The working folder's project (a scratch copy), else the one this file belongs to."""
    here = find_project_root()
    if (here / "params.yaml").is_file():
        return here
    return Path(__file__).resolve().parents[1]


_PARAMS_CACHE: dict[tuple[str, int, int], Any] = {}


def _read_params(path: Path) -> Any:
    """``load_params`` of a file, reused while the file is unchanged (every page run asks for it)."""
    try:
        stat = path.stat()
    except OSError:
        return load_params(path)  # missing: its own error message
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _PARAMS_CACHE:
        params = load_params(path)  # a ConfigError is not cached: the next run reads the file again
        _PARAMS_CACHE.clear()
        _PARAMS_CACHE[key] = params
    return _PARAMS_CACHE[key]


def load_settings() -> Settings:
    """Resolve the catalog path (AGD_CATALOG, else params' catalog.path), the MLflow URI and the DVC file."""
    from agd.tracking.mlflow import tracking_uri

    root = _project_root()
    params_error = None
    try:
        params = _read_params(root / "params.yaml")
    except ConfigError as exc:
        # a broken params.yaml must not take the dashboard down: fall back to the defaults and say so
        params_error = str(exc)
        from agd.config import Params

        params = Params()
    catalog = Path(os.environ.get("AGD_CATALOG") or params.catalog.path)
    if not catalog.is_absolute():
        catalog = root / catalog
    dvc_file = Path(os.environ.get("AGD_DVC_FILE") or root / "pipelines" / "dvc.yaml")
    return Settings(
        root=root,
        catalog=catalog,
        tracking_uri=tracking_uri(params.tracking, root),
        dvc_file=dvc_file,
        mlflow_ui=os.environ.get("AGD_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/"),
        params_error=params_error,
    )


def catalog_version(db: Path) -> int:
    """A cache key that changes whenever the catalog file is rebuilt (0 when absent)."""
    try:
        return db.stat().st_mtime_ns
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# catalog state
@dataclass(frozen=True)
class CatalogStatus:
    """Whether the catalog can be read, and its row counts per table."""

    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the catalog opened and has at least one non-empty table."""
        return self.error is None and any(self.counts.values())

    def message(self) -> str:
        """What is wrong and which command fixes it (empty when nothing is)."""
        if self.error:
            return self.error
        if not any(self.counts.values()):
            return (
                f"The catalog {self.path} exists but every table is empty. Produce the data with "
                f"`{BUILD_COMMAND}` (or load stage outputs with `agd catalog`)."
            )
        return ""


def catalog_status(db: Path) -> CatalogStatus:
    """Open the catalog read-only and count rows per table; errors become a message, never an exception."""
    try:
        with CatalogReader(db) as reader:
            counts = reader.tables()
        drift = _schema_drift(db)
    except CatalogMissingError:
        return CatalogStatus(
            db,
            error=(
                f"No catalog at {db}. Produce it with `{BUILD_COMMAND}` from the project root, or build it "
                f"from existing stage outputs with `agd catalog`; set AGD_CATALOG to use another file."
            ),
        )
    except (CatalogError, duckdb.Error, OSError) as exc:
        return CatalogStatus(
            db, error=f"The catalog {db} cannot be read: {exc}. Rebuild it with `agd catalog`."
        )
    if drift:
        return CatalogStatus(
            db,
            error=(
                f"The catalog {db} was built with an older schema ({'; '.join(drift)}). Rebuild it with "
                f"`agd catalog` (or `{BUILD_COMMAND}`)."
            ),
        )
    # a table the file lacks (built before the table existed) reads as empty
    return CatalogStatus(db, counts={table: counts.get(table, 0) for table in TABLES})


def _schema_drift(db: Path) -> list[str]:
    """Tables whose columns differ from the current ``SCHEMA_SQL`` (queries against them would fail)."""
    with CatalogReader(db) as reader:
        found = reader.query(
            "SELECT table_name, column_name, data_type FROM duckdb_columns() "
            "WHERE NOT internal AND database_name = current_database() AND schema_name = current_schema() "
            "ORDER BY table_oid, column_index"
        )
    problems = []
    for table, columns in found.groupby("table_name", sort=False):
        if table not in TABLES:
            continue
        have = list(zip(columns["column_name"], columns["data_type"], strict=True))
        want = [(column.name, column.type) for column in TABLES[table]]
        if have != want:
            missing = [name for name, _ in want if name not in dict(have)]
            problems.append(f"{table}: " + (f"lacks {', '.join(missing)}" if missing else "columns differ"))
    return problems


def empty_table_message(table: str) -> str:
    """Which command fills an empty catalog table."""
    return (
        f"The catalog's `{table}` table is empty. It is produced by `{PRODUCERS[table]}` "
        f"(a stage of `{BUILD_COMMAND}`) and loaded by `agd catalog`."
    )


def _query(db: Path, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
    """One read-only query with bound parameters."""
    with CatalogReader(db) as reader:
        return reader.query(sql, list(params or []))


def _in(column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``column IN (?, ...)`` with its parameters; an empty selection matches nothing."""
    values = list(values)
    if not values:
        return "FALSE", []
    return f"{column} IN ({', '.join('?' for _ in values)})", values


def distinct_values(db: Path, table: str, column: str) -> list[Any]:
    """Sorted distinct non-null values of a column of the fixed schema."""
    if column not in {c.name for c in TABLES[table]}:
        raise CatalogError(f"unknown column {column!r} of table {table!r}")
    frame = _query(
        db, f'SELECT DISTINCT "{column}" AS v FROM "{table}" WHERE "{column}" IS NOT NULL ORDER BY 1'
    )
    return frame["v"].tolist()


# ---------------------------------------------------------------------------------------------
# Experiments: Table 1
def _selection(
    experiments: Sequence[str] | None, models: Sequence[str] | None, windows: Sequence[str] | None
) -> tuple[str, list[Any]]:
    """A WHERE clause (and its parameters) keeping the chosen experiments, models and windows."""
    conditions, params = ["TRUE"], []
    for column, values in (("experiment", experiments), ("model", models), ("gap_window", windows)):
        if values is not None:
            condition, values_ = _in(column, values)
            conditions.append(condition)
            params += values_
    return " AND ".join(conditions), params


def _table1_source(labels_kept: bool) -> tuple[str, Sequence[str]]:
    """The catalog table Table 1 is read from and the metrics it holds."""
    if labels_kept:
        return "screening_labels_kept", LABELS_KEPT_METRICS
    return "screening_metrics", tuple(TABLE1_METRICS)


def _in_table1_order(frame: pd.DataFrame, *more: str) -> pd.DataFrame:
    """Rows sorted as Table 1 lists them (training sets ALL, BS, AL, random, then any other), then by ``more``."""
    order = {name: i for i, name in enumerate(TRAINING_SET_ORDER)}
    frame = frame.assign(
        _order=frame["training_set"].map(order).fillna(len(order))
    )  # the caller's frame stays as it is
    frame = frame.sort_values(["experiment", "model", "gap_window", "_order", "training_set", *more])
    return frame.drop(columns="_order").reset_index(drop=True)


def verify_table(
    db: Path,
    table: str,
    experiments: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    windows: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean and sample std over repeats of a further view of Table 1 (:data:`VERIFY_VIEWS`: after the
    check of the near-misses, or within the element domain), per cell of Table 1 and level."""
    level, _, metrics = VERIFY_VIEWS[table]
    where, params = _selection(experiments, models, windows)
    aggregates = ", ".join(f"avg({m}) AS {m}_mean, stddev_samp({m}) AS {m}_std" for m in metrics)
    frame = _query(
        db,
        f"SELECT experiment, model, training_set, gap_window, {level}, count(*) AS n_repeats, {aggregates} "
        f"FROM {table} WHERE {where} "
        f"GROUP BY experiment, model, training_set, gap_window, {level}",
        params,
    )
    return _in_table1_order(frame, level)


def verify_display(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    """:func:`verify_table` as text cells ``mean ± std``, indexed by the Table 1 cell and the level."""
    level, level_label, metrics = VERIFY_VIEWS[table]
    out = pd.DataFrame(
        {
            "Experiment": frame["experiment"],
            "Model": frame["model"],
            "Training set": frame["training_set"],
            "Window": frame["gap_window"],
            level_label: [f"{value:g}" for value in frame[level]],
            "Repeats": frame["n_repeats"].astype(int),
        }
    )
    for metric, (label, kind) in metrics.items():
        out[label] = [
            format_pm(m, s, kind)
            for m, s in zip(frame[f"{metric}_mean"], frame[f"{metric}_std"], strict=True)
        ]
    return out.set_index(["Experiment", "Model", "Training set", "Window", level_label])


def table1(
    db: Path,
    experiments: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    windows: Sequence[str] | None = None,
    labels_kept: bool = False,
) -> pd.DataFrame:
    """Mean and sample std over repeats of every Table-1 metric per experiment, model, training set and window.

    ``labels_kept``: from ``screening_labels_kept``, where a candidate the training set labels is judged
    by its label (only the screening metrics, ``LABELS_KEPT_METRICS``, and ``n_labelled``).
    """
    where, params = _selection(experiments, models, windows)
    table, metrics = _table1_source(labels_kept)
    if labels_kept:
        metrics = ("n_labelled", *metrics)
    aggregates = ", ".join(f"avg({m}) AS {m}_mean, stddev_samp({m}) AS {m}_std" for m in metrics)
    frame = _query(
        db,
        f"SELECT experiment, model, training_set, gap_window, count(*) AS n_repeats, {aggregates} "
        f"FROM {table} WHERE {where} "
        "GROUP BY experiment, model, training_set, gap_window",
        params,
    )
    return _in_table1_order(frame)


def paired(
    db: Path,
    experiments: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    windows: Sequence[str] | None = None,
    labels_kept: bool = False,
) -> pd.DataFrame:
    """AL minus random and AL minus BS, paired by repeat (:func:`agd.screening.metrics.paired_differences`,
    which writes the same table into the screen stage's report); ``labels_kept`` as in :func:`table1`."""
    where, params = _selection(experiments, models, windows)
    table, _ = _table1_source(labels_kept)
    rows = _query(
        db,
        "SELECT experiment, repeat, model, training_set, gap_window, recovery, precision "
        f"FROM {table} WHERE {where} "
        "ORDER BY experiment, model, gap_window, repeat",
        params,
    )
    return paired_differences(rows)


def paired_display(frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`paired` as text cells: the mean difference ± std in points, and the repeats ahead."""
    out = pd.DataFrame(
        {
            "Pair": frame["pair"].str.replace("-", " − ", regex=False),
            "Experiment": frame["experiment"],
            "Model": frame["model"],
            "Window": frame["gap_window"],
            "Repeats": frame["n_repeats"],
        }
    )
    for metric, label in (("recovery", "Recovery"), ("precision", "Precision")):
        cells = [paired_cells(row, metric) for row in frame.to_dict("records")]
        out[f"{label} (points)"] = [c[0] for c in cells]
        out[f"{label}: ahead"] = [c[1] for c in cells]
    return out


def format_pm(mean: float, std: float, kind: str) -> str:
    """``mean ± std`` in the metric's display format (std omitted when there is a single repeat)."""
    if mean is None or pd.isna(mean):
        return "–"
    if kind == "percent":
        mean, std, digits = mean * 100, (std * 100 if std is not None else std), 1
    elif kind == "count":
        digits = 0
    else:
        digits = 3
    text = f"{mean:.{digits}f}"
    if std is not None and not pd.isna(std):
        text += f" ± {std:.{digits}f}"
    return text


def table1_display(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Table 1 as text cells ``mean ± std`` for the chosen metrics."""
    out = frame[["experiment", "model", "training_set", "gap_window", "n_repeats"]].rename(
        columns={
            "experiment": "Experiment",
            "model": "Model",
            "training_set": "Training set",
            "gap_window": "Window",
            "n_repeats": "Repeats",
        }
    )
    for metric in metrics:
        label, kind = TABLE1_METRICS[metric] if metric in TABLE1_METRICS else EXTRA_COLUMNS[metric]
        out[label] = [
            format_pm(m, s, kind)
            for m, s in zip(frame[f"{metric}_mean"], frame[f"{metric}_std"], strict=True)
        ]
    return out


def table1_bar_spec(frame: pd.DataFrame, metric: str) -> dict[str, Any]:
    """A Vega-Lite spec: ``metric``'s mean per experiment, one bar per training set, ± std as error bars.

    Facets by model (columns) and window (rows) when there is more than one. Vega-Lite rather than
    plotly: the first page then loads 0.8 MB of chart code in the browser instead of 4.7 MB.
    """
    label, kind = TABLE1_METRICS[metric]
    scale = 100.0 if kind == "percent" else 1.0
    mean = frame[f"{metric}_mean"].to_numpy(dtype=float) * scale
    std = np.nan_to_num(frame[f"{metric}_std"].to_numpy(dtype=float)) * scale
    values = pd.DataFrame(
        {
            "experiment": frame["experiment"].astype(str),
            "training_set": frame["training_set"].astype(str),
            "model": frame["model"].astype(str),
            "window": frame["gap_window"].astype(str),
            "n_repeats": frame["n_repeats"].astype(int),
            "mean": mean,
            "std": std,
            "low": mean - std,
            "high": mean + std,
        }
    ).replace({np.nan: None})
    order = [t for t in TRAINING_SET_ORDER if t in set(values["training_set"])]
    order += sorted(set(values["training_set"]) - set(order))
    x = {"field": "experiment", "type": "nominal", "title": None, "sort": sorted(set(values["experiment"]))}
    offset = {"field": "training_set", "type": "nominal", "sort": order}
    layer = {
        "layer": [
            {
                "mark": "bar",
                "encoding": {
                    "x": x,
                    "xOffset": offset,
                    "y": {"field": "mean", "type": "quantitative", "title": label},
                    "color": {
                        "field": "training_set",
                        "type": "nominal",
                        "sort": order,
                        "title": "training set",
                    },
                    "tooltip": [
                        {"field": name, "type": "nominal"}
                        for name in ("experiment", "training_set", "model", "window")
                    ]
                    + [
                        {"field": "mean", "type": "quantitative", "format": ".3g"},
                        {"field": "std", "type": "quantitative", "format": ".3g"},
                        {"field": "n_repeats", "type": "quantitative", "title": "repeats"},
                    ],
                },
            },
            {
                "mark": {"type": "rule", "color": "black"},
                "encoding": {
                    "x": x,
                    "xOffset": offset,
                    "y": {"field": "low", "type": "quantitative"},
                    "y2": {"field": "high"},
                },
            },
        ],
        "width": 260,
        "height": 220,
    }
    facet = {}
    if values["model"].nunique() > 1:
        facet["column"] = {"field": "model", "type": "nominal", "title": None}
    if values["window"].nunique() > 1:
        facet["row"] = {"field": "window", "type": "nominal", "title": None}
    spec: dict[str, Any] = {"title": label, "data": {"values": values.to_dict("records")}}
    if facet:
        return spec | {"facet": facet, "spec": layer}
    return spec | layer


# ---------------------------------------------------------------------------------------------
# Campaigns
def campaign_index(db: Path) -> pd.DataFrame:
    """One row per campaign and repeat: experiment, kappa, method, rounds and suggestions."""
    return _query(
        db,
        "SELECT experiment, campaign, repeat, any_value(kappa) AS kappa, any_value(method) AS method, "
        "max(round) AS n_rounds, count(*) FILTER (WHERE round > 0) AS n_suggested "
        "FROM al_samples GROUP BY experiment, campaign, repeat ORDER BY experiment, campaign, repeat",
    )


def round_summary(db: Path, experiments: Sequence[str]) -> pd.DataFrame:
    """Per campaign, repeat and round: suggestions, valid decodes, labels, mean/max gap and best so far."""
    condition, params = _in("experiment", experiments)
    return _query(
        db,
        "WITH per_round AS ("
        "  SELECT experiment, campaign, repeat, round, any_value(kappa) AS kappa, count(*) AS n_suggested, "
        "         count(*) FILTER (WHERE valid) AS n_valid, count(label) AS n_labelled, "
        "         avg(label) AS mean_gap, max(label) AS max_gap "
        f"  FROM al_samples WHERE {condition} GROUP BY experiment, campaign, repeat, round) "
        "SELECT *, n_valid / n_suggested AS valid_rate, "
        "       max(max_gap) OVER (PARTITION BY campaign, repeat ORDER BY round "
        "                          ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS best_so_far "
        "FROM per_round ORDER BY experiment, campaign, repeat, round",
        params,
    )


def sampled_gaps(db: Path, campaign: str, repeat: int) -> pd.DataFrame:
    """Every labelled sample of one campaign repeat (round, formula, band gap, fate)."""
    return _query(
        db,
        "SELECT round, idx, formula, label AS band_gap, fate FROM al_samples "
        "WHERE campaign = ? AND repeat = ? AND label IS NOT NULL ORDER BY round, idx",
        [campaign, int(repeat)],
    )


def kappa_sweep(db: Path, experiment: str, threshold: float) -> pd.DataFrame:
    """New formulas above ``threshold`` eV found per round (and cumulatively) per kappa, mean over repeats."""
    return _query(
        db,
        "WITH per AS ("
        "  SELECT kappa, campaign, repeat, round, "
        "         count(DISTINCT formula) FILTER (WHERE label > ? AND fate = 'registered') AS n_high "
        "  FROM al_samples WHERE experiment = ? AND round >= 1 GROUP BY kappa, campaign, repeat, round), "
        "cum AS (SELECT *, sum(n_high) OVER (PARTITION BY kappa, campaign, repeat ORDER BY round) AS cum_high FROM per) "
        "SELECT kappa, round, avg(n_high) AS n_high, avg(cum_high) AS cum_high, count(*) AS n_repeats "
        "FROM cum GROUP BY kappa, round ORDER BY kappa, round",
        [float(threshold), experiment],
    )


def system_spread(db: Path, experiments: Sequence[str], threshold: float) -> pd.DataFrame:
    """Per campaign, mean over its repeats: the formulas it registered after the initial samples, the
    chemical systems (element sets) they span, those above ``threshold`` eV and their systems, and the most
    finds in one system (mean and largest). What ``experiments.campaign.max_per_system`` acts on."""
    from agd.chem.systems import system_spread as spread_of  # pymatgen's parser: only when the tab is open

    condition, params = _in("experiment", experiments)
    finds = _query(
        db,
        "SELECT experiment, campaign, repeat, formula, label FROM al_samples "
        f"WHERE {condition} AND round > 0 AND fate = 'registered'",
        params,
    )
    rows = [
        {
            "experiment": experiment,
            "campaign": campaign,
            "repeat": repeat,
            **spread_of(group["formula"], group["label"] > threshold),
        }
        for (experiment, campaign, repeat), group in finds.groupby(
            ["experiment", "campaign", "repeat"], sort=True
        )
    ]
    columns = ["finds", "systems", "high_gap", "high_gap_systems", "most_in_one_system"]
    if not rows:
        return pd.DataFrame(columns=["experiment", "campaign", "repeats", *columns, "most_max"])
    per = pd.DataFrame(rows).groupby(["experiment", "campaign"], sort=True)
    out = per[columns].mean()
    out.insert(0, "repeats", per["repeat"].nunique())
    out["most_max"] = per["most_in_one_system"].max()
    return out.reset_index()


def sweep_experiment(index: pd.DataFrame) -> str | None:
    """The experiment that holds the kappa sweep: 'kappa' if present, else the one with most distinct kappas."""
    if index.empty:
        return None
    if "kappa" in set(index["experiment"]):
        return "kappa"
    spread = index.groupby("experiment")["kappa"].nunique()
    return str(spread.idxmax()) if spread.max() > 1 else None


# ---------------------------------------------------------------------------------------------
# MLflow
def mlflow_runs(uri: str, experiment_names: Sequence[str] | None = None) -> tuple[pd.DataFrame, str | None]:
    """Runs tagged with an ``experiment`` tag in the MLflow store: (runs, message when none can be read)."""
    columns = [
        "run_id",
        "run_name",
        "mlflow_experiment_id",
        "experiment",
        "campaign",
        "role",
        "repeat",
        "kappa",
        "status",
    ]
    if uri.startswith("sqlite:///"):
        # the client would create an empty store; a missing file simply means no runs yet
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            return pd.DataFrame(
                columns=columns
            ), f"No MLflow store at {path} yet (runs are logged by the stages)."
    try:
        from mlflow import MlflowClient
        from mlflow.entities import ViewType

        client = MlflowClient(uri)
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        rows = []
        if experiment_ids:
            page_token = None
            while True:
                runs = client.search_runs(
                    experiment_ids,
                    filter_string="tags.experiment LIKE '%'",
                    max_results=1000,
                    page_token=page_token,
                )
                for run in runs:
                    tags = run.data.tags
                    rows.append(
                        {
                            "run_id": run.info.run_id,
                            "run_name": run.info.run_name,
                            "mlflow_experiment_id": run.info.experiment_id,
                            "experiment": tags.get("experiment"),
                            "campaign": tags.get("agd.campaign"),
                            "role": tags.get("agd.role"),
                            "repeat": tags.get("repeat"),
                            "kappa": tags.get("kappa"),
                            "status": run.info.status,
                        }
                    )
                page_token = runs.token
                if not page_token:
                    break
    except Exception as exc:  # any store problem is shown on the page, not raised
        return pd.DataFrame(columns=columns), f"Cannot read MLflow runs from {uri}: {exc}"
    frame = pd.DataFrame(rows, columns=columns)
    if experiment_names is not None:
        frame = frame[frame["experiment"].isin(list(experiment_names))]
    return frame.reset_index(drop=True), None


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """Link to a run in the MLflow UI."""
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


# ---------------------------------------------------------------------------------------------
# Design space
def latent_sample(db: Path, experiments: Sequence[str], n_points: int, seed: int = 0) -> pd.DataFrame:
    """Up to ``n_points`` labelled latent vectors, half round 0 (training) and half suggestions, chosen by a seeded hash."""
    sql, params = latent_sample_query(experiments, n_points, seed)
    return _query(db, sql, params)


def design_map_settings(db: Path) -> tuple[int, float] | None:
    """(n_points, perplexity) of the map the catalog stage embedded, if there is one."""
    frame = _query(
        db, "SELECT n_points, perplexity FROM design_map GROUP BY ALL ORDER BY count(*) DESC LIMIT 1"
    )
    if frame.empty:
        return None
    return int(frame["n_points"].iloc[0]), float(frame["perplexity"].iloc[0])


def stored_design_map(
    db: Path, experiments: Sequence[str], n_points: int, perplexity: float, seed: int = 0
) -> pd.DataFrame:
    """The embedded map of exactly this selection and these settings (empty when the catalog has none)."""
    return _query(
        db,
        "SELECT experiment, campaign, repeat, round, idx, formula, band_gap, sample, tsne_1, tsne_2 "
        "FROM design_map WHERE experiments = ? AND n_points = ? AND perplexity = ? AND seed = ? "
        "ORDER BY campaign, repeat, round, idx",
        [selection_key(experiments), int(n_points), float(perplexity), int(seed)],
    )


# ---------------------------------------------------------------------------------------------
# Candidates
_ELEMENT = re.compile(r"^[A-Z][a-z]?$")

#: Which screening run found a hit.
HIT_PROVENANCE = ["experiment", "repeat", "model", "training_set", "gap_window"]
HIT_COLUMNS = [
    "formula",
    *HIT_PROVENANCE,
    "predicted_gap",
    "oracle_gap",
    "beyond_training",
    "valid",
    "novel",
    "formation_energy_per_atom",
    "template_formula",
    "dft_band_gap",
]
GENERATED_COLUMNS = [
    "formula",
    "n_elements",
    "n_atoms",
    "valid",
    "novel",
    "charge_neutral",
    "electronegativity_balanced",
    "source",
    "run_id",
    "formation_energy_per_atom",
    "dft_band_gap",
]


@dataclass(frozen=True)
class CandidateQuery:
    """Filters of the Candidates page; ``None`` or empty means no filter."""

    source: Literal["hits", "generated"] = "hits"
    windows: tuple[str, ...] | None = None
    experiments: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    training_sets: tuple[str, ...] | None = None
    validity: Literal["any", "valid", "invalid"] = "any"
    gap_min: float | None = None
    gap_max: float | None = None
    formation_energy_max: float | None = None
    formula_text: str = ""
    elements: tuple[str, ...] = ()
    sort_by: str = "formula"
    descending: bool = False
    limit: int = 500


def parse_elements(text: str) -> tuple[str, ...]:
    """Element symbols from user text (``"Ga, O"``); an unknown symbol is a ValueError naming it."""
    from pymatgen.core.periodic_table import Element

    symbols = []
    for token in re.split(r"[\s,;]+", text.strip()):
        if not token:
            continue
        symbol = token[:1].upper() + token[1:].lower()
        if not _ELEMENT.match(symbol) or not Element.is_valid_symbol(symbol):
            raise ValueError(f"{token!r} is not an element symbol")
        symbols.append(symbol)
    return tuple(dict.fromkeys(symbols))


def _candidate_sql(q: CandidateQuery) -> tuple[str, list[Any]]:
    """The filtered candidate query (without ORDER/LIMIT) and its parameters."""
    # one structure and one DFT result per formula: the most stable structure, the latest import
    side = (
        "structures_1 AS (SELECT formula, arg_min(formation_energy_per_atom, formation_energy_per_atom) "
        "  AS formation_energy_per_atom, arg_min(template_formula, formation_energy_per_atom) AS template_formula "
        "  FROM structures GROUP BY formula), "
        "dft_1 AS (SELECT formula, arg_max(band_gap, imported_at) AS dft_band_gap FROM dft_results GROUP BY formula)"
    )
    params: list[Any] = []
    conditions = ["TRUE"]
    if q.source == "hits":
        sql = (
            f"WITH {side}, cand AS (SELECT formula, bool_or(valid) AS valid, bool_or(novel) AS novel FROM candidates "
            "  WHERE formula IN (SELECT formula FROM screening) GROUP BY formula) "
            "SELECT s.formula, s.experiment, s.repeat, s.model, s.training_set, s.gap_window, s.predicted_gap, "
            "       s.oracle_gap, s.beyond_training, c.valid, c.novel, st.formation_energy_per_atom, st.template_formula, d.dft_band_gap "
            "FROM screening s LEFT JOIN cand c USING (formula) LEFT JOIN structures_1 st USING (formula) "
            "LEFT JOIN dft_1 d USING (formula)"
        )
        for column, values in (
            ("s.gap_window", q.windows),
            ("s.experiment", q.experiments),
            ("s.model", q.models),
            ("s.training_set", q.training_sets),
        ):
            if values is not None:
                condition, values_ = _in(column, values)
                conditions.append(condition)
                params += values_
        if q.gap_min is not None:
            conditions.append("s.predicted_gap >= ?")
            params.append(float(q.gap_min))
        if q.gap_max is not None:
            conditions.append("s.predicted_gap <= ?")
            params.append(float(q.gap_max))
        formula, valid = "s.formula", "c.valid"
    else:
        sql = (
            f"WITH {side} SELECT c.formula, c.n_elements, c.n_atoms, c.valid, c.novel, c.charge_neutral, "
            "  c.electronegativity_balanced, c.source, c.run_id, st.formation_energy_per_atom, d.dft_band_gap "
            "FROM candidates c LEFT JOIN structures_1 st USING (formula) LEFT JOIN dft_1 d USING (formula)"
        )
        formula, valid = "c.formula", "c.valid"
    if q.validity == "valid":
        conditions.append(f"{valid} IS TRUE")
    elif q.validity == "invalid":
        conditions.append(f"{valid} IS NOT TRUE")
    if q.formation_energy_max is not None:
        conditions.append("st.formation_energy_per_atom <= ?")
        params.append(float(q.formation_energy_max))
    if q.formula_text.strip():
        escaped = q.formula_text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(f"{formula} ILIKE ? ESCAPE '\\'")
        params.append(f"%{escaped}%")
    for symbol in q.elements:
        if not _ELEMENT.match(symbol):
            raise ValueError(f"{symbol!r} is not an element symbol")
        # a symbol is present when no lower-case letter continues it (N in NaCl is not nitrogen)
        conditions.append(f"regexp_matches({formula}, ?)")
        params.append(f"{symbol}([^a-z]|$)")
    return f"{sql} WHERE {' AND '.join(conditions)}", params


def search_candidates(db: Path, q: CandidateQuery) -> tuple[pd.DataFrame, int]:
    """Filtered, sorted candidates (at most ``q.limit`` rows) and the number of rows matching."""
    allowed = HIT_COLUMNS if q.source == "hits" else GENERATED_COLUMNS
    if q.sort_by not in allowed:
        raise ValueError(f"cannot sort by {q.sort_by!r}; choose one of {allowed}")
    sql, params = _candidate_sql(q)
    with CatalogReader(db) as reader:
        (total,) = reader.query(f"SELECT count(*) AS n FROM ({sql})", params)["n"].tolist()
        direction = "DESC" if q.descending else "ASC"
        rows = reader.query(
            f'SELECT * FROM ({sql}) ORDER BY "{q.sort_by}" {direction} NULLS LAST, formula LIMIT ?',
            [*params, int(q.limit)],
        )
    return rows, int(total)


def candidates_csv(db: Path, q: CandidateQuery, max_rows: int = 200_000) -> bytes:
    """CSV of the filtered candidates (at most ``max_rows``), in the page's sort order."""
    rows, _ = search_candidates(db, CandidateQuery(**{**q.__dict__, "limit": max_rows}))
    return rows.to_csv(index=False).encode()


def candidate_detail(db: Path, formula: str) -> dict[str, pd.DataFrame]:
    """Everything the catalog holds about one formula: hits, generation, structures, DFT results."""
    with CatalogReader(db) as reader:
        return {
            "screening": reader.table("screening", {"formula": formula}),
            "candidates": reader.table("candidates", {"formula": formula}, limit=50),
            "structures": reader.table("structures", {"formula": formula}),
            "dft_results": reader.table("dft_results", {"formula": formula}),
        }


def structure_summary(cif: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """Lattice parameters, space group and sites of a CIF (via pymatgen); raises ValueError if unreadable."""
    from pymatgen.core import Structure

    try:
        structure = Structure.from_str(cif, fmt="cif")
    except Exception as exc:  # pymatgen raises many types for a bad CIF
        raise ValueError(f"unreadable CIF: {exc}") from exc
    lattice = structure.lattice
    try:
        spacegroup = "{} ({})".format(*structure.get_space_group_info())
    except Exception:  # symmetry search can fail on odd cells; the rest is still worth showing
        spacegroup = "unknown"
    info = {
        "formula": structure.composition.reduced_formula,
        "a": lattice.a,
        "b": lattice.b,
        "c": lattice.c,
        "alpha": lattice.alpha,
        "beta": lattice.beta,
        "gamma": lattice.gamma,
        "volume": lattice.volume,
        "sites": len(structure),
        "space group": spacegroup,
    }
    sites = pd.DataFrame(
        [
            {
                "species": site.species_string,
                "x": site.frac_coords[0],
                "y": site.frac_coords[1],
                "z": site.frac_coords[2],
            }
            for site in structure
        ]
    )
    return info, sites


# ---------------------------------------------------------------------------------------------
# Run status
@dataclass(frozen=True)
class DvcStatus:
    """DVC stage states (``stages``: stage, state, details) or a message saying why they are unknown."""

    stages: pd.DataFrame
    error: str | None = None


def dvc_stage_names(dvc_file: Path) -> list[str]:
    """Stage names declared in a dvc.yaml, in file order."""
    spec = yaml.safe_load(dvc_file.read_text()) or {}
    return list((spec.get("stages") or {}).keys())


def _dvc_root(start: Path) -> Path | None:
    """The DVC repository (folder holding ``.dvc``) at or above ``start``."""
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_status(dvc_file: Path) -> DvcStatus:
    """DVC's status of one dvc.yaml, through DVC's Python API; failures become a message.

    In-process rather than ``dvc status`` in a subprocess: a new interpreter importing DVC costs 2-3 s on
    every refresh, while the API answers in well under a second once DVC is imported.
    """
    empty = pd.DataFrame(columns=["stage", "state", "details"])
    dvc_file = dvc_file.resolve()
    if not dvc_file.is_file():
        return DvcStatus(empty, f"No DVC pipeline file at {dvc_file}.")
    root = _dvc_root(dvc_file.parent)
    if root is None:
        return DvcStatus(
            empty, f"{dvc_file} is not inside a DVC repository (no .dvc folder); run `dvc init`."
        )
    try:
        names = dvc_stage_names(dvc_file)
    except (OSError, yaml.YAMLError) as exc:
        return DvcStatus(empty, f"Cannot read {dvc_file}: {exc}")
    target = os.path.relpath(dvc_file, root)
    try:
        from dvc.exceptions import DvcException
        from dvc.lock import LockError
        from dvc.repo import Repo
    except ImportError as exc:
        return DvcStatus(empty, f"Cannot import dvc: {exc}")
    try:
        with Repo(str(root)) as repo:
            changes = repo.status(targets=[str(dvc_file)])  # relative targets resolve against the cwd
    except LockError:
        return DvcStatus(
            empty,
            f"`dvc status {target}` cannot run now: another DVC command (a `dvc repro`?) holds the lock.",
        )
    except DvcException as exc:
        return DvcStatus(empty, f"`dvc status {target}` failed: {exc}")
    rows = []
    for name in names:
        found = [value for key, value in changes.items() if key.rpartition(":")[2] == name or key == name]
        if not found:
            rows.append({"stage": name, "state": "up to date", "details": ""})
            continue
        details = []
        for entry in found[0]:
            if isinstance(entry, dict):
                for kind, files in entry.items():
                    items = (
                        ", ".join(f"{f} ({s})" for f, s in files.items())
                        if isinstance(files, dict)
                        else str(files)
                    )
                    details.append(f"{kind}: {items}")
            else:
                details.append(str(entry))
        rows.append({"stage": name, "state": "changed", "details": "; ".join(details)})
    return DvcStatus(pd.DataFrame(rows, columns=["stage", "state", "details"]))
