import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import requests
from pymatgen.core import Lattice, Structure

from agd.config import DataConfig, MPSourceConfig
from agd.data import sources
from agd.data.sources import (
    RAW_COLUMNS,
    DataSourceError,
    fetch,
    fetch_matbench,
    fetch_mp,
    load_local,
    resolve_source,
)

# ---------------------------------------------------------------------------------------------------
# the shared offline files

#: Every shared file with a band-gap column -> the column the formula must come from, and structures?
SHARED_GAP_FILES = {
    "mp_gap_agd_exp1.csv": ("composition", False),
    "mp_gap_by_composition.csv": ("formula", False),
    "mp_gap_all_polymorphs_2019.csv": ("formula", False),
    "matbench_mp_gap.csv": ("formula", False),
    "expt_gap_matbench.csv": ("formula", False),
    "formulas_oqmd_crabnet.csv.gz": ("formula", False),
    "structures_mp40_chemeleon.csv.gz": ("reduced_formula", True),  # its only formula column
    "structures_mp20_diffhedron.csv.gz": ("pretty_formula", True),
    "agd_paper/bd_test_only.csv": ("composition", False),
    "agd_paper/roost_simple_candidate_exp1_M0_0224.csv": ("composition", False),
}
SHARED_NO_GAP_FILES = {"formulas_icsd_in_mp_synthnn.csv", "formulas_mp_agd.csv"}


def _shared_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.csv*"))


@pytest.mark.parametrize("name", sorted(SHARED_GAP_FILES))
def test_shared_file_loads_with_the_right_formula_column(shared_data, name):
    formula_column, has_structure = SHARED_GAP_FILES[name]
    df = load_local(shared_data / name)
    raw = pd.read_csv(shared_data / name, keep_default_na=False, dtype=str)
    assert list(df.columns[:6]) == RAW_COLUMNS
    assert len(df) == len(raw)
    assert df["row"].tolist() == list(range(1, len(raw) + 1))
    assert df["formula"].tolist() == raw[formula_column].tolist()
    assert df["band_gap"].dtype == float and df["band_gap"].notna().all()
    assert ("structure" in df.columns) == has_structure
    if has_structure:
        assert df["structure"].str.startswith("# generated using pymatgen").all()


def test_every_shared_file_is_covered_or_has_no_gap_column(shared_data):
    for name in _shared_files(shared_data):
        if name in SHARED_GAP_FILES:
            continue
        if name.startswith("agd_paper/"):  # same layout as the two agd_paper files above
            df = load_local(shared_data / name)
            assert df["formula"].notna().all() and df["band_gap"].notna().all(), name
            continue
        assert name in SHARED_NO_GAP_FILES, f"{name} is new: add it to SHARED_GAP_FILES"
        with pytest.raises(DataSourceError, match="no band-gap column"):
            load_local(shared_data / name)


def test_paper_exp1_file(shared_data):
    df = load_local(shared_data / "mp_gap_agd_exp1.csv")
    assert len(df) == 42_669
    assert list(df.columns) == [*RAW_COLUMNS, "agd_id", "reduced_formula", "in_agd_bd_test"]
    assert df["formula"].iloc[0] == "Mg1Mn6O12"  # composition, not reduced_formula "MgMn6O12"
    assert df["in_agd_bd_test"].dtype == bool and df["in_agd_bd_test"].sum() == 500
    assert df["material_id"].isna().all()  # agd_id is AGD's row number, not an MP id
    assert (df["band_gap"] > 0).all()


def test_sodium_nitride_formula_nan_survives(shared_data):
    df = load_local(shared_data / "mp_gap_by_composition.csv")
    hit = df[df["material_id"] == "mp-1080032"]
    assert hit["formula"].tolist() == ["NaN"]
    assert df["formula"].isna().sum() == 0
    assert df["energy_above_hull"].isna().sum() == 84_295 - 65_397  # e_above_hull is recognised


# ---------------------------------------------------------------------------------------------------
# small synthetic local files


def _csv(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_common_column_names_are_recognised_in_any_case(tmp_path):
    path = _csv(
        tmp_path,
        "MP_ID,Pretty_Formula,Gap PBE,E_Form,EHull,CIF,note\nmp-1,NaCl,5.0,-2.1,0.0,cif text,a\nmp-2,NaN,1.5,,0.1,,b\n",
    )
    df = load_local(path)
    assert list(df.columns) == [*RAW_COLUMNS, "structure", "note"]
    assert df["material_id"].tolist() == ["mp-1", "mp-2"]
    assert df["formula"].tolist() == ["NaCl", "NaN"]
    assert df["band_gap"].tolist() == [5.0, 1.5]
    assert df["formation_energy_per_atom"].iloc[0] == -2.1 and np.isnan(
        df["formation_energy_per_atom"].iloc[1]
    )
    assert df["energy_above_hull"].tolist() == [0.0, 0.1]
    assert df["structure"].tolist() == ["cif text", None]


def test_unreduced_formula_is_preferred(tmp_path):
    path = _csv(tmp_path, "reduced_formula,Eg,composition\nMgO,7.0,Mg2O2\n")
    df = load_local(path)
    assert df["formula"].tolist() == ["Mg2O2"]
    assert df["reduced_formula"].tolist() == ["MgO"]  # the other one stays as an extra column


def test_user_mapping_wins_over_recognised_names(tmp_path):
    path = _csv(tmp_path, "comp,formula,my_gap,gap,row\nMg2O2,MgO,7.5,1.0,17\n")
    df = load_local(path, {"comp": "formula", "MY_GAP": "band_gap"})
    assert df["formula"].tolist() == ["Mg2O2"] and df["band_gap"].tolist() == [7.5]
    # unmapped columns with a standard name keep their data under a prefixed name
    assert list(df.columns) == [*RAW_COLUMNS, "source_formula", "gap", "source_row"]
    assert df["source_formula"].tolist() == ["MgO"] and df["source_row"].tolist() == [17]


def test_bad_user_mapping_is_a_clear_error(tmp_path):
    path = _csv(tmp_path, "formula,band_gap\nNaCl,5\n")
    with pytest.raises(DataSourceError, match="'nope'.*no such column.*'formula', 'band_gap'"):
        load_local(path, {"nope": "formula"})
    with pytest.raises(DataSourceError, match="not a standard column"):
        load_local(path, {"formula": "composition"})


@pytest.mark.parametrize(
    ("header", "missing"),
    [("name,band_gap", "formula"), ("formula,value", "band-gap"), ("name,value", "formula or band-gap")],
)
def test_missing_formula_or_gap_column_lists_columns_and_how_to_map(tmp_path, header, missing):
    path = _csv(tmp_path, f"{header}\nNaCl,5\n")
    with pytest.raises(DataSourceError) as err:
        load_local(path)
    text = str(err.value)
    assert f"no {missing} column found" in text
    for column in header.split(","):
        assert repr(column) in text
    assert "params.yaml" in text and "columns:" in text


def test_bad_gap_text_becomes_nan_and_rows_are_kept(tmp_path, caplog):
    path = _csv(tmp_path, "formula,band_gap\nNaCl,5.0\nKCl,abc\nLiF,\nMgO,NaN\nGaN, 3.4 \n,1.0\n")
    with caplog.at_level(logging.WARNING, logger="agd.data.sources"):
        df = load_local(path)
    assert df["row"].tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(df["band_gap"].to_numpy(), [5.0, np.nan, np.nan, np.nan, 3.4, 1.0])
    assert df["formula"].tolist() == ["NaCl", "KCl", "LiF", "MgO", "GaN", None]
    assert "1 band_gap value(s) are not numbers" in caplog.text and "'abc'" in caplog.text


def test_parquet_and_gzip(tmp_path):
    table = pd.DataFrame(
        {"material_id": ["mp-1", "mp-2", "mp-3"], "Formula": ["NaN", None, "GaN"], "gap": ["1.0", "x", None]}
    )
    table.to_parquet(tmp_path / "t.parquet")
    table.set_index("material_id").to_parquet(tmp_path / "indexed.parquet")
    for name in ("t.parquet", "indexed.parquet"):
        df = load_local(tmp_path / name)
        assert df["material_id"].tolist() == ["mp-1", "mp-2", "mp-3"], name
        assert df["formula"].tolist() == ["NaN", None, "GaN"], name
        np.testing.assert_array_equal(df["band_gap"].to_numpy(), [1.0, np.nan, np.nan])
    table.to_csv(tmp_path / "t.csv.gz", index=False)
    assert load_local(tmp_path / "t.csv.gz")["formula"].tolist() == ["NaN", None, "GaN"]


def test_unsupported_or_unreadable_files(tmp_path):
    with pytest.raises(DataSourceError, match="unsupported file type"):
        load_local(_csv(tmp_path, "formula,band_gap\n", name="data.xlsx"))
    with pytest.raises(DataSourceError, match="no such file"):
        load_local(tmp_path / "absent.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataSourceError, match="could not read it as parquet"):
        load_local(tmp_path / "broken.parquet")


# ---------------------------------------------------------------------------------------------------
# resolve_source


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "env.csv").write_text("formula,band_gap\nNaCl,5\n")
    (tmp_path / "cfg.csv").write_text("formula,band_gap\nKCl,6\n")
    return tmp_path


def test_auto_prefers_agd_data_over_data_path(files):
    got = resolve_source(DataConfig(path="cfg.csv"), {"AGD_DATA": "env.csv", "MP_API_KEY": "k"})
    assert (got.kind, got.path) == ("local", Path("env.csv")) and "AGD_DATA" in got.reason


def test_auto_uses_data_path_relative_to_cwd(files):
    got = resolve_source(DataConfig(path="cfg.csv"), {"MP_API_KEY": "k"})
    assert (got.kind, got.path) == ("local", Path("cfg.csv")) and "data.path" in got.reason


def test_auto_skips_a_missing_agd_data_for_an_existing_data_path(files, caplog):
    with caplog.at_level(logging.WARNING, logger="agd.data.sources"):
        got = resolve_source(DataConfig(path="cfg.csv"), {"AGD_DATA": "typo.csv"})
    assert (got.kind, got.path) == ("local", Path("cfg.csv"))
    assert "AGD_DATA = 'typo.csv' is not an existing file" in got.reason and "typo.csv" in caplog.text


def test_auto_falls_back_to_mp_then_matbench(files, caplog):
    with caplog.at_level(logging.WARNING, logger="agd.data.sources"):
        got = resolve_source(DataConfig(path="typo.csv"), {"MP_API_KEY": "k"})
    assert got.kind == "mp" and got.path is None
    assert "typo.csv" in got.reason and "MP_API_KEY is set" in got.reason and "typo.csv" in caplog.text
    assert resolve_source(DataConfig(), {"MP_API_KEY": "k"}).kind == "mp"
    assert resolve_source(DataConfig(), {}).kind == "matbench"
    assert resolve_source(DataConfig(), {"MP_API_KEY": ""}).kind == "matbench"
    assert resolve_source(DataConfig(path="."), {}).kind == "matbench"  # a folder is not a file


def test_explicit_sources(files):
    env = {"AGD_DATA": "env.csv", "MP_API_KEY": "k"}
    assert resolve_source(DataConfig(source="mp"), {}).kind == "mp"
    assert resolve_source(DataConfig(source="matbench"), env).kind == "matbench"
    assert resolve_source(DataConfig(source="local", path="cfg.csv"), {}).path == Path("cfg.csv")
    assert resolve_source(DataConfig(source="local", path="cfg.csv"), env).path == Path("env.csv")


def test_explicit_local_without_a_file_names_the_path(files):
    with pytest.raises(DataSourceError, match=r"data.path = 'missing.csv' does not exist"):
        resolve_source(DataConfig(source="local", path="missing.csv"), {})
    with pytest.raises(DataSourceError, match=r"AGD_DATA = 'gone.parquet' does not exist"):
        resolve_source(DataConfig(source="local", path="cfg.csv"), {"AGD_DATA": "gone.parquet"})
    with pytest.raises(DataSourceError, match="no file is given"):
        resolve_source(DataConfig(source="local"), {})


def test_fetch_local_provenance(files):
    df, prov = fetch(DataConfig(), {"AGD_DATA": "env.csv"})
    assert df["formula"].tolist() == ["NaCl"]
    assert prov["kind"] == "local" and prov["path"] == "env.csv" and prov["rows"] == 1
    assert prov["sha256"] == hashlib.sha256((files / "env.csv").read_bytes()).hexdigest()
    assert prov["column_map"] == {"formula": "formula", "band_gap": "band_gap"}
    assert prov["versions"]["pandas"] == pd.__version__
    assert (
        "retrieved_at" not in prov
    )  # a local file is identified by its hash: re-runs give identical provenance
    assert fetch(DataConfig(), {"AGD_DATA": "env.csv"})[1] == prov
    json.dumps(prov)


# ---------------------------------------------------------------------------------------------------
# Materials Project (client mocked)

KEY = "SeCrEtKeY0123456789abcdefSECRET9"  # 32 characters, like a real key


def _nacl() -> Structure:
    return Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


class _MPID:
    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


def _docs(with_structure: bool):
    rows = [
        ("mp-22862", "NaCl", 5.0, -2.1, 0.0),
        ("mp-149", "Si", 0.6, 0.0, 0.0),
        ("mp-1", "Cs", None, 0.0, None),
    ]
    docs = []
    for mid, formula, gap, ef, eh in rows:
        fields = {
            "material_id": _MPID(mid),
            "formula_pretty": formula,
            "band_gap": gap,
            "formation_energy_per_atom": ef,
            "energy_above_hull": eh,
        }
        if with_structure:
            fields["structure"] = _nacl()
        docs.append(SimpleNamespace(**fields))
    return docs


class FakeRester:
    """Stands in for mp_api.client.MPRester: records calls, returns summary docs with attributes."""

    calls: list = []
    fail_with: Exception | None = None
    fail_in_init: bool = False

    def __init__(self, api_key=None, **kwargs):
        if FakeRester.fail_in_init and FakeRester.fail_with is not None:
            raise FakeRester.fail_with
        self.db_version = "2025.01.01"
        self.materials = SimpleNamespace(summary=SimpleNamespace(search=self.search))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def search(
        self,
        band_gap=None,
        deprecated=None,
        include_gnome=True,
        num_chunks=None,
        chunk_size=1000,
        fields=None,
    ):
        FakeRester.calls.append(
            dict(
                band_gap=band_gap,
                deprecated=deprecated,
                include_gnome=include_gnome,
                num_chunks=num_chunks,
                chunk_size=chunk_size,
                fields=fields,
            )
        )
        if FakeRester.fail_with is not None:
            raise FakeRester.fail_with
        return _docs("structure" in fields)


@pytest.fixture()
def fake_mp(monkeypatch):
    FakeRester.calls, FakeRester.fail_with, FakeRester.fail_in_init = [], None, False
    monkeypatch.setattr(sources, "MPRester", FakeRester)
    return FakeRester


def test_mp_schema_and_query_arguments(fake_mp):
    cfg = DataConfig(mp=MPSourceConfig(chunk_size=250, num_chunks=3, band_gap_min=0.1))
    df = fetch_mp(cfg, KEY)
    assert list(df.columns) == RAW_COLUMNS
    assert df["material_id"].tolist() == ["mp-22862", "mp-149", "mp-1"]
    assert df["formula"].tolist() == ["NaCl", "Si", "Cs"]
    np.testing.assert_array_equal(df["band_gap"].to_numpy(), [5.0, 0.6, np.nan])
    assert np.isnan(df["energy_above_hull"].iloc[2])
    (call,) = fake_mp.calls
    assert call["chunk_size"] == 250 and call["num_chunks"] == 3
    assert call["band_gap"] == (0.1, None)
    assert call["deprecated"] is False and call["include_gnome"] is False
    assert call["fields"] == sources.MP_FIELDS


def test_mp_structures_become_cif(fake_mp):
    df = fetch_mp(DataConfig(mp=MPSourceConfig(include_structure=True)), KEY)
    assert list(df.columns) == [*RAW_COLUMNS, "structure"]
    assert "structure" in fake_mp.calls[0]["fields"] and fake_mp.calls[0]["band_gap"] is None
    back = Structure.from_str(df["structure"].iloc[0], fmt="cif")
    assert back.composition.reduced_formula == "NaCl"


def test_mp_dict_documents(fake_mp, monkeypatch):
    docs = [{"material_id": "mp-2", "formula_pretty": "Pd", "band_gap": 0.0, "structure": _nacl().as_dict()}]
    frame = sources._mp_docs_to_frame(docs, include_structure=True)
    assert frame["material_id"].tolist() == ["mp-2"] and frame["structure"].iloc[0].startswith("# generated")


@pytest.mark.parametrize(
    ("error", "in_init", "expected"),
    [
        (
            RuntimeError(f"REST query returned 401 Unauthorized (x-api-key: {KEY})"),
            False,
            "did not accept the key",
        ),
        (requests.exceptions.ConnectionError(f"Max retries exceeded; key={KEY}"), True, "could not reach"),
        (ValueError(f"something odd with {KEY}"), False, "download failed"),
    ],
)
def test_mp_errors_are_actionable_and_hide_the_key(fake_mp, caplog, error, in_init, expected):
    fake_mp.fail_with, fake_mp.fail_in_init = error, in_init
    with caplog.at_level(logging.DEBUG), pytest.raises(DataSourceError) as err:
        fetch_mp(DataConfig(), KEY)
    text = str(err.value)
    assert expected in text and "data.source: local" in text and "AGD_DATA" in text
    assert KEY not in text and "<MP_API_KEY>" in text
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert KEY not in caplog.text


def test_mp_without_a_key(fake_mp):
    for key in (None, ""):
        with pytest.raises(DataSourceError, match="MP_API_KEY is not set"):
            fetch_mp(DataConfig(), key)
    assert fake_mp.calls == []


def test_fetch_mp_provenance_has_no_key(fake_mp):
    df, prov = fetch(DataConfig(source="auto"), {"MP_API_KEY": KEY})
    assert prov["kind"] == "mp" and prov["rows"] == len(df) == 3
    assert prov["mp"]["db_version"] == "2025.01.01" and prov["mp"]["query"]["chunk_size"] == 1000
    assert KEY not in json.dumps(prov)


# ---------------------------------------------------------------------------------------------------
# matbench (matminer mocked)


def _fake_matbench(name):
    assert name == "matbench_mp_gap"
    conventional = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    silicon = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    return pd.DataFrame({"structure": [conventional, silicon], "gap pbe": [5.0, 0.6]})


def test_matbench_schema(monkeypatch):
    monkeypatch.setattr(sources, "load_dataset", _fake_matbench)
    df = fetch_matbench()
    assert list(df.columns) == RAW_COLUMNS
    assert df["formula"].tolist() == ["Na4Cl4", "Si2"]  # cell formula, not reduced
    assert df["band_gap"].tolist() == [5.0, 0.6] and df["material_id"].isna().all()
    with_cif = fetch_matbench(include_structure=True)
    assert Structure.from_str(with_cif["structure"].iloc[1], fmt="cif").composition.formula == "Si2"


def test_matbench_offline_error_says_how_to_use_a_local_file(monkeypatch):
    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'ml.materialsproject.org'")

    monkeypatch.setattr(sources, "load_dataset", offline)
    with pytest.raises(DataSourceError) as err:
        fetch_matbench()
    text = str(err.value)
    assert "matbench_mp_gap" in text and "ConnectionError" in text
    assert "AGD_DATA=" in text and "data.path" in text and "data.source: local" in text


def test_matbench_unexpected_columns(monkeypatch):
    monkeypatch.setattr(sources, "load_dataset", lambda name: pd.DataFrame({"composition": ["NaCl"]}))
    with pytest.raises(DataSourceError, match="no structure, gap pbe column"):
        fetch_matbench()


def test_fetch_auto_without_anything_uses_matbench(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "load_dataset", _fake_matbench)
    df, prov = fetch(DataConfig(), {})
    assert prov["kind"] == "matbench" and prov["matbench"]["dataset"] == "matbench_mp_gap"
    assert prov["rows"] == 2 and "structure" not in df.columns
    json.dumps(prov)


def test_raw_tables_survive_parquet(fake_mp, tmp_path):
    """`agd data fetch` stores the raw table as parquet: every source's frame must round-trip."""
    local = load_local(_csv(tmp_path, "formula,band_gap,flag\nNaN,1.0,True\n,x,False\n"))
    mp = fetch_mp(DataConfig(mp=MPSourceConfig(include_structure=True)), KEY)
    for frame in (local, mp):
        frame.to_parquet(tmp_path / "raw.parquet", index=False)
        back = pd.read_parquet(tmp_path / "raw.parquet")
        assert list(back.columns) == list(frame.columns)
        assert back["formula"].tolist() == frame["formula"].tolist()
        assert back["material_id"].tolist() == frame["material_id"].tolist()
    assert back["structure"].tolist() == mp["structure"].tolist()
