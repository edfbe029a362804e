"""Small hand-made template tables for the structures tests (no shared data needed)."""

from __future__ import annotations

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter


def rocksalt(a: str, b: str, lattice: float) -> Structure:
    """Primitive rock-salt cell of AB."""
    cell = Structure.from_spacegroup("Fm-3m", Lattice.cubic(lattice), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return cell.get_primitive_structure()


def perovskite(a: str, b: str, x: str, lattice: float) -> Structure:
    """Cubic perovskite ABX3."""
    return Structure(
        Lattice.cubic(lattice),
        [a, b, x, x, x],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
    )


def zincblende(a: str, b: str, lattice: float) -> Structure:
    """Primitive zinc-blende cell of AB."""
    cell = Structure.from_spacegroup("F-43m", Lattice.cubic(lattice), [a, b], [[0, 0, 0], [0.25, 0.25, 0.25]])
    return cell.get_primitive_structure()


def template_row(template_id: str, structure: Structure, e_above_hull: float = 0.0) -> dict:
    return {
        "material_id": template_id,
        "reduced_formula": structure.composition.reduced_formula,
        "e_above_hull": e_above_hull,
        "cif": str(CifWriter(structure)),
    }


@pytest.fixture(scope="session")
def template_table() -> pd.DataFrame:
    """NaCl, KCl (rock salt), ZnS (zinc blende), SrTiO3 (perovskite), plus an unstable rock-salt ZnS polymorph."""
    return pd.DataFrame(
        [
            template_row("t-nacl", rocksalt("Na", "Cl", 5.64)),
            template_row("t-kcl", rocksalt("K", "Cl", 6.29)),
            template_row("t-zns", zincblende("Zn", "S", 5.41)),
            template_row("t-zns-rs", rocksalt("Zn", "S", 5.06), e_above_hull=0.5),
            template_row("t-srtio3", perovskite("Sr", "Ti", "O", 3.905)),
        ]
    )


@pytest.fixture
def template_csv(tmp_path, template_table) -> str:
    path = tmp_path / "templates.csv"
    template_table.to_csv(path, index=False)
    return str(path)
