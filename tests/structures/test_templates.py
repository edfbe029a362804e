"""Template search: ElMD among same-pattern templates, exclusions, corrupt CIFs, the mp-api source."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from agd.config import StructuresConfig
from agd.structures.substitute import BAD_TEMPLATE, NO_TEMPLATE, OK, load_templates, structure_for
from agd.structures.templates import TemplateLibrary, _elmd_class, anonymous_formula, read_template_table
from tests.conftest import read_shared_csv

from .conftest import rocksalt


def test_anonymous_formula_reduces_first():
    assert anonymous_formula("Sr2Ti2O6") == "ABC3"
    assert anonymous_formula("NaCl") == "AB"


def test_vectorised_distance_equals_elmd_package(shared_data):
    table = read_template_table(shared_data / "structures_mp20_diffhedron.csv.gz").head(400)
    library = TemplateLibrary(table)
    ElMD = _elmd_class()
    checked = 0
    for query in ["KMgF3", "LiAlO2", "GaN", "Ba2YCu3O7", "CsPbI3", "Mg2SiO4"]:
        rows, dist = library.distances(query)
        for row, d in zip(rows[:20], dist[:20], strict=False):
            expected = ElMD(query, metric="mod_petti").elmd(ElMD(library.table["composition_key"].iloc[row]))
            assert d == pytest.approx(expected, abs=1e-9)
            checked += 1
    assert checked > 20


def test_nearest_same_pattern_and_ordering(template_table):
    library = TemplateLibrary(read_template_table_from(template_table))
    matches = library.nearest("KBr", k=5)
    # only the AB templates, nearest first; the unstable ZnS polymorph is still an AB template
    assert {m.template_id for m in matches} == {"t-nacl", "t-kcl", "t-zns", "t-zns-rs"}
    assert matches[0].template_id == "t-kcl"
    assert [m.distance for m in matches] == sorted(m.distance for m in matches)
    # an exact composition is at distance 0
    assert library.nearest("NaCl")[0].distance == 0
    # equal distance (both ZnS): the more stable polymorph wins the tie
    zns = [m.template_id for m in library.nearest("ZnS", k=2)]
    assert zns == ["t-zns", "t-zns-rs"]
    assert library.nearest("Al2O3") == []


def read_template_table_from(frame: pd.DataFrame) -> pd.DataFrame:
    """The template table of an in-memory frame, through the same reader as files."""
    return pd.DataFrame(
        {
            "template_id": frame["material_id"],
            "reduced_formula": frame["reduced_formula"],
            "cif": frame["cif"],
            "e_above_hull": frame["e_above_hull"],
            "formation_energy_per_atom": np.nan,
            "source": "test",
        }
    )


def test_stability_cut_and_exclusion(template_table):
    table = read_template_table_from(template_table)
    library = TemplateLibrary(table, max_e_above_hull=0.1)
    assert "t-zns-rs" not in set(library.table["template_id"])
    without = library.exclude(["Na2Cl2"])
    assert "t-nacl" not in set(without.table["template_id"])
    assert without.nearest("NaCl")[0].template_id != "t-nacl"
    assert len(library) == len(without) + 1


def test_unparsable_template_rows_are_skipped_not_fatal(template_table):
    table = read_template_table_from(template_table)
    table.loc[len(table)] = ["bad", "Xx2O", "junk", 0.0, np.nan, "test"]
    library = TemplateLibrary(table)
    assert len(library) == len(template_table)
    assert library.skipped and library.skipped[0][0] == "bad"


def test_corrupt_cif_falls_back_to_next_template_then_reports(tmp_path, template_table):
    cfg = StructuresConfig(max_template_tries=3, max_e_above_hull=None)
    table = read_template_table_from(template_table)
    table.loc[table["template_id"] == "t-kcl", "cif"] = "data_broken\n_cell_length_a 1\nthis is not a CIF"
    library = TemplateLibrary(table)
    row, structure = structure_for("KBr", library, cfg)
    assert row["status"] == OK and structure is not None
    assert row["template_id"] != "t-kcl"
    assert "t-kcl" in row["message"] and "unreadable CIF" in row["message"]

    # the only template of a pattern is corrupt: a status for that candidate, no exception
    table.loc[table["template_id"] == "t-srtio3", "cif"] = "garbage"
    row, structure = structure_for("BaZrO3", TemplateLibrary(table), cfg)
    assert structure is None and row["status"] == BAD_TEMPLATE and "t-srtio3" in row["message"]
    row, structure = structure_for("Al2O3", TemplateLibrary(table), cfg)
    assert row["status"] == NO_TEMPLATE and "A2B3" in row["message"]


class _FakeSummary:
    """Stands in for mp-api's summary endpoint: returns documents of one pattern."""

    def __init__(self, docs):
        self.docs = docs
        self.calls = []

    def search(self, **kwargs):
        self.calls.append(kwargs)
        return [d for d in self.docs if anonymous_formula(d.formula_pretty) == kwargs["formula"]]


class _FakeRester:
    def __init__(self, docs):
        self.materials = SimpleNamespace(summary=_FakeSummary(docs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mp_templates_through_a_mocked_client(tmp_path):
    doc = SimpleNamespace(
        material_id="mp-22862",
        formula_pretty="NaCl",
        structure=rocksalt("Na", "Cl", 5.64),
        energy_above_hull=0.0,
        formation_energy_per_atom=-2.1,
    )
    client = _FakeRester([doc])
    cfg = StructuresConfig(template_sources=[str(tmp_path / "absent.csv")], mp_templates="auto")
    library, info = load_templates(cfg, patterns=["AB", "AB"], mp_client=client)
    assert info["mp"] == "1 templates" and len(library) == 1
    call = client.materials.summary.calls[0]
    assert call["formula"] == "AB" and call["energy_above_hull"] == (0.0, cfg.max_e_above_hull)
    assert len(client.materials.summary.calls) == 1  # one query per distinct pattern
    row, structure = structure_for("KBr", library, cfg)
    assert row["template_id"] == "mp-22862" and structure.composition.reduced_formula == "KBr"


def test_mp_failure_falls_back_to_local_files(template_csv):
    class Broken:
        def __enter__(self):
            raise ConnectionError("offline")

        def __exit__(self, *exc):
            return False

    cfg = StructuresConfig(template_sources=[template_csv], mp_templates="auto")
    library, info = load_templates(cfg, patterns=["AB"], mp_client=Broken())
    assert info["mp"].startswith("unavailable") and len(library) == 4  # the 0.5 eV/atom polymorph is cut


def test_shared_structure_files_load(shared_data):
    for name in ("structures_mp40_chemeleon.csv.gz", "structures_mp20_diffhedron.csv.gz"):
        table = read_template_table(shared_data / name)
        raw = read_shared_csv(shared_data / name)
        assert len(table) == len(raw) and table["cif"].str.contains("_cell_length_a").all()
    library = TemplateLibrary.from_sources([shared_data / "structures_mp20_diffhedron.csv.gz"])
    assert library.nearest("SrTiO3")[0].distance < 0.5
