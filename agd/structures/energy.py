"""CHGNet relaxation of substituted structures and formation energy against relaxed elemental references.

Each ``ok`` structure is relaxed with the pretrained CHGNet shipped in the ``chgnet`` wheel (step limit,
force threshold, optimizer and cell relaxation from ``params.yaml: energy``). The formation energy per
atom is the relaxed energy per atom minus the composition-weighted energies of the elements, each
element relaxed the same way from several starting structures (elemental structures of the template
files, fcc, bcc, hcp and diamond cells, and a dimer in a box for the diatomic gases), the lowest
energy per atom kept. References are cached in a JSON file keyed by the relaxation settings.

The relaxation is ASE's optimizer on CHGNet's calculator (with the Frechet cell filter when the cell
relaxes), guarded at every step: a cell whose volume per atom leaves 2-200 A^3 or atoms closer than
0.5 A stop with status ``unphysical``. Without the guard a collapsing cell (hydrogen in an fcc cell
built from its radius, a bad substitution) grows CHGNet's neighbour lists until memory runs out.
Per-item statuses: ``ok``, ``unsupported_element`` (beyond Pu), ``unphysical``, ``relax_failed``,
``bad_structure`` (unreadable CIF), ``no_reference`` (an element without a relaxed reference).

Long runs are resumable: every finished candidate is appended to a JSON-lines progress file at once,
and a rerun with the same settings skips candidates already there (same formula, same input CIF).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition, Element, Lattice, Structure
from pymatgen.io.cif import CifWriter
from tqdm.auto import tqdm

from agd.config import EnergyConfig

log = logging.getLogger(__name__)

#: CHGNet's element embedding covers H..Pu.
MAX_Z = 94
DIATOMIC = ("H", "N", "O", "F", "Cl", "Br", "I")

OK = "ok"
UNSUPPORTED_ELEMENT = "unsupported_element"
RELAX_FAILED = "relax_failed"
NO_REFERENCE = "no_reference"
BAD_STRUCTURE = "bad_structure"
UNPHYSICAL = "unphysical"


@dataclass(frozen=True)
class Relaxation:
    """Outcome of one relaxation: energy per atom (eV), steps, convergence, final structure or why it failed."""

    status: str
    energy_per_atom: float | None = None
    steps: int | None = None
    converged: bool | None = None
    structure: Structure | None = None
    message: str = ""


def unsupported_elements(composition: Composition | Iterable[str]) -> list[str]:
    """Elements CHGNet has no embedding for (atomic number above 94)."""
    symbols = [el.symbol for el in composition] if isinstance(composition, Composition) else list(composition)
    return sorted({s for s in symbols if Element(s).Z > MAX_Z})


class _Unphysical(RuntimeError):
    """A relaxation left the physical range (cell collapsing or exploding, atoms on top of each other)."""


#: Guard rails of a relaxation: a collapsing cell makes CHGNet's neighbour lists (and memory) explode.
MIN_VOLUME_PER_ATOM = 2.0  # A^3; the densest solids are above 4
MAX_VOLUME_PER_ATOM = 200.0
MIN_DISTANCE = 0.5  # A


def _check_physical(atoms, check_volume: bool) -> None:
    """Raise _Unphysical when the atoms leave the range a solid can occupy."""
    n = len(atoms)
    if check_volume:
        volume = atoms.get_volume() / n
        if not MIN_VOLUME_PER_ATOM <= volume <= MAX_VOLUME_PER_ATOM:
            raise _Unphysical(f"volume per atom {volume:.2f} A^3 is outside the physical range")
    if n > 1:
        distances = atoms.get_all_distances(mic=True)
        np.fill_diagonal(distances, np.inf)
        if distances.min() < MIN_DISTANCE:
            raise _Unphysical(f"atoms {distances.min():.2f} A apart")


class ChgnetRelaxer:
    """Relax structures with the pretrained CHGNet (ASE FIRE/BFGS/LBFGS, Frechet cell filter); loads on first use."""

    def __init__(self, cfg: EnergyConfig) -> None:
        self.cfg = cfg
        self._calculator = None
        self.model_version: str | None = None

    def _load(self):
        if self._calculator is None:
            import torch

            if self.cfg.num_threads is not None:
                torch.set_num_threads(self.cfg.num_threads)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                from chgnet.model import CHGNet
                from chgnet.model.dynamics import CHGNetCalculator

                model = CHGNet.load(verbose=False)
                self._calculator = CHGNetCalculator(model=model, use_device=self.cfg.device)
            self.model_version = str(getattr(model, "version", "unknown"))
        return self._calculator

    def signature(self) -> str:
        """Settings that change a relaxation's result; cached results are keyed by it."""
        self._load()
        c = self.cfg
        starts = ",".join(c.reference_starts)
        return f"chgnet-{self.model_version}|{c.optimizer}|steps={c.steps}|fmax={c.fmax}|cell={c.relax_cell}|refs={starts}"

    def relax(self, structure: Structure, relax_cell: bool | None = None) -> Relaxation:
        """Relax one structure; bad input gives a status, never an exception."""
        from ase.filters import FrechetCellFilter
        from ase.optimize import BFGS, FIRE, LBFGS
        from pymatgen.io.ase import AseAtomsAdaptor

        bad = unsupported_elements(structure.composition)
        if bad:
            return Relaxation(UNSUPPORTED_ELEMENT, message=f"CHGNet has no parameters for {', '.join(bad)}")
        calculator = self._load()
        relax_cell = self.cfg.relax_cell if relax_cell is None else relax_cell
        optimizer = None
        try:
            atoms = AseAtomsAdaptor.get_atoms(structure)
            _check_physical(atoms, relax_cell)
            atoms.calc = calculator
            target = FrechetCellFilter(atoms) if relax_cell else atoms
            optimizer_class = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}[self.cfg.optimizer]
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                optimizer = optimizer_class(target, logfile=None)
                optimizer.attach(lambda: _check_physical(atoms, relax_cell), interval=1)
                converged = bool(optimizer.run(fmax=self.cfg.fmax, steps=self.cfg.steps))
                energy = float(atoms.get_potential_energy()) / len(atoms)
        except _Unphysical as exc:
            steps = getattr(optimizer, "nsteps", None)
            return Relaxation(UNPHYSICAL, steps=steps, message=str(exc))
        except Exception as exc:  # a structure CHGNet cannot handle must not stop the batch
            return Relaxation(RELAX_FAILED, message=f"{type(exc).__name__}: {exc}")
        if not math.isfinite(energy):
            return Relaxation(RELAX_FAILED, message="non-finite energy", steps=optimizer.nsteps)
        final = AseAtomsAdaptor.get_structure(atoms)
        return Relaxation(OK, energy, int(optimizer.nsteps), converged, final)


def prototype_structures(symbol: str) -> dict[str, Structure]:
    """Starting cells for an elemental reference: fcc, bcc, hcp, diamond, and a dimer for diatomic gases."""
    element = Element(symbol)
    r = float(element.atomic_radius or element.atomic_radius_calculated or 1.5)
    cells = {
        "fcc": Structure.from_spacegroup("Fm-3m", Lattice.cubic(2 * math.sqrt(2) * r), [symbol], [[0, 0, 0]]),
        "bcc": Structure.from_spacegroup("Im-3m", Lattice.cubic(4 * r / math.sqrt(3)), [symbol], [[0, 0, 0]]),
        "hcp": Structure.from_spacegroup(
            "P6_3/mmc", Lattice.hexagonal(2 * r, 2 * r * 1.633), [symbol], [[1 / 3, 2 / 3, 0.25]]
        ),
        "diamond": Structure.from_spacegroup(
            "Fd-3m", Lattice.cubic(8 * r / math.sqrt(3)), [symbol], [[0, 0, 0]]
        ),
    }
    if symbol in DIATOMIC:
        bond = 2 * r  # twice the empirical radius: within 0.3 A of the real bond for these gases
        box = 10.0
        cells["dimer"] = Structure(Lattice.cubic(box), [symbol, symbol], [[0, 0, 0], [0, 0, bond / box]])
    return {name: s.get_primitive_structure() if name != "dimer" else s for name, s in cells.items()}


class ElementalReferences:
    """Lowest relaxed CHGNet energy per atom of each element, computed on demand and cached in JSON."""

    def __init__(
        self,
        relaxer: ChgnetRelaxer,
        cache_path: str | os.PathLike | None = None,
        known: Mapping[str, Iterable[Structure]] | None = None,
    ) -> None:
        self.relaxer = relaxer
        self.cache_path = Path(cache_path) if cache_path else None
        self.known = {k: list(v) for k, v in (known or {}).items()}
        self._cache: dict[str, dict] = {}
        if self.cache_path and self.cache_path.is_file():
            try:
                stored = json.loads(self.cache_path.read_text())
                self._cache = stored.get(relaxer.signature(), {})
            except (json.JSONDecodeError, AttributeError):
                log.warning("%s: unreadable reference cache; recomputing", self.cache_path)

    def _save(self) -> None:
        if not self.cache_path:
            return
        stored = {}
        if self.cache_path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                stored = json.loads(self.cache_path.read_text())
        stored[self.relaxer.signature()] = self._cache
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.tmp")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
        tmp.replace(self.cache_path)

    def entry(self, symbol: str) -> dict:
        """The cached reference record of one element (energy_per_atom None when none relaxed)."""
        if symbol not in self._cache:
            allowed = set(self.relaxer.cfg.reference_starts)
            starts = (
                {f"known{i}": s for i, s in enumerate(self.known.get(symbol, []))}
                if "known" in allowed
                else {}
            )
            starts.update({k: v for k, v in prototype_structures(symbol).items() if k in allowed})
            best: dict = {"energy_per_atom": None, "start": None, "tried": {}}
            for name, start in starts.items():
                # a molecule in a box must keep its box: only its atoms move
                result = self.relaxer.relax(start, relax_cell=False if name == "dimer" else None)
                best["tried"][name] = result.energy_per_atom if result.status == OK else result.status
                if result.status == OK and (
                    best["energy_per_atom"] is None or result.energy_per_atom < best["energy_per_atom"]
                ):
                    best.update(energy_per_atom=result.energy_per_atom, start=name)
            self._cache[symbol] = best
            self._save()
        return self._cache[symbol]

    def energy(self, symbol: str) -> float | None:
        """Reference energy per atom (eV) of an element, or None."""
        return self.entry(symbol)["energy_per_atom"]

    def formation_energy(self, composition: Composition, energy_per_atom: float) -> float | None:
        """Formation energy per atom (eV) from an energy per atom; None if an element has no reference."""
        total = 0.0
        for element, fraction in composition.fractional_composition.items():
            mu = self.energy(element.symbol)
            if mu is None:
                return None
            total += float(fraction) * mu
        return energy_per_atom - total


def _row_key(formula: str, cif: str) -> str:
    return hashlib.sha1(f"{formula}\n{cif}".encode()).hexdigest()[:16]


def read_progress(path: Path, signature: str) -> dict[str, dict]:
    """Finished rows of an interrupted run with the same settings, by row key; a torn last line is ignored."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a killed run was writing
        if record.get("signature") == signature:
            done[record["key"]] = record
    return done


def known_elemental_structures(templates: pd.DataFrame | None) -> dict[str, list[Structure]]:
    """Elemental structures of a template table (parsed CIFs), by element, for the references."""
    out: dict[str, list[Structure]] = {}
    if templates is None or not len(templates):
        return out
    for formula, cif in zip(templates["reduced_formula"], templates["cif"], strict=True):
        try:
            comp = Composition(str(formula))
            if len(comp) != 1:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_str(str(cif), fmt="cif")
            structure.remove_oxidation_states()
        except Exception:
            continue
        out.setdefault(comp.elements[0].symbol, []).append(structure)
    return out


ENERGY_COLUMNS = [
    "energy_per_atom",
    "formation_energy_per_atom",
    "relax_steps",
    "converged",
    "energy_status",
    "keep",
]


def compute_energies(
    structures: pd.DataFrame,
    cfg: EnergyConfig,
    progress_path: str | os.PathLike,
    references_path: str | os.PathLike | None = None,
    known_elements: Mapping[str, Iterable[Structure]] | None = None,
    relaxer: ChgnetRelaxer | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Relax every ``ok`` structure and add energies; other rows keep their status. Resumable via ``progress_path``.

    Adds ``energy_per_atom``, ``formation_energy_per_atom``, ``relax_steps``, ``converged``,
    ``energy_status`` and ``keep`` (formation energy below ``cfg.formation_energy_max``); ``cif`` becomes
    the relaxed structure and the substituted one moves to ``initial_cif``.
    """
    table = structures.copy().reset_index(drop=True)
    table["initial_cif"] = table["cif"]
    todo = [i for i, status in enumerate(table["status"]) if status == "ok"]
    records: dict[int, dict] = {}
    n_resumed = 0
    refs = None
    if todo:  # the model (seconds to load) only when there is something to relax
        relaxer = relaxer or ChgnetRelaxer(cfg)
        signature = relaxer.signature()
        progress_path = Path(progress_path)
        progress_path.parent.mkdir(parents=True, exist_ok=True)
        done = read_progress(progress_path, signature)
        refs = ElementalReferences(relaxer, references_path, known_elements)
    with progress_path.open("a") if todo else contextlib.nullcontext() as sink:
        bar = tqdm(todo, desc="CHGNet relax", disable=not progress, unit="structure")
        for i in bar:
            formula, cif = str(table.at[i, "formula"]), str(table.at[i, "cif"])
            key = _row_key(formula, cif)
            if key in done:
                records[i] = done[key]
                n_resumed += 1
                continue
            bar.set_postfix_str(formula)
            record = _relax_row(formula, cif, relaxer, refs, cfg)
            record.update(key=key, signature=signature)
            sink.write(json.dumps(record) + "\n")
            sink.flush()  # stored as soon as it is finished: a killed run loses at most this one
            records[i] = record
    for column in ENERGY_COLUMNS:
        table[column] = None
    for i, record in records.items():
        record = _check_plausible(record, cfg)  # resumed records too: the bound is not part of the signature
        for column in ENERGY_COLUMNS:
            table.at[i, column] = record.get(column)
        if record.get("relaxed_cif"):
            table.at[i, "cif"] = record["relaxed_cif"]
        if record.get("message"):
            previous = table.at[i, "message"] or ""
            table.at[i, "message"] = "; ".join(m for m in (previous, record["message"]) if m)
        table.at[i, "status"] = record["energy_status"]
    for column in ("energy_per_atom", "formation_energy_per_atom"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    table["relax_steps"] = pd.to_numeric(table["relax_steps"], errors="coerce").astype("Int64")
    table["converged"] = table["converged"].astype("boolean")
    table["keep"] = table["keep"].eq(True).astype(bool)
    table.attrs["n_resumed"] = n_resumed
    table.attrs["references"] = {el: refs.energy(el) for el in sorted(refs._cache)} if refs else {}
    return table


def _check_plausible(record: dict, cfg: EnergyConfig) -> dict:
    """The record, marked ``unphysical`` (and not kept) when its formation energy is below the physical range.

    A relaxation that leaves CHGNet's training distribution can slide to absurd energies (-53 eV/atom
    seen for BPF6 after 500 unconverged steps) without tripping the geometric guard; no compound is
    known below about -4.5 eV/atom.
    """
    formation = record.get("formation_energy_per_atom")
    if record.get("energy_status") != OK or formation is None or formation >= cfg.formation_energy_min:
        return record
    message = (
        f"formation energy {formation:.2f} eV/atom is below {cfg.formation_energy_min:g} eV/atom "
        f"(energy.formation_energy_min): the relaxation left CHGNet's valid range"
        + ("" if record.get("converged") else " without converging")
    )
    previous = record.get("message") or ""
    return {
        **record,
        "energy_status": UNPHYSICAL,
        "keep": False,
        "message": "; ".join(m for m in (previous, message) if m),
    }


def _relax_row(
    formula: str, cif: str, relaxer: ChgnetRelaxer, refs: ElementalReferences, cfg: EnergyConfig
) -> dict:
    """Relax one substituted structure and compute its formation energy; the record stored in the progress file."""
    record: dict = {"formula": formula, "energy_status": OK, "message": "", "keep": False}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(cif, fmt="cif")
    except Exception as exc:
        record.update(energy_status=BAD_STRUCTURE, message=f"unreadable CIF: {type(exc).__name__}: {exc}")
        return record
    result = relaxer.relax(structure)
    if result.status != OK:
        record.update(energy_status=result.status, message=result.message)
        return record
    formation = refs.formation_energy(structure.composition, result.energy_per_atom)
    record.update(
        energy_per_atom=result.energy_per_atom,
        formation_energy_per_atom=formation,
        relax_steps=result.steps,
        converged=result.converged,
        relaxed_cif=str(CifWriter(result.structure)),
    )
    if formation is None:
        record.update(energy_status=NO_REFERENCE, message="an element has no relaxed reference")
    else:
        record["keep"] = bool(formation < cfg.formation_energy_max)
    return record


def energy_summary(table: pd.DataFrame) -> dict:
    """Counts and energy statistics of an energies table (for metrics)."""
    relaxed = table[table["energy_per_atom"].notna()]
    # statistics of plausible energies only: an unphysical one (far below any real compound) would swamp them
    fe = relaxed.loc[relaxed["energy_status"].eq(OK), "formation_energy_per_atom"].dropna()
    return {
        "n_candidates": len(table),
        "n_relaxed": len(relaxed),
        "n_converged": int(relaxed["converged"].eq(True).sum()),
        "n_kept": int(table["keep"].sum()),
        "n_resumed": int(table.attrs.get("n_resumed", 0)),
        "status": {str(k): int(v) for k, v in table["status"].value_counts().items()},
        "formation_energy_mean": float(fe.mean()) if len(fe) else None,
        "formation_energy_min": float(fe.min()) if len(fe) else None,
        "relax_steps_mean": float(np.mean(relaxed["relax_steps"].astype(float))) if len(relaxed) else None,
    }


def run_energy_stage(
    structures_path: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EnergyConfig,
    work_dir: str | os.PathLike,
    template_sources: Iterable[str | os.PathLike] = (),
) -> dict:
    """The ``agd energy`` stage: relax the substituted structures, write the energies table; returns metrics.

    ``work_dir`` keeps the resumable state: ``progress.jsonl`` (finished candidates) and
    ``elemental_references.json`` (the relaxed elements); elemental structures in the template files
    are extra starting points for the references.
    """
    from agd.structures.templates import read_template_table

    out, work_dir = Path(out), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)  # a stage output, even when there is nothing to relax
    structures = pd.read_parquet(structures_path)
    tables = [read_template_table(s) for s in template_sources if Path(s).is_file()]
    known = known_elemental_structures(pd.concat(tables, ignore_index=True) if tables else None)
    table = compute_energies(
        structures,
        cfg,
        work_dir / "progress.jsonl",
        work_dir / "elemental_references.json",
        known_elements=known,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out)
    metrics = energy_summary(table)
    metrics["references"] = table.attrs.get("references", {})
    return metrics
