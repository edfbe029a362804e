"""Nearest known structure for a formula: ElMD among templates with the same stoichiometric pattern.

Templates are indexed by their anonymised reduced formula (``ABC3``), so a candidate is compared only
with compositions it can be mapped onto site for site. The ElMD objects are built once per template;
for the Pettifor-scale metrics (``mod_petti``, ``fast``) ElMD is a 1-D earth mover's distance,
``sum |cumsum(p - q)|`` over the element scale, so a whole pattern group is scored in one NumPy
expression (a test checks it against ``ElMD.elmd``). Other metrics fall back to ``ElMD.elmd`` per pair.

CIF text is parsed only when a template is picked, so a corrupt CIF costs nothing until it is needed
and then gives a per-candidate status instead of failing the index.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition, Structure

from agd.chem.formula import formula_key

log = logging.getLogger(__name__)

#: Metrics whose ElMD is the 1-D cumulative-sum distance over ElMD's feature vector.
_LINEAR_METRICS = ("mod_petti", "fast")
_CIF_COLUMNS = ("cif", "structure", "cif_string")
_ID_COLUMNS = ("material_id", "template_id", "id", "mp_id")
_FORMULA_COLUMNS = ("reduced_formula", "formula", "pretty_formula", "composition")
#: Columns of a template table (:func:`read_template_table`, :func:`fetch_mp_templates`).
TEMPLATE_COLUMNS = [
    "template_id",
    "reduced_formula",
    "cif",
    "e_above_hull",
    "formation_energy_per_atom",
    "source",
]


def _elmd_class():
    """Import ElMD quietly (it imports the deprecated pkg_resources)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ElMD import ElMD
    return ElMD


def anonymous_formula(formula: str) -> str:
    """The stoichiometric pattern of a formula, e.g. ``SrTiO3 -> ABC3`` (reduced, pymatgen's order)."""
    return Composition(formula).reduced_composition.anonymized_formula


@dataclass(frozen=True)
class TemplateMatch:
    """One template proposed for a candidate, with its ElMD distance."""

    template_id: str
    template_formula: str
    distance: float
    source: str
    cif: str
    e_above_hull: float | None

    def structure(self) -> Structure:
        """Parse the template CIF (raises on a corrupt CIF)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(self.cif, fmt="cif")
        if len(structure) == 0:
            raise ValueError("CIF has no sites")
        structure.remove_oxidation_states()
        return structure


def read_template_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV/parquet template file into columns template_id, reduced_formula, cif, e_above_hull, source."""
    path = Path(path)
    if path.suffix == ".parquet":
        raw = pd.read_parquet(path)
    else:
        raw = pd.read_csv(path, keep_default_na=False, na_values=[""])
    cif_col = next((c for c in _CIF_COLUMNS if c in raw.columns), None)
    formula_col = next((c for c in _FORMULA_COLUMNS if c in raw.columns), None)
    if cif_col is None or formula_col is None:
        raise ValueError(
            f"{path}: a template table needs a CIF column ({', '.join(_CIF_COLUMNS)}) and a formula column "
            f"({', '.join(_FORMULA_COLUMNS)}); got {list(raw.columns)}"
        )
    id_col = next((c for c in _ID_COLUMNS if c in raw.columns), None)
    ids = raw[id_col].astype(str) if id_col else pd.Series([f"{path.name}:{i}" for i in range(len(raw))])
    ehull = raw["e_above_hull"] if "e_above_hull" in raw.columns else pd.Series(np.nan, index=raw.index)
    fe = (
        raw["formation_energy_per_atom"]
        if "formation_energy_per_atom" in raw.columns
        else pd.Series(np.nan, index=raw.index)
    )
    return pd.DataFrame(
        {
            "template_id": ids.to_numpy(),
            "reduced_formula": raw[formula_col].astype(str).to_numpy(),
            "cif": raw[cif_col].astype(str).to_numpy(),
            "e_above_hull": pd.to_numeric(ehull, errors="coerce").to_numpy(),
            "formation_energy_per_atom": pd.to_numeric(fe, errors="coerce").to_numpy(),
            "source": path.name,
        }
    )


def fetch_mp_templates(
    patterns: Sequence[str], api_key: str, max_e_above_hull: float | None = None, client=None
) -> pd.DataFrame:
    """Download MP structures of the given anonymised patterns with mp-api, as a template table."""
    if client is None:
        from mp_api.client import MPRester

        client = MPRester(api_key)
    rows = []
    with client as mpr:
        for pattern in sorted(set(patterns)):
            kwargs = {
                "formula": pattern,
                "fields": [
                    "material_id",
                    "formula_pretty",
                    "structure",
                    "energy_above_hull",
                    "formation_energy_per_atom",
                ],
            }
            if max_e_above_hull is not None:
                kwargs["energy_above_hull"] = (0.0, max_e_above_hull)
            for doc in mpr.materials.summary.search(**kwargs):
                rows.append(
                    {
                        "template_id": str(doc.material_id),
                        "reduced_formula": doc.formula_pretty,
                        "cif": doc.structure.to(fmt="cif"),
                        "e_above_hull": doc.energy_above_hull,
                        "formation_energy_per_atom": doc.formation_energy_per_atom,
                        "source": "mp-api",
                    }
                )
    return pd.DataFrame(rows, columns=TEMPLATE_COLUMNS)


class TemplateLibrary:
    """Templates indexed by anonymised formula, with ElMD vectors built once; query with :meth:`nearest`."""

    def __init__(self, table: pd.DataFrame, metric: str = "mod_petti", max_e_above_hull: float | None = None):
        """Index a template table (columns as :func:`read_template_table`); unparsable formulas are skipped."""
        self.metric = metric
        ElMD = _elmd_class()
        table = table.reset_index(drop=True)
        if max_e_above_hull is not None and "e_above_hull" in table.columns:
            ehull = pd.to_numeric(table["e_above_hull"], errors="coerce")
            table = table[~(ehull > max_e_above_hull)].reset_index(drop=True)
        keep, patterns, keys, vectors, objects = [], [], [], [], []
        self.skipped: list[tuple[str, str]] = []
        for i, formula in enumerate(table["reduced_formula"]):
            try:
                key = formula_key(str(formula))  # rejects unknown elements, which pymatgen may let through
                comp = Composition(key).reduced_composition
                elmd = ElMD(comp.formula.replace(" ", ""), metric=metric)
            except Exception as exc:  # a bad row must not sink the library
                self.skipped.append((str(table["template_id"].iloc[i]), f"{formula!r}: {exc}"))
                continue
            keep.append(i)
            patterns.append(comp.anonymized_formula)
            keys.append(key)
            objects.append(elmd)
            if metric in _LINEAR_METRICS:
                vectors.append(np.asarray(elmd.feature_vector, dtype=float))
        if self.skipped:
            log.warning(
                "%d template rows skipped (unparsable formula), e.g. %s", len(self.skipped), self.skipped[0]
            )
        self.table = table.iloc[keep].reset_index(drop=True)
        self.table["pattern"] = patterns
        self.table["composition_key"] = keys
        self._objects = objects
        self._vectors = np.vstack(vectors) if vectors else None
        self._groups: dict[str, np.ndarray] = {
            pattern: np.asarray(index)
            for pattern, index in self.table.groupby("pattern", sort=False).indices.items()
        }

    def __len__(self) -> int:
        return len(self.table)

    @cached_property
    def patterns(self) -> dict[str, int]:
        """Templates per anonymised pattern."""
        return {pattern: len(index) for pattern, index in self._groups.items()}

    @classmethod
    def from_sources(
        cls,
        sources: Sequence[str | os.PathLike],
        metric: str = "mod_petti",
        max_e_above_hull: float | None = None,
        extra: pd.DataFrame | None = None,
    ) -> TemplateLibrary:
        """Build the library from template files (missing files are skipped with a warning) and an extra table."""
        tables = []
        for source in sources:
            if not Path(source).is_file():
                log.warning("template source %s does not exist; skipped", source)
                continue
            tables.append(read_template_table(source))
        if extra is not None and len(extra):
            tables.append(extra)
        if not tables:
            # every candidate then gets 'no_template'; the stage reports it rather than failing
            log.warning("no template source found among %s; the library is empty", list(sources))
            tables.append(pd.DataFrame(columns=TEMPLATE_COLUMNS))
        return cls(pd.concat(tables, ignore_index=True), metric=metric, max_e_above_hull=max_e_above_hull)

    def exclude(self, formulas: Sequence[str]) -> TemplateLibrary:
        """A copy without the templates of these compositions (for leave-out validation)."""
        drop = {formula_key(f) for f in formulas}
        mask = ~self.table["composition_key"].isin(drop).to_numpy()
        clone = object.__new__(TemplateLibrary)
        clone.metric = self.metric
        clone.skipped = list(self.skipped)
        index = np.flatnonzero(mask)
        clone.table = self.table.iloc[index].reset_index(drop=True)
        clone._objects = [self._objects[i] for i in index]
        clone._vectors = self._vectors[index] if self._vectors is not None else None
        clone._groups = {
            pattern: np.asarray(rows)
            for pattern, rows in clone.table.groupby("pattern", sort=False).indices.items()
        }
        return clone

    def distances(self, formula: str) -> tuple[np.ndarray, np.ndarray]:
        """Template row indices of the formula's pattern and their ElMD distances (empty when none)."""
        pattern = anonymous_formula(formula)
        rows = self._groups.get(pattern)
        if rows is None:
            return np.empty(0, dtype=int), np.empty(0)
        ElMD = _elmd_class()
        query = ElMD(Composition(formula).reduced_composition.formula.replace(" ", ""), metric=self.metric)
        if self._vectors is not None:
            diff = np.asarray(query.feature_vector, dtype=float)[None, :] - self._vectors[rows]
            dist = np.abs(np.cumsum(diff, axis=1)).sum(axis=1)
        else:
            dist = np.array([query.elmd(self._objects[i]) for i in rows], dtype=float)
        return rows, dist

    def nearest(self, formula: str, k: int = 1) -> list[TemplateMatch]:
        """Up to ``k`` templates of the same pattern, nearest first (ties: more stable, fewer sites, id)."""
        rows, dist = self.distances(formula)
        if len(rows) == 0:
            return []
        sub = self.table.iloc[rows]
        ehull = pd.to_numeric(sub["e_above_hull"], errors="coerce").fillna(np.inf).to_numpy()
        n_chars = sub["cif"].str.len().to_numpy()  # a proxy for cell size, without parsing the CIF
        # round distances so that float noise does not beat the stability tie-break
        order = np.lexsort((sub["template_id"].to_numpy(), n_chars, ehull, np.round(dist, 9)))[:k]
        out = []
        for j in order:
            row = sub.iloc[j]
            ehull_j = row["e_above_hull"]
            out.append(
                TemplateMatch(
                    template_id=str(row["template_id"]),
                    template_formula=str(row["composition_key"]),
                    distance=float(dist[j]),
                    source=str(row["source"]),
                    cif=str(row["cif"]),
                    e_above_hull=None if pd.isna(ehull_j) else float(ehull_j),
                )
            )
        return out
