"""CHGNet relaxation, elemental references, formation energies, per-item statuses and resuming (real CHGNet)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.io.cif import CifWriter

from agd.cli import main
from agd.config import EnergyConfig
from agd.structures.energy import (
    BAD_STRUCTURE,
    OK,
    UNPHYSICAL,
    UNSUPPORTED_ELEMENT,
    ChgnetRelaxer,
    ElementalReferences,
    compute_energies,
    energy_summary,
    prototype_structures,
    read_progress,
)

from .conftest import rocksalt

# few steps, few reference starts: seconds on one CPU thread
CFG = EnergyConfig(steps=15, fmax=0.2, reference_starts=["fcc", "dimer"], num_threads=1)


class CountingRelaxer(ChgnetRelaxer):
    """The real relaxer, counting its calls (to see what a resumed run skips)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0

    def relax(self, structure, relax_cell=None):
        self.calls += 1
        return super().relax(structure, relax_cell)


@pytest.fixture(scope="module")
def relaxer():
    return CountingRelaxer(CFG)


def test_relax_strained_rocksalt(relaxer):
    result = relaxer.relax(rocksalt("Na", "Cl", 5.2))  # compressed from 5.64
    assert result.status == OK and result.steps >= 1
    assert result.structure.volume > rocksalt("Na", "Cl", 5.2).volume
    assert -4.5 < result.energy_per_atom < -2.5
    assert relaxer.relax(rocksalt("Na", "Cl", 5.2)).energy_per_atom == pytest.approx(result.energy_per_atom)


def test_unknown_element_gives_status(relaxer):
    result = relaxer.relax(Structure(Lattice.cubic(3.0), ["Cm", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    assert result.status == UNSUPPORTED_ELEMENT and "Cm" in result.message


def test_dimer_reference_is_a_molecule():
    dimer = prototype_structures("O")["dimer"]
    assert len(dimer) == 2 and 1.0 < dimer.get_distance(0, 1) < 1.5 and dimer.lattice.a == 10
    assert "dimer" not in prototype_structures("Na")


def test_references_cached_and_formation_energy(tmp_path, relaxer):
    cache = tmp_path / "refs.json"
    refs = ElementalReferences(relaxer, cache)
    mu_na = refs.energy("Na")
    assert mu_na is not None and -2.0 < mu_na < -1.0
    stored = json.loads(cache.read_text())
    assert list(stored) == [relaxer.signature()] and "Na" in stored[relaxer.signature()]
    before = relaxer.calls
    again = ElementalReferences(relaxer, cache)
    assert again.energy("Na") == mu_na and relaxer.calls == before  # from the cache, no relaxation
    fe = refs.formation_energy(Composition("NaCl"), -3.6)
    assert fe == pytest.approx(-3.6 - 0.5 * mu_na - 0.5 * refs.energy("Cl"))


def _structures_table():
    rows = [
        ("NaCl", "ok", str(CifWriter(rocksalt("Na", "Cl", 5.5)))),
        (
            "CmO",
            "ok",
            str(CifWriter(Structure(Lattice.cubic(2.5), ["Cm", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]))),
        ),
        ("KBr", "ok", "not a cif at all"),
        ("Al2O3", "no_template", None),
    ]
    return pd.DataFrame(rows, columns=["formula", "status", "cif"]).assign(message="")


def test_compute_energies_statuses_and_resume(tmp_path, relaxer):
    progress = tmp_path / "work" / "progress.jsonl"
    refs = tmp_path / "work" / "refs.json"
    table = compute_energies(_structures_table(), CFG, progress, refs, relaxer=relaxer, progress=False)
    status = table.set_index("formula")["status"].to_dict()
    assert status == {"NaCl": OK, "CmO": UNSUPPORTED_ELEMENT, "KBr": BAD_STRUCTURE, "Al2O3": "no_template"}
    nacl = table.set_index("formula").loc["NaCl"]
    assert nacl["formation_energy_per_atom"] < -1.0 and bool(nacl["keep"])
    assert nacl["relax_steps"] >= 1 and nacl["cif"] != nacl["initial_cif"]
    assert not table.set_index("formula").loc["CmO", "keep"]
    assert len(read_progress(progress, relaxer.signature())) == 3

    # a killed run leaves a torn last line; the rerun resumes without relaxing anything again
    with progress.open("a") as sink:
        sink.write('{"key": "torn')
    before = relaxer.calls
    again = compute_energies(_structures_table(), CFG, progress, refs, relaxer=relaxer, progress=False)
    assert relaxer.calls == before and again.attrs["n_resumed"] == 3
    pd.testing.assert_series_equal(again["formation_energy_per_atom"], table["formation_energy_per_atom"])

    # an energy below the plausible range is unphysical, also for a resumed record (no new relaxation)
    fe = float(nacl["formation_energy_per_atom"])
    assert energy_summary(table)["formation_energy_min"] == pytest.approx(fe)
    strict = CFG.model_copy(update={"formation_energy_min": fe + 0.5})
    flagged = compute_energies(_structures_table(), strict, progress, refs, relaxer=relaxer, progress=False)
    row = flagged.set_index("formula").loc["NaCl"]
    assert relaxer.calls == before and row["status"] == UNPHYSICAL and not bool(row["keep"])
    assert "below" in row["message"] and row["formation_energy_per_atom"] == pytest.approx(fe)
    summary = energy_summary(flagged)
    assert summary["formation_energy_min"] is None and summary["status"][UNPHYSICAL] == 1

    # other settings are another run: nothing is reused
    other = CountingRelaxer(CFG.model_copy(update={"steps": 16}))
    assert read_progress(progress, other.signature()) == {}


def test_energy_cli_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "energy: {steps: 10, fmax: 0.2, reference_starts: [fcc, dimer], formation_energy_max: -10.0}\n"
        "structures: {template_sources: []}\n"
    )
    structures = _structures_table().iloc[[0, 3]]
    structures.to_parquet(tmp_path / "structures.parquet")
    args = ["energy", "--structures", "structures.parquet", "--out", "energies.parquet", "--no-mlflow"]
    assert main(["--params", "params.yaml", *args]) == 0
    table = pd.read_parquet(tmp_path / "energies.parquet")
    assert table["status"].tolist() == [OK, "no_template"]
    assert not table["keep"].any()  # nothing is below -10 eV/atom
    metrics = json.loads((tmp_path / "metrics" / "energy.json").read_text())
    assert metrics["n_relaxed"] == 1 and metrics["n_kept"] == 0 and set(metrics["references"]) == {"Na", "Cl"}
    assert (tmp_path / "data/structures/energy_work/progress.jsonl").is_file()


def test_collapsing_or_overlapping_cells_stop_with_a_status(relaxer):
    # hydrogen in an fcc cell built from its tiny radius: far too dense, would swamp CHGNet's neighbour lists
    dense = relaxer.relax(prototype_structures("H")["fcc"])
    assert dense.status == UNPHYSICAL and "volume per atom" in dense.message
    overlap = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])
    result = relaxer.relax(overlap)
    assert result.status == UNPHYSICAL and "apart" in result.message


def test_energy_stage_with_nothing_to_relax_still_writes_its_outputs(tmp_path):
    """No hit found a template: an empty energies table and the work folder (a DVC output) still appear."""
    from agd.structures.energy import run_energy_stage

    structures = _structures_table().iloc[[3]]  # no_template only: CHGNet is never loaded
    structures.to_parquet(tmp_path / "structures.parquet")
    work = tmp_path / "energy_work"
    metrics = run_energy_stage(tmp_path / "structures.parquet", tmp_path / "energies.parquet", CFG, work)
    assert work.is_dir() and not (work / "progress.jsonl").exists()
    table = pd.read_parquet(tmp_path / "energies.parquet")
    assert table["status"].tolist() == ["no_template"] and not table["keep"].any()
    assert metrics["n_relaxed"] == 0
