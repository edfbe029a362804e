"""Put a candidate's elements into its template's structure and write one CIF per candidate.

The template and the candidate share an anonymised formula, so their reduced amounts match as
multisets. Elements are paired by amount; where several elements share an amount, they are paired in
Pettifor (Mendeleev-number) order, which pairs chemically similar elements (alkali with alkali, anion
with anion). The cell is then scaled by the ratio of the summed atomic volumes (from atomic radii),
a first guess that the CHGNet relaxation refines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from pymatgen.core import Composition, Element, Structure
from pymatgen.io.cif import CifWriter
from pymatgen.transformations.standard_transformations import SubstitutionTransformation
from tqdm.auto import tqdm

from agd.chem.formula import FormulaError, formula_key
from agd.config import StructuresConfig
from agd.structures.templates import TemplateLibrary, anonymous_formula

log = logging.getLogger(__name__)

OK = "ok"
UNPARSABLE = "unparsable"
NO_TEMPLATE = "no_template"
BAD_TEMPLATE = "bad_template"
SUBSTITUTION_FAILED = "substitution_failed"

#: Columns of the structures table written by :func:`build_structures` (catalog ``structures`` + working columns).
STRUCTURE_COLUMNS = [
    "formula",
    "reduced_formula",
    "pattern",
    "template_id",
    "template_formula",
    "template_source",
    "elmd_distance",
    "status",
    "message",
    "cif",
    "cif_path",
    "n_sites",
    "volume_scale",
    "gap_window",
]
_FORMULA_INPUT_COLUMNS = ("reduced_formula", "formula", "composition", "pretty_formula")


def _amounts(formula: str) -> dict[str, float]:
    # atomic fractions, not reduced amounts: pymatgen keeps diatomic gases as "N2", which would not pair with "C"
    comp = Composition(formula).fractional_composition
    return {el.symbol: float(amount) for el, amount in comp.items()}


def _pettifor(symbol: str) -> float:
    number = Element(symbol).mendeleev_no
    return float(number) if number is not None else float(Element(symbol).Z)


def element_mapping(template_formula: str, candidate_formula: str) -> dict[str, str]:
    """Template element -> candidate element, paired by reduced amount, ties in Pettifor order."""
    template, candidate = _amounts(template_formula), _amounts(candidate_formula)

    def groups(amounts: dict[str, float]) -> dict[float, list[str]]:
        out: dict[float, list[str]] = {}
        for symbol, amount in amounts.items():
            out.setdefault(round(amount, 6), []).append(symbol)
        return {amount: sorted(symbols, key=lambda s: (_pettifor(s), s)) for amount, symbols in out.items()}

    t_groups, c_groups = groups(template), groups(candidate)
    if {k: len(v) for k, v in t_groups.items()} != {k: len(v) for k, v in c_groups.items()}:
        raise ValueError(f"{candidate_formula} and {template_formula} do not share a stoichiometric pattern")
    return {t: c for amount in t_groups for t, c in zip(t_groups[amount], c_groups[amount], strict=True)}


def _radius(symbol: str) -> float:
    element = Element(symbol)
    for value in (element.atomic_radius, element.atomic_radius_calculated, element.average_ionic_radius):
        if value is not None and float(value) > 0:
            return float(value)
    return 1.5


def substitute(
    template: Structure, mapping: dict[str, str], volume_scaling: str = "atomic_radius"
) -> tuple[Structure, float]:
    """Apply the element mapping to a template and rescale its cell; returns (structure, volume ratio)."""
    structure = SubstitutionTransformation(dict(mapping)).apply_transformation(template)
    ratio = 1.0
    if volume_scaling == "atomic_radius":
        old = sum(_radius(site.specie.symbol) ** 3 for site in template)
        new = sum(_radius(site.specie.symbol) ** 3 for site in structure)
        ratio = new / old
        structure.scale_lattice(template.volume * ratio)
    return structure, ratio


def cif_name(formula: str) -> str:
    """A file-system-safe file stem for a formula."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", formula) or "formula"


def read_formula_input(
    path: str | os.PathLike, gap_window: str | None = None, max_candidates: int | None = None
) -> pd.DataFrame:
    """Candidate formulas from screening hits or any CSV/parquet/txt list: columns formula, gap_window.

    Hits are reduced to unique reduced formulas, the ones found by most (model, experiment) rows first;
    ``gap_window`` keeps one window; ``max_candidates`` caps the count. Unparsable entries are kept
    (their status says why) so they are never silently lost.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix in (".csv", ".gz"):
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    else:
        lines = [line.strip() for line in path.read_text().splitlines()]
        table = pd.DataFrame({"formula": [line for line in lines if line and not line.startswith("#")]})
    column = next((c for c in _FORMULA_INPUT_COLUMNS if c in table.columns), None)
    if column is None:
        if table.shape[1] == 1:
            column = table.columns[0]
        else:
            raise ValueError(
                f"{path}: no formula column ({', '.join(_FORMULA_INPUT_COLUMNS)}) in {list(table.columns)}"
            )
    if gap_window is not None:
        if "gap_window" not in table.columns:
            raise ValueError(
                f"{path}: gap_window={gap_window!r} asked for but the table has no gap_window column"
            )
        table = table[table["gap_window"].astype(str) == gap_window]
    windows = (
        table["gap_window"].astype(str) if "gap_window" in table.columns else pd.Series("", index=table.index)
    )
    keys = []
    for text in table[column]:
        try:
            keys.append(formula_key(text))
        except (FormulaError, TypeError):
            keys.append(f"?{text}")  # keep it, so the stage can report it
    frame = pd.DataFrame(
        {"key": keys, "formula": table[column].astype(str).to_numpy(), "gap_window": windows.to_numpy()}
    )
    grouped = (
        frame.groupby("key", sort=False)
        .agg(
            formula=("formula", "first"),
            n_hits=("formula", "size"),
            gap_window=("gap_window", lambda w: ",".join(sorted({x for x in w if x and x != "nan"}))),
        )
        .reset_index()
    )
    grouped["formula"] = [
        k if not k.startswith("?") else f for k, f in zip(grouped["key"], grouped["formula"], strict=True)
    ]
    grouped = grouped.sort_values(["n_hits", "key"], ascending=[False, True], kind="stable")
    if max_candidates is not None:
        grouped = grouped.head(max_candidates)
    return grouped[["formula", "gap_window", "n_hits"]].reset_index(drop=True)


def structure_for(
    formula: str, library: TemplateLibrary, cfg: StructuresConfig
) -> tuple[dict, Structure | None]:
    """Template search and substitution for one formula: a result row and the structure (None on failure)."""
    row: dict = {"formula": formula, "status": None, "message": ""}
    try:
        key = formula_key(formula)
        pattern = anonymous_formula(key)
    except Exception as exc:
        row.update(status=UNPARSABLE, message=str(exc))
        return row, None
    row.update(reduced_formula=key, pattern=pattern)
    matches = library.nearest(key, k=cfg.max_template_tries)
    if not matches:
        row.update(status=NO_TEMPLATE, message=f"no template with pattern {pattern}")
        return row, None
    problems = []
    for match in matches:
        row.update(
            template_id=match.template_id,
            template_formula=match.template_formula,
            template_source=match.source,
            elmd_distance=match.distance,
        )
        try:
            template = match.structure()
        except Exception as exc:  # corrupt CIF: note it and try the next-nearest template
            problems.append(f"template {match.template_id}: unreadable CIF ({type(exc).__name__}: {exc})")
            continue
        try:
            mapping = element_mapping(template.composition.reduced_formula, key)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure, ratio = substitute(template, mapping, cfg.volume_scaling)
        except Exception as exc:
            problems.append(
                f"template {match.template_id}: substitution failed ({type(exc).__name__}: {exc})"
            )
            row.update(status=SUBSTITUTION_FAILED)
            continue
        if not math.isfinite(structure.volume) or structure.volume <= 0:
            problems.append(f"template {match.template_id}: non-positive volume after scaling")
            continue
        row.update(
            status=OK,
            message="; ".join(problems),
            n_sites=len(structure),
            volume_scale=ratio,
            mapping=",".join(f"{a}->{b}" for a, b in mapping.items()),
        )
        return row, structure
    row.update(status=row["status"] or BAD_TEMPLATE, message="; ".join(problems))
    return row, None


def build_structures(
    candidates: pd.DataFrame,
    library: TemplateLibrary,
    cfg: StructuresConfig,
    cif_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Template structures for a table of candidates (column formula); one row per candidate, with a status."""
    rows = []
    if cif_dir is not None:
        cif_dir = Path(cif_dir)
        cif_dir.mkdir(parents=True, exist_ok=True)
    for record in tqdm(
        candidates.to_dict("records"), desc="structures", disable=not progress, unit="formula"
    ):
        row, structure = structure_for(str(record["formula"]), library, cfg)
        row["gap_window"] = record.get("gap_window", "") or ""
        if structure is not None:
            row["cif"] = str(CifWriter(structure))
            if cif_dir is not None:
                path = cif_dir / f"{cif_name(row['reduced_formula'])}.cif"
                path.write_text(row["cif"])
                row["cif_path"] = path.as_posix()
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in [*STRUCTURE_COLUMNS, "mapping"]:
        if column not in table.columns:
            table[column] = None
    table["elmd_distance"] = pd.to_numeric(table["elmd_distance"], errors="coerce")
    table["volume_scale"] = pd.to_numeric(table["volume_scale"], errors="coerce")
    table["n_sites"] = pd.to_numeric(table["n_sites"], errors="coerce").astype("Int64")
    return table[[*STRUCTURE_COLUMNS, "mapping"]]


def structure_summary(table: pd.DataFrame) -> dict:
    """Counts per status and the ElMD distance distribution of the found templates (for metrics)."""
    ok = table[table["status"] == OK]
    dist = ok["elmd_distance"].dropna()
    return {
        "n_candidates": len(table),
        "n_ok": len(ok),
        "status": {str(k): int(v) for k, v in table["status"].value_counts().items()},
        "elmd_distance_mean": float(dist.mean()) if len(dist) else None,
        "elmd_distance_median": float(dist.median()) if len(dist) else None,
        "exact_template": int((dist == 0).sum()),
    }


def load_templates(
    cfg: StructuresConfig, patterns: Sequence[str] = (), mp_client=None
) -> tuple[TemplateLibrary, dict]:
    """The template library from the configured files, plus MP templates of ``patterns`` when enabled."""
    extra, info = None, {"sources": [s for s in cfg.template_sources if Path(s).is_file()], "mp": "off"}
    api_key = os.environ.get("MP_API_KEY")
    use_mp = cfg.mp_templates == "on" or (cfg.mp_templates == "auto" and (api_key or mp_client is not None))
    if use_mp and patterns:
        from agd.structures.templates import fetch_mp_templates

        try:
            extra = fetch_mp_templates(patterns, api_key or "", cfg.max_e_above_hull, client=mp_client)
            info["mp"] = f"{len(extra)} templates"
        except Exception as exc:  # offline or a bad key: local templates still work
            if cfg.mp_templates == "on":
                raise
            log.warning("Materials Project templates unavailable (%s); using local files only", exc)
            info["mp"] = f"unavailable: {exc}"
    library = TemplateLibrary.from_sources(
        cfg.template_sources, metric=cfg.metric, max_e_above_hull=cfg.max_e_above_hull, extra=extra
    )
    info["n_templates"] = len(library)
    info["n_patterns"] = len(library.patterns)
    return library, info


def run_structures_stage(
    formulas_path: str | os.PathLike,
    out: str | os.PathLike,
    cif_dir: str | os.PathLike,
    cfg: StructuresConfig,
    mp_client=None,
) -> dict:
    """The ``agd structures`` stage: read candidates, find templates, substitute, write table and CIFs; returns metrics."""
    out, cif_dir = Path(out), Path(cif_dir)
    if cif_dir.exists():
        for stale in cif_dir.glob("*.cif"):  # the folder mirrors this run's table exactly
            stale.unlink()
    candidates = read_formula_input(formulas_path, cfg.gap_window, cfg.max_candidates)
    patterns = []
    for formula in candidates["formula"]:
        with contextlib.suppress(Exception):
            patterns.append(anonymous_formula(formula))
    library, info = load_templates(cfg, patterns, mp_client=mp_client)
    table = build_structures(candidates, library, cfg, cif_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out)
    metrics = structure_summary(table)
    metrics.update(
        input=str(formulas_path),
        n_templates=info["n_templates"],
        n_patterns=info["n_patterns"],
        mp_templates=info["mp"],
    )
    return metrics
