"""VASP export (inputs parse back with pymatgen) and DFT import (fixture vasprun, broken and missing runs)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp.inputs import Incar, Kpoints, Poscar

from agd.cli import main
from agd.config import VaspConfig
from agd.models.oracle import TableOracle, load_oracle
from agd.structures.vasp import dft_oracle_table, export_vasp, import_dft, read_vasprun, run_vasp_stage
from agd.tracking.catalog import CatalogReader, Load, build_catalog

from .conftest import perovskite, rocksalt

FIXTURE = Path(__file__).parent / "fixtures" / "nacl_static" / "vasprun.xml"


def _energies():
    rows = [
        ("KBr", "KBr", "t-kcl", 0.5, -3.3, -1.9, 12, True, True, str(CifWriter(rocksalt("K", "Br", 6.6)))),
        (
            "BaZrO3",
            "BaZrO3",
            "t-srtio3",
            0.4,
            -8.7,
            -3.6,
            20,
            False,
            True,
            str(CifWriter(perovskite("Ba", "Zr", "O", 4.19))),
        ),
        ("NaAu", "NaAu", "t-nacl", 1.0, -2.0, 0.3, 5, True, False, str(CifWriter(rocksalt("Na", "Au", 5.5)))),
    ]
    columns = ["formula", "reduced_formula", "template_id", "elmd_distance", "energy_per_atom"]
    columns += ["formation_energy_per_atom", "relax_steps", "converged", "keep", "cif"]
    return pd.DataFrame(rows, columns=columns).assign(status="ok", template_formula="x", message="")


def test_export_writes_parseable_inputs_and_manifest(tmp_path):
    energies = tmp_path / "energies.parquet"
    _energies().to_parquet(energies)
    metrics = run_vasp_stage(energies, tmp_path / "vasp", VaspConfig())
    assert metrics["n_folders"] == 2 and metrics["n_kept"] == 2 and metrics["potcar"] == "spec"
    manifest = pd.read_csv(tmp_path / "vasp" / "manifest.csv")
    assert manifest["formula"].tolist() == ["KBr", "BaZrO3"]  # NaAu (positive formation energy) is not kept
    for record in manifest.to_dict("records"):
        for calc in ("relax", "static"):
            folder = Path(record[f"{calc}_dir"])
            incar = Incar.from_file(folder / "INCAR")
            poscar = Poscar.from_file(folder / "POSCAR")
            kpoints = Kpoints.from_file(folder / "KPOINTS")
            assert poscar.structure.composition.reduced_formula == record["formula"]
            assert incar["NSW"] == (0 if calc == "static" else 99)
            assert kpoints.kpts and all(k >= 1 for k in kpoints.kpts[0])
            assert (folder / "POTCAR.spec").read_text().split() and not (folder / "POTCAR").exists()
    assert "Ba_sv" in (Path(manifest.loc[1, "relax_dir"]) / "POTCAR.spec").read_text()
    meta = json.loads((tmp_path / "vasp" / "manifest.json").read_text())
    assert meta["provenance"]["input_sets"]["relax"] == "MPRelaxSet" and len(meta["folders"]) == 2
    table = pd.read_parquet(tmp_path / "vasp" / "structures.parquet")
    assert table["vasp_dir"].notna().tolist() == [True, True, False]
    # a rerun replaces the export, but never deletes VASP results someone ran inside it
    assert run_vasp_stage(energies, tmp_path / "vasp", VaspConfig())["n_folders"] == 2
    shutil.copy(FIXTURE, Path(manifest.loc[0, "static_dir"]) / "vasprun.xml")
    with pytest.raises(FileExistsError, match="VASP outputs"):
        run_vasp_stage(energies, tmp_path / "vasp", VaspConfig())
    assert (Path(manifest.loc[0, "static_dir"]) / "vasprun.xml").is_file()


def test_export_reports_missing_potcars_per_candidate(tmp_path):
    psp = tmp_path / "psp"
    psp.mkdir()  # configured but empty: every candidate fails with its reason, none crashes
    manifest, table = export_vasp(
        _energies(), tmp_path / "vasp", VaspConfig(psp_dir=str(psp)), progress=False
    )
    assert manifest["status"].tolist() == ["export_failed", "export_failed"]
    assert manifest["message"].str.len().gt(0).all() and table["vasp_dir"].isna().all()
    assert not any((tmp_path / "vasp").iterdir())


def test_read_fixture_vasprun():
    row = read_vasprun(FIXTURE)
    assert row["status"] == "ok" and row["converged"] is True
    assert row["formula"] == "NaCl" and row["n_atoms"] == 2
    assert row["total_energy"] == pytest.approx(-6.62)
    assert row["band_gap"] == pytest.approx(5.0)


def _runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    good = root / "0000_NaCl" / "static"
    good.mkdir(parents=True)
    shutil.copy(FIXTURE, good / "vasprun.xml")
    text = FIXTURE.read_text()
    cut = root / "0001_NaCl" / "relax"
    cut.mkdir(parents=True)
    (cut / "vasprun.xml").write_text(text[: len(text) // 2])  # a run killed mid-write
    empty = root / "0002_KBr" / "relax"
    empty.mkdir(parents=True)
    (empty / "vasprun.xml").write_text("")
    (empty / "POSCAR").write_text(
        "KBr\n1.0\n3.3 0 0\n0 3.3 0\n0 0 3.3\nK Br\n1 1\ndirect\n0 0 0 K\n0.5 0.5 0.5 Br\n"
    )
    zipped = root / "0003_NaCl" / "static"
    zipped.mkdir(parents=True)
    with gzip.open(zipped / "vasprun.xml.gz", "wt") as sink:
        sink.write(text.replace("-6.62000000", "-7.00000000"))
    return root


def test_import_never_crashes_and_reports_per_folder(tmp_path):
    table = import_dft(_runs(tmp_path), references={"Na": -1.3, "Cl": -1.8}, progress=False)
    by_folder = {
        Path(p).parent.name: row for p, row in zip(table["path"], table.to_dict("records"), strict=True)
    }
    assert by_folder["0000_NaCl"]["status"] == "ok"
    assert by_folder["0000_NaCl"]["formation_energy_per_atom"] == pytest.approx(-6.62 / 2 - (-1.3 - 1.8) / 2)
    assert by_folder["0001_NaCl"]["status"] == "broken" and by_folder["0001_NaCl"]["message"]
    broken = by_folder["0002_KBr"]
    assert broken["status"] == "broken" and broken["formula"] == "KBr"  # named from its POSCAR
    assert by_folder["0003_NaCl"]["total_energy"] == pytest.approx(-7.0)
    assert table["imported_at"].notna().all()


def test_import_marks_exported_folders_without_results_missing(tmp_path):
    energies = tmp_path / "energies.parquet"
    _energies().to_parquet(energies)
    run_vasp_stage(energies, tmp_path / "vasp", VaspConfig())
    kbr_static = Path(pd.read_csv(tmp_path / "vasp" / "manifest.csv").loc[0, "static_dir"])
    shutil.copy(FIXTURE, kbr_static / "vasprun.xml")
    table = import_dft(tmp_path / "vasp", progress=False)
    assert sorted(table["status"]) == ["missing", "missing", "missing", "ok"]
    done = table[table["status"] == "ok"].iloc[0]
    assert done["candidate"] == "KBr" and done["formula"] == "NaCl"  # the run's own structure names the row
    assert set(table.loc[table["status"] == "missing", "candidate"]) == {"KBr", "BaZrO3"}


def test_dft_results_become_oracle_labels_and_catalog_rows(tmp_path):
    table = import_dft(_runs(tmp_path), progress=False)
    labels = dft_oracle_table(table)
    assert labels["formula"].tolist() == ["NaCl"] and labels["band_gap"].tolist() == [5.0]
    oracle = TableOracle(labels)
    out = oracle.label(["Na2Cl2", "KBr"])
    assert out.gaps[0] == 5.0 and out.status[1] != "ok"
    parquet = tmp_path / "dft.parquet"
    table.to_parquet(parquet)
    dataset = tmp_path / "dataset.parquet"
    pd.DataFrame(
        {"dataset": "d", "row": [0], "formula": ["NaCl"], "reduced_formula": ["NaCl"], "split": ["train"]}
    ).to_parquet(dataset)
    counts = build_catalog(tmp_path / "c.duckdb", dataset, "d", extra=[Load("dft_results", parquet)])
    assert counts["dft_results"] == len(table)
    with CatalogReader(tmp_path / "c.duckdb") as reader:
        ok = reader.table("dft_results", {"status": "ok"})
    assert set(ok["formula"]) == {"NaCl"} and ok["band_gap"].tolist() == [5.0, 5.0]


def test_import_dft_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = _runs(tmp_path)
    (tmp_path / "refs.json").write_text(json.dumps({"Na": -1.3, "Cl": -1.8}))
    args = ["import-dft", str(root), "--references", "refs.json", "--oracle-out", "dft_oracle", "--no-mlflow"]
    assert main([*args, "--db", "c.duckdb"]) == 0
    table = pd.read_parquet(tmp_path / "data" / "dft" / "dft_results.parquet")
    with CatalogReader(tmp_path / "c.duckdb") as reader:
        assert len(reader.table("dft_results")) == len(table)
    assert (table["status"] == "broken").sum() == 2 and table["formation_energy_per_atom"].notna().sum() == 2
    assert "4 runs" in capsys.readouterr().out
    labels = load_oracle(tmp_path / "dft_oracle").label(["NaCl", "KBr"])
    assert labels.gaps[0] == pytest.approx(5.0) and labels.status[1] != "ok"
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["import-dft", str(root), "--references", "bad.json", "--no-mlflow"]) == 2
