"""Raw band-gap tables from the Materials Project, matbench or a local file, in one schema.

Every source becomes a DataFrame with the columns of :data:`RAW_COLUMNS` in that order, then
``structure`` (a CIF string) when the source has structures, then every other column of the source
as it was. Nothing is validated or dropped here: a formula is kept exactly as given, and a band gap
that is not a number becomes NaN. :mod:`agd.data.prepare` judges the rows later.

The mp-api and matminer imports are deferred to first use (mp-api alone takes seconds to import).
Tests replace :data:`MPRester` and :data:`load_dataset` in this module.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import platform
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from agd.config import DataConfig

log = logging.getLogger(__name__)

#: Standard raw columns, in order. ``row`` is the 1-based data row in the source (header not counted).
RAW_COLUMNS = ["row", "material_id", "formula", "band_gap", "formation_energy_per_atom", "energy_above_hull"]
STRUCTURE_COLUMN = "structure"
#: Names a ``data.columns`` entry may map a column of the user's file to.
MAPPABLE_COLUMNS = [*RAW_COLUMNS[1:], STRUCTURE_COLUMN]
_NUMERIC_COLUMNS = ["band_gap", "formation_energy_per_atom", "energy_above_hull"]
_TEXT_COLUMNS = ["material_id", "formula", STRUCTURE_COLUMN]

#: Column names recognised in local files, best first; compared after :func:`_normalise_name` on both sides.
#: Formula names run from the as-given cell formula to the reduced one, so the un-reduced wins.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "formula": ("formula", "composition", "pretty_formula", "formula_pretty", "reduced_formula"),
    "band_gap": ("band_gap", "bandgap", "gap", "Eg", "gap pbe", "gap_pbe"),
    "material_id": ("material_id", "mp_id", "task_id", "id"),
    "formation_energy_per_atom": ("formation_energy_per_atom", "e_form", "formation_energy"),
    "energy_above_hull": ("energy_above_hull", "e_above_hull", "ehull"),
    STRUCTURE_COLUMN: ("structure", "cif"),
}
_REQUIRED = ("formula", "band_gap")
_LABELS = {"formula": "formula", "band_gap": "band-gap"}

#: pandas' default missing-value markers; applied to every CSV column except the text columns.
_CSV_NA = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
           "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]  # fmt: skip
_COMPRESSIONS = {".gz", ".bz2", ".xz", ".zip", ".zst"}

MP_FIELDS = ["material_id", "formula_pretty", "band_gap", "formation_energy_per_atom", "energy_above_hull"]
MATBENCH_DATASET = "matbench_mp_gap"
_LOCAL_HINT = (
    "Set data.source: local and data.path (or the AGD_DATA environment variable) to a CSV/parquet file"
)

#: mp_api.client.MPRester; None until first use (see :func:`_mprester_class`).
MPRester: Any = None
#: matminer.datasets.load_dataset; None until first use (see :func:`_matminer_loader`).
load_dataset: Any = None


class DataSourceError(RuntimeError):
    """A raw data source cannot be used; the message says what to change."""


@dataclass(frozen=True)
class ResolvedSource:
    """Which source :func:`fetch` will read, the file for ``local``, and why it was chosen."""

    kind: Literal["mp", "matbench", "local"]
    path: Path | None
    reason: str


# --------------------------------------------------------------------------------------------------
# choosing a source


def resolve_source(cfg: DataConfig, env: Mapping[str, str] = os.environ) -> ResolvedSource:
    """Pick the source: ``cfg.source``, or for ``auto`` a local file, then mp (with a key), then matbench."""
    if cfg.source == "local":
        given, origin = _configured_path(cfg, env)
        if given is None:
            raise DataSourceError(
                "data.source is 'local' but no file is given: set data.path in params.yaml "
                "or the AGD_DATA environment variable to a CSV/parquet file"
            )
        path = Path(given).expanduser()
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise DataSourceError(
                f"data.source is 'local' but {origin} = {given!r} {what} (looked at {path.absolute()})"
            )
        return ResolvedSource("local", path, f"data.source is 'local'; file from {origin}")
    if cfg.source in ("mp", "matbench"):
        return ResolvedSource(cfg.source, None, f"data.source is '{cfg.source}'")

    # auto: the first local file that exists (AGD_DATA, then data.path), then MP with a key, then matbench
    notes = []
    for origin, given in _path_candidates(cfg, env):
        path = Path(given).expanduser()
        if path.is_file():
            return ResolvedSource(
                "local", path, "; ".join([f"auto: {origin} points at an existing file", *notes])
            )
        notes.append(f"{origin} = {given!r} is not an existing file")
        log.warning("%s = %r is not an existing file (looked at %s)", origin, given, path.absolute())
    if env.get("MP_API_KEY"):
        return ResolvedSource("mp", None, "; ".join(["auto: no local file", *notes, "MP_API_KEY is set"]))
    return ResolvedSource(
        "matbench", None, "; ".join(["auto: no local file", *notes, "MP_API_KEY is not set"])
    )


def _path_candidates(cfg: DataConfig, env: Mapping[str, str]) -> list[tuple[str, str]]:
    """The local paths asked for, as (setting, path), AGD_DATA first."""
    found = [("AGD_DATA", env.get("AGD_DATA")), ("data.path", cfg.path)]
    return [(origin, given) for origin, given in found if given]


def _configured_path(cfg: DataConfig, env: Mapping[str, str]) -> tuple[str | None, str]:
    """The one local path for data.source 'local' (AGD_DATA overrides data.path) and its setting."""
    candidates = _path_candidates(cfg, env)
    return (candidates[0][1], candidates[0][0]) if candidates else (None, "")


# --------------------------------------------------------------------------------------------------
# local files


def load_local(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read a CSV (.csv, .csv.gz) or parquet file into the raw schema; ``columns`` maps file column -> standard name."""
    return _read_local(Path(path), columns or {})[0]


def _read_local(path: Path, columns: Mapping[str, str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """The raw table and the column map used (standard name -> column in the file)."""
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file (looked at {path.absolute()})")
    kind = _file_kind(path)
    try:
        if kind == "parquet":
            frame = pd.read_parquet(path)
            if not isinstance(frame.index, pd.RangeIndex):
                frame = frame.reset_index()  # a saved index (e.g. material_id) is data too
            mapping = _match_columns(list(frame.columns), columns, path)
        else:
            header = list(pd.read_csv(path, nrows=0).columns)
            mapping = _match_columns(header, columns, path)
            # Text columns are read verbatim so the formula "NaN" (sodium nitride) stays a formula;
            # every other column keeps pandas' usual missing-value markers and type inference.
            text = {mapping[c] for c in _TEXT_COLUMNS if c in mapping}
            frame = pd.read_csv(
                path,
                dtype=dict.fromkeys(text, str),
                keep_default_na=False,
                na_values={c: _CSV_NA for c in header if c not in text},
                low_memory=False,
            )
    except DataSourceError:
        raise
    except Exception as exc:  # parser, decompression, encoding and arrow errors all mean "unreadable"
        raise DataSourceError(f"{path}: could not read it as {kind} ({type(exc).__name__}: {exc})") from exc
    return _standardise(frame, mapping, str(path)), mapping


def _file_kind(path: Path) -> Literal["csv", "parquet"]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".parquet", ".pq"):
        return "parquet"
    if suffixes and (
        suffixes[-1] == ".csv" or (suffixes[-1] in _COMPRESSIONS and suffixes[-2:-1] == [".csv"])
    ):
        return "csv"
    raise DataSourceError(f"{path}: unsupported file type; use a .csv, .csv.gz or .parquet file")


def _normalise_name(name: object) -> str:
    """Lower case, with runs of spaces and dashes as one underscore: 'Gap PBE' -> 'gap_pbe'."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _match_columns(seen: list, user: Mapping[str, str], path: Path) -> dict[str, str]:
    """Map standard names to columns of the file: the user's ``data.columns`` first, then the aliases."""
    mapping: dict[str, str] = {}
    for source, standard in user.items():
        if standard not in MAPPABLE_COLUMNS:
            raise DataSourceError(
                f"params.yaml data.columns maps {source!r} to {standard!r}, which is not a standard column; "
                f"use one of: {', '.join(MAPPABLE_COLUMNS)}"
            )
        if standard in mapping:
            raise DataSourceError(
                f"params.yaml data.columns maps both {mapping[standard]!r} and {source!r} to {standard!r}"
            )
        found = _find_column(seen, source)
        if found is None:
            raise DataSourceError(
                f"params.yaml data.columns names the column {source!r}, but {path} has no such column. "
                f"Columns in the file: {_listing(seen)}"
            )
        mapping[standard] = found
    taken = set(mapping.values())
    for standard, aliases in COLUMN_ALIASES.items():
        if standard in mapping:
            continue
        for alias in aliases:
            hits = [c for c in seen if c not in taken and _normalise_name(c) == _normalise_name(alias)]
            if hits:
                mapping[standard] = hits[0]
                taken.add(hits[0])
                break
    missing = [name for name in _REQUIRED if name not in mapping]
    if missing:
        looked = "; ".join(f"{_LABELS[m]}: {', '.join(COLUMN_ALIASES[m])}" for m in missing)
        example = "\n".join(f"        <your {_LABELS[m]} column>: {m}" for m in missing)
        raise DataSourceError(
            f"{path}: no {' or '.join(_LABELS[m] for m in missing)} column found.\n"
            f"  Looked for (ignoring case, spaces and dashes) {looked}.\n"
            f"  Columns in the file: {_listing(seen)}.\n"
            f"  Map yours in params.yaml:\n    data:\n      columns:\n{example}"
        )
    return mapping


def _find_column(seen: list, name: str) -> str | None:
    """``name`` in ``seen``: exactly, else the one column equal after normalising."""
    if name in seen:
        return name
    hits = [c for c in seen if _normalise_name(c) == _normalise_name(name)]
    return hits[0] if len(hits) == 1 else None


def _listing(seen: list, limit: int = 40) -> str:
    if not seen:
        return "(none)"
    shown = ", ".join(repr(str(c)) for c in seen[:limit])
    return shown + (f", ... ({len(seen)} in all)" if len(seen) > limit else "")


def _standardise(frame: pd.DataFrame, mapping: Mapping[str, str], label: str) -> pd.DataFrame:
    """Rename the mapped columns to the raw schema, in order, and append the others unchanged."""
    n = len(frame)
    out: dict[str, Any] = {"row": np.arange(1, n + 1, dtype=np.int64)}
    for name in RAW_COLUMNS[1:]:
        source = mapping.get(name)
        if name in _NUMERIC_COLUMNS:
            out[name] = _as_float(frame[source], name, label) if source is not None else np.full(n, np.nan)
        else:
            out[name] = _as_optional_text(frame[source]) if source is not None else [None] * n
    if STRUCTURE_COLUMN in mapping:
        out[STRUCTURE_COLUMN] = _as_optional_text(frame[mapping[STRUCTURE_COLUMN]])
    used = set(mapping.values())
    for column in frame.columns:
        if column in used:
            continue
        # An unmapped column that shares a standard name (e.g. a second 'formula') keeps its data under a new name.
        name = f"source_{column}" if column in out or column in MAPPABLE_COLUMNS else column
        out[name] = frame[column].to_numpy()
    result = pd.DataFrame(out)
    for name in ("material_id", "formula", STRUCTURE_COLUMN):
        if name in result:
            result[name] = result[name].astype(object)
    return result


def _as_optional_text(series: pd.Series) -> list[str | None]:
    """Each value as text; missing values and empty cells become None."""
    values = []
    for value in series.to_numpy(dtype=object):
        if isinstance(value, str):
            values.append(value or None)
        elif value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            values.append(None)
        else:
            values.append(str(value))
    return values


def _as_float(series: pd.Series, name: str, label: str) -> np.ndarray:
    """Numbers as float; text that is not a number becomes NaN, with a warning naming a few examples."""
    numbers = pd.to_numeric(series, errors="coerce")
    values = np.asarray(numbers, dtype=float)
    bad = np.isnan(values) & series.notna().to_numpy()
    if bad.any():
        examples = ", ".join(repr(v) for v in series[bad].unique()[:3])
        log.warning(
            "%s: %d %s value(s) are not numbers and become NaN (e.g. %s)", label, bad.sum(), name, examples
        )
    return values


# --------------------------------------------------------------------------------------------------
# Materials Project


def fetch_mp(cfg: DataConfig, api_key: str | None) -> pd.DataFrame:
    """Download band gaps (and optionally structures) from the Materials Project summary endpoint."""
    return _fetch_mp(cfg, api_key)[0]


def _mprester_class() -> Any:
    if MPRester is not None:
        return MPRester
    try:
        from mp_api.client import MPRester as cls
    except ImportError as exc:
        raise DataSourceError(
            f"mp-api is not installed ({exc}); pip install mp-api, or {_LOCAL_HINT}"
        ) from None
    return cls


def _mp_query(cfg: DataConfig, search: Callable | None = None) -> dict[str, Any]:
    """The keyword arguments for ``materials.summary.search`` that ``cfg.mp`` asks for."""
    mp = cfg.mp
    fields = [*MP_FIELDS, "structure"] if mp.include_structure else list(MP_FIELDS)
    query: dict[str, Any] = {
        "fields": fields,
        "chunk_size": mp.chunk_size,
        "num_chunks": mp.num_chunks,
        "deprecated": False,
    }
    if mp.band_gap_min is not None or mp.band_gap_max is not None:
        query["band_gap"] = (mp.band_gap_min, mp.band_gap_max)  # mp-api drops a None bound
    # mp-api >= 0.45 mixes GNoMe r2SCAN entries into summary results by default; their gaps are not PBE gaps.
    if search is not None and "include_gnome" in _parameters(search):
        query["include_gnome"] = bool(getattr(mp, "include_gnome", False))
    return query


def _parameters(func: Callable) -> set[str]:
    try:
        return set(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return set()


def _fetch_mp(cfg: DataConfig, api_key: str | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The MP table and what was asked for (query, database version); the key appears in neither."""
    if not api_key:
        raise DataSourceError(
            "data.source is 'mp' but MP_API_KEY is not set. Get a key at "
            f"https://next-gen.materialsproject.org/api and export MP_API_KEY. Or: {_LOCAL_HINT}"
        )
    rester_class = _mprester_class()
    try:
        with rester_class(api_key=api_key) as mpr:
            search = mpr.materials.summary.search
            query = _mp_query(cfg, search)
            log.info(
                "downloading from the Materials Project: %s",
                {k: v for k, v in query.items() if k != "fields"},
            )
            docs = list(search(**query))
            db_version = getattr(mpr, "db_version", None)
    except DataSourceError:
        raise
    except Exception as exc:
        raise _mp_error(exc, api_key) from None  # no chaining: the original may carry the key
    frame = _mp_docs_to_frame(docs, cfg.mp.include_structure)
    info = {"query": query, "db_version": str(db_version) if db_version is not None else None}
    return frame, info


def _mp_error(exc: Exception, api_key: str) -> DataSourceError:
    """One actionable message for an MP failure, with the key masked out."""
    text = f"{type(exc).__name__}: {exc}".replace(api_key, "<MP_API_KEY>")
    text = " ".join(text.split())
    if len(text) > 400:
        text = text[:400] + " ..."
    lower = text.replace("<MP_API_KEY>", "").lower()
    if re.search(r"\b(401|403)\b", lower) or any(
        s in lower for s in ("api key", "api_key", "unauthorized", "forbidden")
    ):
        what = "the Materials Project API did not accept the key in MP_API_KEY"
    elif isinstance(exc, OSError) or any(
        s in lower for s in ("connection", "timed out", "max retries", "resolve")
    ):
        what = "could not reach the Materials Project API"
    else:
        what = "the Materials Project download failed"
    return DataSourceError(f"{what} ({text}). {_LOCAL_HINT}, or use data.source: matbench")


def _doc_field(doc: Any, name: str) -> Any:
    if isinstance(doc, Mapping):
        return doc.get(name)
    return getattr(doc, name, None)


def _mp_docs_to_frame(docs: list, include_structure: bool) -> pd.DataFrame:
    """Summary documents (objects or dicts) -> the raw schema; structures become CIF strings."""
    records = {name: [] for name in RAW_COLUMNS[1:]}
    cifs: list[str | None] = []
    for doc in docs:
        material_id = _doc_field(doc, "material_id")
        records["material_id"].append(str(material_id) if material_id is not None else None)
        records["formula"].append(_doc_field(doc, "formula_pretty"))
        for name in _NUMERIC_COLUMNS:
            value = _doc_field(doc, name)
            records[name].append(float(value) if value is not None else np.nan)
        if include_structure:
            cifs.append(_to_cif(_doc_field(doc, "structure")))
    out: dict[str, Any] = {"row": np.arange(1, len(docs) + 1, dtype=np.int64)}
    for name in RAW_COLUMNS[1:]:
        out[name] = pd.Series(records[name], dtype=float if name in _NUMERIC_COLUMNS else object)
    if include_structure:
        out[STRUCTURE_COLUMN] = pd.Series(cifs, dtype=object)
    return pd.DataFrame(out)


def _to_cif(structure: Any) -> str | None:
    """A pymatgen Structure (or its dict) as a P1 CIF string; None stays None."""
    if structure is None:
        return None
    if isinstance(structure, Mapping):
        from pymatgen.core import Structure

        structure = Structure.from_dict(structure)
    return structure.to(fmt="cif")


# --------------------------------------------------------------------------------------------------
# matbench (matminer)


def fetch_matbench(include_structure: bool = False) -> pd.DataFrame:
    """Load matminer's ``matbench_mp_gap`` (download or local cache); formulas from the structures."""
    return _fetch_matbench(include_structure)[0]


def _matminer_loader() -> Any:
    if load_dataset is not None:
        return load_dataset
    try:
        from matminer.datasets import load_dataset as loader
    except ImportError as exc:
        raise DataSourceError(
            f"matminer is not installed ({exc}); pip install matminer, or {_LOCAL_HINT}"
        ) from None
    return loader


def _fetch_matbench(include_structure: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    loader = _matminer_loader()
    try:
        raw = loader(MATBENCH_DATASET)
    except Exception as exc:
        cache = os.environ.get("MATMINER_DATA", "matminer's package folder")
        raise DataSourceError(
            f"could not load the matminer dataset {MATBENCH_DATASET} ({type(exc).__name__}: {exc}). "
            f"Without internet, point agd at a local file instead: AGD_DATA=path/to/file.csv, or "
            f"data.source: local and data.path in params.yaml (e.g. a copy of matbench_mp_gap.csv), "
            f"or put {MATBENCH_DATASET}.json.gz in the matminer cache ({cache}; a half-downloaded file "
            f"there must be deleted first)"
        ) from exc
    missing = [c for c in ("structure", "gap pbe") if c not in raw.columns]
    if missing:
        raise DataSourceError(
            f"matminer's {MATBENCH_DATASET} has no {', '.join(missing)} column (columns: {_listing(list(raw.columns))})"
        )
    raw = raw.reset_index(drop=True)
    structures = [_as_structure(s) for s in raw["structure"]]
    frame = pd.DataFrame(
        {
            "row": np.arange(1, len(raw) + 1, dtype=np.int64),
            "material_id": pd.Series([None] * len(raw), dtype=object),
            # The cell formula, as CrabNet's matbench CSV has it: "K4 Mn4 O8" -> "K4Mn4O8".
            "formula": pd.Series([s.composition.formula.replace(" ", "") for s in structures], dtype=object),
            "band_gap": _as_float(raw["gap pbe"], "band_gap", MATBENCH_DATASET),
            "formation_energy_per_atom": np.full(len(raw), np.nan),
            "energy_above_hull": np.full(len(raw), np.nan),
        }
    )
    if include_structure:
        frame[STRUCTURE_COLUMN] = pd.Series([s.to(fmt="cif") for s in structures], dtype=object)
    for column in raw.columns:
        if column not in ("structure", "gap pbe"):
            frame[f"source_{column}" if column in frame else column] = raw[column].to_numpy()
    return frame, {"dataset": MATBENCH_DATASET, **_matbench_metadata()}


def _as_structure(value: Any) -> Any:
    if isinstance(value, Mapping):
        from pymatgen.core import Structure

        return Structure.from_dict(value)
    return value


def _matbench_metadata() -> dict[str, Any]:
    """matminer's recorded download URL and file hash for the dataset (best effort)."""
    try:
        from matminer.datasets import get_dataset_attribute

        return {
            "url": get_dataset_attribute(MATBENCH_DATASET, "url"),
            "file_sha256": get_dataset_attribute(MATBENCH_DATASET, "hash"),
        }
    except Exception:  # metadata is a nicety; the table is what matters
        return {}


# --------------------------------------------------------------------------------------------------
# dispatcher


def fetch(cfg: DataConfig, env: Mapping[str, str] = os.environ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Resolve and read the raw table; also return its provenance (JSON-ready, never the API key)."""
    source = resolve_source(cfg, env)
    log.info("raw data source: %s (%s)", source.kind, source.reason)
    provenance: dict[str, Any] = {"kind": source.kind, "reason": source.reason, "path": None, "sha256": None}
    if source.kind == "local":
        assert source.path is not None
        frame, mapping = _read_local(source.path, cfg.columns)
        provenance.update(
            path=str(source.path),
            sha256=file_sha256(source.path),
            size_bytes=source.path.stat().st_size,
            column_map=dict(mapping),
        )
    elif source.kind == "mp":
        frame, info = _fetch_mp(cfg, env.get("MP_API_KEY"))
        provenance["mp"] = info
    else:
        frame, info = _fetch_matbench(cfg.mp.include_structure)
        provenance["matbench"] = info
    provenance.update(rows=len(frame), columns=[str(c) for c in frame.columns], versions=package_versions())
    if source.kind != "local":
        # a download's date matters; a local file is identified by its hash, which keeps re-runs byte-identical
        provenance["retrieved_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return frame, provenance


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages that shape the raw table (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("agd", "pandas", "pyarrow", "pymatgen", "mp-api", "matminer"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
