"""VASP hand-off: input folders from pymatgen's Materials Project sets, and DFT results back in.

Export: one folder per kept candidate with ``relax/`` (``MPRelaxSet``) and ``static/`` (``MPStaticSet``,
the band-gap run), each holding INCAR, KPOINTS and POSCAR. POTCARs are licensed: without a configured
pseudopotential directory only ``POTCAR.spec`` (the symbols) is written; with one, real POTCARs.
A manifest (CSV and JSON) lists every folder with its candidate, template, energies and provenance.
The export folder is rebuilt on every run, so run VASP on a copy of it: an export that finds VASP
outputs inside its folder stops instead of deleting them.

Import: every ``vasprun.xml`` (or ``vasprun.xml.gz``) under a folder is parsed into a row of the
catalog table ``dft_results``. A run that cannot be read (truncated mid-file, not XML, no energy) gives
status ``broken`` with the reason, a folder of the manifest without a vasprun gives ``missing``, an
unconverged run is kept with ``converged = False``; nothing stops the other folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import SETTINGS, Composition, Structure
from tqdm.auto import tqdm

from agd.chem.formula import formula_key
from agd.config import VaspConfig
from agd.structures.substitute import cif_name

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "folder",
    "formula",
    "reduced_formula",
    "template_id",
    "template_formula",
    "template_source",
    "elmd_distance",
    "energy_per_atom",
    "formation_energy_per_atom",
    "relax_steps",
    "converged",
    "gap_window",
    "relax_dir",
    "static_dir",
    "potcar",
    "status",
    "message",
]

DFT_COLUMNS = [
    "formula",
    "path",
    "band_gap",
    "total_energy",
    "formation_energy_per_atom",
    "converged",
    "status",
    "imported_at",
    "candidate",
    "calculation",
    "energy_per_atom",
    "n_atoms",
    "message",
]


@contextlib.contextmanager
def _psp_dir(path: str | None):
    """Point pymatgen at a POTCAR directory for the duration of the block."""
    old = SETTINGS.get("PMG_VASP_PSP_DIR")
    if path is not None:
        SETTINGS["PMG_VASP_PSP_DIR"] = str(Path(path).resolve())
    try:
        yield
    finally:
        if path is not None:
            if old is None:
                SETTINGS.pop("PMG_VASP_PSP_DIR", None)
            else:
                SETTINGS["PMG_VASP_PSP_DIR"] = old


def write_vasp_inputs(structure: Structure, folder: str | os.PathLike, cfg: VaspConfig) -> dict[str, str]:
    """Write relax (and static) inputs for one structure; returns calculation -> folder."""
    from pymatgen.io.vasp.sets import MPRelaxSet, MPStaticSet

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # a rerun replaces the folder, never mixes old and new files
    sets = {"relax": MPRelaxSet}
    if cfg.static:
        sets["static"] = MPStaticSet
    written = {}
    with _psp_dir(cfg.psp_dir), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, input_set in sets.items():
            target = folder / name
            input_set(structure, user_incar_settings=dict(cfg.user_incar_settings) or None).write_input(
                str(target), potcar_spec=cfg.psp_dir is None
            )
            written[name] = target.as_posix()
    return written


def export_vasp(
    energies: pd.DataFrame, out_dir: str | os.PathLike, cfg: VaspConfig, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """VASP folders for the kept candidates; returns (manifest, structures table with vasp_dir filled)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = energies.copy().reset_index(drop=True)
    table["vasp_dir"] = None
    kept = (
        table.index[table["keep"].astype("boolean").fillna(False).astype(bool)].tolist()
        if "keep" in table
        else []
    )
    rows = []
    potcar = "files" if cfg.psp_dir is not None else "spec"
    for n, i in enumerate(tqdm(kept, desc="VASP inputs", disable=not progress, unit="folder")):
        record = table.loc[i]
        folder = out_dir / f"{n:04d}_{cif_name(str(record.get('reduced_formula') or record['formula']))}"
        row = {c: record.get(c) for c in MANIFEST_COLUMNS if c in record.index}
        row.update(folder=folder.as_posix(), potcar=potcar, status="ok", message="")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_str(str(record["cif"]), fmt="cif")
            written = write_vasp_inputs(structure, folder, cfg)
            row.update(relax_dir=written.get("relax"), static_dir=written.get("static"))
            table.at[i, "vasp_dir"] = folder.as_posix()
        except Exception as exc:  # e.g. missing POTCARs for one element: report, go on
            row.update(status="export_failed", message=f"{type(exc).__name__}: {exc}")
            shutil.rmtree(folder, ignore_errors=True)  # no half-written folder to be mistaken for a run
        rows.append(row)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return manifest, table


def write_manifest(
    manifest: pd.DataFrame, out_dir: str | os.PathLike, provenance: Mapping
) -> dict[str, Path]:
    """Write manifest.csv and manifest.json (rows plus provenance) into the export folder."""
    out_dir = Path(out_dir)
    csv_path, json_path = out_dir / "manifest.csv", out_dir / "manifest.json"
    manifest.to_csv(csv_path, index=False)
    records = json.loads(manifest.to_json(orient="records"))
    json_path.write_text(
        json.dumps({"provenance": dict(provenance), "folders": records}, indent=2, default=str)
    )
    return {"csv": csv_path, "json": json_path}


def _manifest_lookup(root: Path) -> dict[str, str]:
    """Export folder (absolute) -> candidate formula, from a manifest.json under ``root`` if there is one."""
    lookup: dict[str, str] = {}
    for path in root.rglob("manifest.json"):
        with contextlib.suppress(Exception):
            for record in json.loads(path.read_text()).get("folders", []):
                folder = Path(record["folder"])
                if not folder.is_absolute():
                    # folders are written relative to the project; also accept them relative to the manifest
                    by_name = path.parent / folder.name
                    folder = by_name if by_name.exists() else folder
                lookup[str(folder.resolve())] = str(record.get("reduced_formula") or record.get("formula"))
    return lookup


def _formula_from_folder(folder: Path, lookup: Mapping[str, str]) -> str | None:
    """The candidate formula of a run folder: from the manifest, else from its POSCAR."""
    for candidate in (folder, folder.parent):
        key = str(candidate.resolve())
        if key in lookup:
            return lookup[key]
    poscar = folder / "POSCAR"
    if poscar.is_file():
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return formula_key(Structure.from_file(poscar).composition.formula.replace(" ", ""))
    return None


def read_vasprun(path: str | os.PathLike) -> dict:
    """One ``dft_results`` row from a vasprun.xml; a broken file gives status 'broken' and the reason."""
    from pymatgen.io.vasp.outputs import Vasprun

    path = Path(path)
    row: dict = {"path": path.parent.as_posix(), "calculation": path.parent.name, "message": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = Vasprun(str(path), parse_dos=False, parse_potcar_file=False, exception_on_bad_xml=True)
            structure = run.final_structure
            energy = float(run.final_energy)
            converged = bool(run.converged)
    except Exception as exc:  # truncated or corrupt XML, missing blocks: per-folder status, no crash
        row.update(status="broken", message=f"{type(exc).__name__}: {exc}".strip()[:500])
        return row
    if not np.isfinite(energy):
        row.update(status="broken", message="no final energy")
        return row
    gap = None
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gap = float(run.eigenvalue_band_properties[0]) if run.eigenvalues is not None else None
    row.update(
        formula=formula_key(structure.composition.formula.replace(" ", "")),
        band_gap=gap,
        total_energy=energy,
        energy_per_atom=energy / len(structure),
        n_atoms=len(structure),
        converged=converged,
        status="ok" if converged else "unconverged",
        composition=structure.composition,
    )
    return row


def import_dft(
    root: str | os.PathLike,
    references: Mapping[str, float] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Parse every vasprun under ``root`` into ``dft_results`` rows (one per run folder), never raising on bad runs.

    Formation energies need elemental energies per atom from the same DFT setup: given in
    ``references`` (element -> eV/atom), or taken from converged single-element runs found under
    ``root`` (the lowest energy per atom per element).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    lookup = _manifest_lookup(root)
    files = sorted({*root.rglob("vasprun.xml"), *root.rglob("vasprun.xml.gz")})
    rows = [read_vasprun(path) for path in tqdm(files, desc="vasprun", disable=not progress, unit="run")]
    seen = {str(Path(row["path"]).resolve()) for row in rows}
    # folders the export made that have no result yet: 'missing', so the user sees what is outstanding
    base = root.resolve()
    for folder in sorted(lookup):
        calcs = sorted(p for p in Path(folder).iterdir() if p.is_dir()) if Path(folder).is_dir() else []
        for calc in calcs:
            if str(calc.resolve()) in seen or not (calc / "INCAR").is_file():
                continue
            try:
                shown = (root / calc.resolve().relative_to(base)).as_posix()
            except ValueError:
                shown = calc.as_posix()
            rows.append(
                {"path": shown, "calculation": calc.name, "status": "missing", "message": "no vasprun.xml"}
            )
    refs = dict(references or {})
    for row in rows:
        comp = row.get("composition")
        if comp is not None and len(comp) == 1 and row["status"] == "ok":
            el = comp.elements[0].symbol
            if el not in (references or {}):
                refs[el] = min(refs.get(el, np.inf), row["energy_per_atom"])
    now = datetime.now(UTC).replace(tzinfo=None)
    for row in rows:
        comp: Composition | None = row.pop("composition", None)
        folder = Path(row["path"])
        row["candidate"] = _formula_from_folder(folder, lookup)
        if not row.get("formula"):
            row["formula"] = row["candidate"] or "unknown"
        row["imported_at"] = now
        if comp is not None and all(el.symbol in refs for el in comp):
            mu = sum(float(frac) * refs[el.symbol] for el, frac in comp.fractional_composition.items())
            row["formation_energy_per_atom"] = row["energy_per_atom"] - mu
    table = pd.DataFrame(rows)
    for column in DFT_COLUMNS:
        if column not in table.columns:
            table[column] = None
    table = table[DFT_COLUMNS]
    for column in ("band_gap", "total_energy", "formation_energy_per_atom", "energy_per_atom"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    table["converged"] = table["converged"].astype("boolean")
    table["n_atoms"] = pd.to_numeric(table["n_atoms"], errors="coerce").astype("Int64")
    table["imported_at"] = pd.to_datetime(table["imported_at"])
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def dft_oracle_table(results: pd.DataFrame) -> pd.DataFrame:
    """Rows usable as oracle labels: converged runs with a band gap (static runs preferred per formula)."""
    usable = results[(results["status"] == "ok") & results["band_gap"].notna()].copy()
    usable["is_static"] = usable["calculation"] == "static"
    usable = usable.sort_values(["formula", "is_static"], ascending=[True, False], kind="stable")
    return usable.drop_duplicates("formula")[["formula", "band_gap", "path"]].reset_index(drop=True)


def run_vasp_stage(energies_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: VaspConfig) -> dict:
    """The ``agd export-vasp`` stage: folders, manifest and the final structures table; returns metrics."""
    import pymatgen.core

    out_dir = Path(out_dir)
    if out_dir.exists():
        finished = [p for name in ("vasprun.xml", "vasprun.xml.gz", "OUTCAR") for p in out_dir.rglob(name)]
        if finished:
            # VASP outputs are not ours to delete: run the calculations on a copy of the export
            raise FileExistsError(
                f"{out_dir} holds VASP outputs (e.g. {finished[0]}); move them out (run VASP on a copy of "
                f"the export, then `agd import-dft DIR`) before exporting again"
            )
        # the export folder is rebuilt from scratch, so removed candidates leave no stale inputs
        shutil.rmtree(out_dir)
    energies = pd.read_parquet(energies_path)
    manifest, table = export_vasp(energies, out_dir, cfg)
    provenance = {
        "energies": str(energies_path),
        "input_sets": {"relax": "MPRelaxSet", "static": "MPStaticSet" if cfg.static else None},
        "pymatgen": getattr(pymatgen.core, "__version__", "unknown"),
        "potcar": "files" if cfg.psp_dir else "POTCAR.spec (no psp_dir configured)",
        "user_incar_settings": dict(cfg.user_incar_settings),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_manifest(manifest, out_dir, provenance)
    table.to_parquet(out_dir / "structures.parquet", index=False)
    return {
        "n_candidates": len(energies),
        "n_kept": int(energies["keep"].astype("boolean").fillna(False).sum()) if "keep" in energies else 0,
        "n_folders": int((manifest["status"] == "ok").sum()),
        "n_failed": int((manifest["status"] != "ok").sum()),
        "potcar": "files" if cfg.psp_dir else "spec",
    }
