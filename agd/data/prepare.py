"""Validate, reject with reasons, de-duplicate, filter and split a raw band-gap table.

Input is the raw schema of :mod:`agd.data.sources` (row, material_id, formula, band_gap, ...).
Nothing here raises on a bad row: every rejected row lands in the rejects table with its source row
number and the reason, and the other rows go on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from agd.chem.formula import FormulaError, FormulaRules, parse_formula, reduce_counts, reduced_formula
from agd.config import PrepareConfig

#: Column order of the prepared dataset; extra source columns follow.
PREPARED_COLUMNS = [
    "row",
    "material_id",
    "formula",
    "reduced_formula",
    "n_elements",
    "n_atoms",
    "max_count",
    "band_gap",
    "formation_energy_per_atom",
    "energy_above_hull",
    "split",
    "n_merged",
]
REJECT_COLUMNS = ["row", "formula", "band_gap", "stage", "code", "reason"]
_RAW_CORE = ["row", "material_id", "formula", "band_gap", "formation_energy_per_atom", "energy_above_hull"]


@dataclass
class Prepared:
    """Result of :func:`prepare_dataset`: the clean table, the rejects and a JSON-ready summary."""

    dataset: pd.DataFrame
    rejects: pd.DataFrame
    summary: dict


def _validate_rows(raw: pd.DataFrame, rules: FormulaRules) -> tuple[pd.DataFrame, list[dict]]:
    """Parse formulas and check gaps; return the good rows (with composition columns) and rejects."""
    rejects: list[dict] = []
    keep = np.zeros(len(raw), dtype=bool)
    keys: list[str | None] = [None] * len(raw)
    n_elements = np.zeros(len(raw), dtype=np.int64)
    n_atoms = np.zeros(len(raw), dtype=np.int64)
    max_count = np.zeros(len(raw), dtype=np.int64)
    gaps = pd.to_numeric(raw["band_gap"], errors="coerce").to_numpy(dtype=float)
    formulas = raw["formula"].to_numpy(dtype=object)
    rows = raw["row"].to_numpy()
    for i, (text, gap) in enumerate(zip(formulas, gaps, strict=True)):
        try:
            counts = reduce_counts(parse_formula(text, rules))
        except FormulaError as exc:
            rejects.append(_reject(rows[i], text, gap, "validate", exc.code, str(exc)))
            continue
        if not np.isfinite(gap):
            original = raw["band_gap"].iloc[i]
            shown = (
                "missing"
                if original is None or (isinstance(original, float) and np.isnan(original))
                else repr(original)
            )
            rejects.append(
                _reject(
                    rows[i], text, gap, "validate", "bad_gap", f"band gap is not a finite number ({shown})"
                )
            )
            continue
        if gap < 0:
            rejects.append(
                _reject(rows[i], text, gap, "validate", "negative_gap", f"negative band gap {gap:g} eV")
            )
            continue
        keep[i] = True
        keys[i] = reduced_formula(counts)
        n_elements[i] = len(counts)
        n_atoms[i] = sum(counts.values())
        max_count[i] = max(counts.values())
    good = raw.loc[keep].copy()
    good["band_gap"] = gaps[keep]
    good["reduced_formula"] = [k for k, ok in zip(keys, keep, strict=True) if ok]
    good["n_elements"] = n_elements[keep]
    good["n_atoms"] = n_atoms[keep]
    good["max_count"] = max_count[keep]
    return good, rejects


def _reject(row, formula, gap, stage: str, code: str, reason: str) -> dict:
    return {
        "row": int(row),
        "formula": "" if formula is None else str(formula),
        "band_gap": float(gap) if gap is not None and np.isfinite(gap) else np.nan,
        "stage": stage,
        "code": code,
        "reason": reason,
    }


def _apply_filters(good: pd.DataFrame, cfg: PrepareConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Drop rows outside the configured size/chemistry limits, recording which filter dropped each."""
    f = cfg.filters
    checks: list[tuple[str, pd.Series, str]] = []
    if f.gap_positive_only:
        checks.append(
            ("gap_not_positive", good["band_gap"] <= 0, "band gap is 0 (metal) and gap_positive_only is set")
        )
    if f.exclude_elements:
        excluded = set(f.exclude_elements)
        hit = good["reduced_formula"].map(lambda k: bool(excluded & set(_symbols(k))))
        checks.append(
            ("excluded_element", hit, f"contains an excluded element ({', '.join(sorted(excluded))})")
        )
    if f.max_elements is not None:
        checks.append(
            ("too_many_elements", good["n_elements"] > f.max_elements, f"more than {f.max_elements} elements")
        )
    if f.max_atoms is not None:
        checks.append(
            (
                "too_many_atoms",
                good["n_atoms"] > f.max_atoms,
                f"more than {f.max_atoms} atoms per formula unit",
            )
        )
    if f.max_atoms_per_element is not None:
        checks.append(
            (
                "too_many_atoms_per_element",
                good["max_count"] > f.max_atoms_per_element,
                f"an element has more than {f.max_atoms_per_element} atoms",
            )
        )
    dropped = pd.Series(False, index=good.index)
    rejects: list[dict] = []
    for code, mask, reason in checks:
        new = mask & ~dropped  # each row is reported under the first filter that drops it
        for _, r in good.loc[new].iterrows():
            rejects.append(_reject(r["row"], r["formula"], r["band_gap"], "filter", code, reason))
        dropped |= mask
    return good.loc[~dropped].copy(), rejects


_SYMBOL = re.compile(r"[A-Z][a-z]?")


def _symbols(key: str) -> list[str]:
    return _SYMBOL.findall(key)


def _deduplicate(good: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, str]:
    """One row per reduced composition, chosen by ``policy``; returns the table and the policy used."""
    sizes = good.groupby("reduced_formula", sort=False)["row"].transform("size")
    has_energy = good["formation_energy_per_atom"].notna().any()
    used = policy
    if policy == "auto":
        used = "lowest_formation_energy" if has_energy else "median_gap"
    ordered = good.assign(n_merged=sizes.to_numpy())
    if used == "first":
        out = ordered.drop_duplicates("reduced_formula", keep="first")
    elif used == "lowest_formation_energy":
        # rows without an energy go last within their group; ties keep source order
        ordered = ordered.assign(_e=ordered["formation_energy_per_atom"].fillna(np.inf))
        out = (
            ordered.sort_values(["_e", "row"], kind="stable")
            .drop_duplicates("reduced_formula")
            .drop(columns="_e")
        )
    elif used == "median_gap":
        median = ordered.groupby("reduced_formula", sort=False)["band_gap"].transform("median")
        # the representative row is the one whose gap is nearest the median; its gap becomes the median
        ordered = ordered.assign(_d=(ordered["band_gap"] - median).abs(), _m=median)
        out = ordered.sort_values(["_d", "row"], kind="stable").drop_duplicates("reduced_formula")
        out = out.assign(band_gap=out["_m"]).drop(columns=["_d", "_m"])
    else:  # guarded by the config's Literal, kept for direct callers
        raise ValueError(f"unknown de-duplication policy {policy!r}")
    return out.sort_values("row", kind="stable"), used


def _split(keys: pd.Series, cfg: PrepareConfig) -> np.ndarray:
    """Seeded train/val/test labels that depend only on the set of compositions, not on row order."""
    order = np.argsort(keys.to_numpy(dtype=str), kind="stable")
    rng = np.random.default_rng(cfg.seed)
    perm = order[rng.permutation(len(keys))]
    n = len(keys)
    n_train = int(round(cfg.split.train * n))
    n_val = int(round(cfg.split.val * n))
    labels = np.empty(n, dtype=object)
    labels[perm[:n_train]] = "train"
    labels[perm[n_train : n_train + n_val]] = "val"
    labels[perm[n_train + n_val :]] = "test"
    return labels


def _gap_stats(gaps: pd.Series, bins: list[float]) -> dict:
    values = gaps.to_numpy(dtype=float)
    if len(values) == 0:
        return {"n": 0}
    edges = sorted(bins)
    if values.max() > edges[-1]:
        edges = [*edges, float(np.ceil(values.max()))]
    counts, edges_out = np.histogram(values, bins=edges)
    return {
        "n": int(len(values)),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "frac_zero": float((values == 0).mean()),
        "frac_2_to_4": float(((values >= 2) & (values <= 4)).mean()),
        "frac_gt_6": float((values > 6).mean()),
        "histogram": {"edges": [float(e) for e in edges_out], "counts": [int(c) for c in counts]},
    }


def prepare_dataset(raw: pd.DataFrame, cfg: PrepareConfig) -> Prepared:
    """Validate -> filter -> de-duplicate -> split; never raises on bad rows."""
    missing = [c for c in ("row", "formula", "band_gap") if c not in raw.columns]
    if missing:
        raise ValueError(f"raw table lacks required column(s) {missing}; got {list(raw.columns)}")
    raw = raw.copy()
    for column in ("material_id", "formation_energy_per_atom", "energy_above_hull"):
        if column not in raw.columns:
            raw[column] = None if column == "material_id" else np.nan
    for column in ("formation_energy_per_atom", "energy_above_hull"):
        raw[column] = pd.to_numeric(raw[column], errors="coerce")

    rules = FormulaRules(cfg.integer_tolerance, cfg.max_multiplier)
    good, invalid = _validate_rows(raw, rules)
    kept, filtered = _apply_filters(good, cfg)
    deduped, policy = _deduplicate(kept, cfg.dedup)
    deduped["split"] = _split(deduped["reduced_formula"], cfg)

    extras = [c for c in raw.columns if c not in PREPARED_COLUMNS and c not in _RAW_CORE and c != "structure"]
    structure = ["structure"] if "structure" in raw.columns else []
    dataset = deduped[PREPARED_COLUMNS + structure + extras].reset_index(drop=True)
    rejects = pd.DataFrame(invalid + filtered, columns=REJECT_COLUMNS).sort_values("row", kind="stable")

    summary = {
        "rows_in": int(len(raw)),
        "rejected": int(len(invalid)),
        "rejected_by_code": _count_codes(invalid),
        "filtered": int(len(filtered)),
        "filtered_by_code": _count_codes(filtered),
        "duplicates_merged": int(len(kept) - len(deduped)),
        "dedup_policy": policy,
        "rows_out": int(len(dataset)),
        "split": {s: int((dataset["split"] == s).sum()) for s in ("train", "val", "test")},
        "n_elements": {str(k): int(v) for k, v in dataset["n_elements"].value_counts().sort_index().items()},
        "elements": len(set().union(*(set(_symbols(k)) for k in dataset["reduced_formula"])))
        if len(dataset)
        else 0,
        "band_gap": _gap_stats(dataset["band_gap"], cfg.histogram_bins),
    }
    return Prepared(dataset, rejects.reset_index(drop=True), summary)


def _count_codes(rejects: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r["code"]] = counts.get(r["code"], 0) + 1
    return dict(sorted(counts.items()))


def write_prepared(prepared: Prepared, out_dir: Path, metrics_path: Path | None = None) -> dict[str, Path]:
    """Write dataset.parquet, rejects.csv and summary.json (and the DVC metrics copy) atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "dataset": out_dir / "dataset.parquet",
        "rejects": out_dir / "rejects.csv",
        "summary": out_dir / "summary.json",
    }
    _atomic(paths["dataset"], lambda p: prepared.dataset.to_parquet(p, index=False))
    _atomic(paths["rejects"], lambda p: prepared.rejects.to_csv(p, index=False))
    text = json.dumps(prepared.summary, indent=2)
    _atomic(paths["summary"], lambda p: p.write_text(text))
    if metrics_path is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(metrics_path, lambda p: p.write_text(text))
        paths["metrics"] = metrics_path
    return paths


def _atomic(path: Path, write) -> None:
    """Write to a temporary sibling and rename, so a killed run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
