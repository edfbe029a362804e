"""Substitution into templates, the candidate input, and the `agd structures` stage."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pymatgen.core import Structure

from agd.cli import main
from agd.config import StructuresConfig
from agd.structures.substitute import (
    NO_TEMPLATE,
    OK,
    UNPARSABLE,
    build_structures,
    element_mapping,
    read_formula_input,
    substitute,
)
from agd.structures.templates import TemplateLibrary, read_template_table

from .conftest import perovskite, rocksalt


def test_mapping_pairs_by_amount_then_pettifor_order():
    # amounts decide first: O (3) must take O's place whatever the chemistry
    assert element_mapping("SrTiO3", "BaZrS3") == {"Sr": "Ba", "Ti": "Zr", "O": "S"}
    # equal amounts: alkali onto alkali, halogen onto halogen (not by formula order)
    assert element_mapping("NaCl", "BrK") == {"Na": "K", "Cl": "Br"}
    assert element_mapping("Y2MgS4", "Sc2CaSe4") == {"Y": "Sc", "Mg": "Ca", "S": "Se"}
    assert element_mapping("C", "N2") == {"C": "N"}  # pymatgen writes N2 unreduced
    with pytest.raises(ValueError, match="stoichiometric pattern"):
        element_mapping("NaCl", "Al2O3")


def test_substitution_keeps_sites_and_scales_volume():
    template = perovskite("Sr", "Ti", "O", 3.905)
    structure, ratio = substitute(template, {"Sr": "Ba", "Ti": "Zr", "O": "O"})
    assert structure.composition.reduced_formula == "BaZrO3"
    assert len(structure) == len(template)
    assert ratio > 1 and structure.volume == pytest.approx(template.volume * ratio)
    assert structure.frac_coords == pytest.approx(template.frac_coords)
    # swapping two elements of the template is simultaneous, not sequential
    salt = rocksalt("Na", "Cl", 5.64)
    swapped, _ = substitute(salt, {"Na": "Cl", "Cl": "Na"}, volume_scaling="none")
    assert [site.specie.symbol for site in swapped] == [
        {"Na": "Cl", "Cl": "Na"}[s.specie.symbol] for s in salt
    ]


def test_read_hits_dedups_filters_and_caps(tmp_path):
    hits = pd.DataFrame(
        {
            "formula": ["Na2Cl2", "NaCl", "KBr", "LiF", "Xx2O", "MgO"],
            "reduced_formula": ["NaCl", "NaCl", "KBr", "LiF", "Xx2O", "MgO"],
            "gap_window": ["gt6", "2-4", "gt6", "gt6", "gt6", "2-4"],
            "model": "roost",
            "experiment": ["Exp1", "Exp2", "Exp1", "Exp1", "Exp1", "Exp1"],
        }
    )
    path = tmp_path / "hits.parquet"
    hits.to_parquet(path)
    table = read_formula_input(path)
    assert table["formula"].tolist()[0] == "NaCl"  # found twice: first
    assert table.loc[0, "gap_window"] == "2-4,gt6" and table.loc[0, "n_hits"] == 2
    assert "Xx2O" in table["formula"].tolist()  # kept, so the stage can report it
    assert len(read_formula_input(path, max_candidates=2)) == 2
    window = read_formula_input(path, gap_window="2-4")
    assert sorted(window["formula"]) == ["MgO", "NaCl"]
    with pytest.raises(ValueError, match="gap_window"):
        read_formula_input(_write_txt(tmp_path, "NaCl\n"), gap_window="gt6")


def _write_txt(tmp_path, text):
    path = tmp_path / "formulas.txt"
    path.write_text(text)
    return path


def test_read_text_and_csv_lists(tmp_path):
    txt = _write_txt(tmp_path, "# candidates\nKBr\n\nNaN\n")
    assert read_formula_input(txt)["formula"].tolist() == [
        "KBr",
        "NaN",
    ]  # sodium nitride, not a missing value
    csv = tmp_path / "list.csv"
    pd.DataFrame({"composition": ["CaTiO3", "NaN"]}).to_csv(csv, index=False)
    assert sorted(read_formula_input(csv)["formula"]) == ["CaTiO3", "NaN"]


def test_build_structures_status_per_row(tmp_path, template_csv):
    cfg = StructuresConfig(template_sources=[template_csv])
    library = TemplateLibrary(read_template_table(template_csv), max_e_above_hull=cfg.max_e_above_hull)
    candidates = pd.DataFrame({"formula": ["KBr", "Xx2O", "Al2O3", "BaZrO3", ""]})
    table = build_structures(candidates, library, cfg, tmp_path / "cif", progress=False)
    assert table["status"].tolist() == [OK, UNPARSABLE, NO_TEMPLATE, OK, UNPARSABLE]
    assert table.loc[0, "template_id"] == "t-kcl" and table.loc[3, "template_id"] == "t-srtio3"
    cif = tmp_path / "cif" / "KBr.cif"
    assert table.loc[0, "cif_path"] == cif.as_posix()
    assert Structure.from_file(cif).composition.reduced_formula == "KBr"
    assert table.loc[1, "message"].startswith("unknown element")


def test_structures_cli_stage(tmp_path, monkeypatch, template_csv):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(
        f"structures: {{template_sources: ['{template_csv}'], max_candidates: 10, mp_templates: 'off'}}\n"
    )
    (tmp_path / "formulas.txt").write_text("KBr\nRbI\nBaZrO3\nQq\n")
    args = ["--params", str(params), "structures", "--formulas", "formulas.txt", "--no-mlflow"]
    assert main(args) == 0
    table = pd.read_parquet("data/structures/structures.parquet")
    assert table.set_index("formula")["status"].to_dict() == {
        "KBr": OK,
        "RbI": OK,
        "BaZrO3": OK,
        "Qq": UNPARSABLE,
    }
    metrics = json.loads((tmp_path / "metrics" / "structures.json").read_text())
    assert metrics["n_ok"] == 3 and metrics["status"] == {"ok": 3, "unparsable": 1}
    assert sorted(p.name for p in (tmp_path / "data/structures/cif").iterdir()) == [
        "BaZrO3.cif",
        "KBr.cif",
        "RbI.cif",
    ]
    # idempotent: a rerun with a shorter list leaves no stale CIFs
    (tmp_path / "formulas.txt").write_text("KBr\n")
    assert main(args) == 0
    assert [p.name for p in (tmp_path / "data/structures/cif").iterdir()] == ["KBr.cif"]


def test_structures_cli_without_input_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("structures: {mp_templates: 'off'}\n")
    assert main(["--params", "params.yaml", "structures", "--no-mlflow"]) == 2
    assert "hits.parquet: no formula list" in capsys.readouterr().err


def test_structures_cli_window_on_a_plain_list_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("structures: {mp_templates: 'off', template_sources: []}\n")
    (tmp_path / "f.txt").write_text("LiF\n")
    args = ["--params", "params.yaml", "structures", "--formulas", "f.txt", "--window", "gt6", "--no-mlflow"]
    assert main(args) == 2
    assert "no gap_window column" in capsys.readouterr().err
