"""DuckDB catalog: schema, idempotent keyed loads, the read-only reader and the catalog builder."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from agd.tracking.catalog import (
    PROVENANCE_COLUMNS,
    TABLES,
    CatalogError,
    CatalogMissingError,
    CatalogReader,
    Load,
    build_catalog,
    create_schema,
    load_table,
)

HOSTILE = "x' OR 1=1 --"


def prepared(n: int = 3, *, extra: bool = False) -> pd.DataFrame:
    """A small frame shaped like the data stage's prepared parquet."""
    frame = pd.DataFrame(
        {
            "row": np.arange(n),
            "material_id": [f"mp-{i}" for i in range(n)],
            "formula": ["NaCl", "K4Mn4O8", "GaAs"][:n],
            "reduced_formula": ["NaCl", "KMnO2", "GaAs"][:n],
            "n_elements": [2, 3, 2][:n],
            "n_atoms": [2, 16, 2][:n],
            "band_gap": [5.0, np.nan, 1.4][:n],
            "formation_energy_per_atom": [-2.0, -1.5, -0.4][:n],
            "energy_above_hull": [0.0, 0.01, 0.0][:n],
            "split": ["train", "val", "test"][:n],
            "n_merged": [1, 2, 1][:n],
        }
    )
    if extra:
        frame["structure_json"] = "{}"
    return frame


def counts(db) -> dict[str, int]:
    with CatalogReader(db) as reader:
        return reader.tables()


def test_schema_defines_all_tables_with_provenance():
    assert set(TABLES) == {
        "datasets",
        "candidates",
        "al_samples",
        "screening",
        "screening_metrics",
        "screening_labels_kept",
        "screening_check",
        "screening_domain",
        "structures",
        "dft_results",
        "design_map",
    }
    for columns in TABLES.values():
        names = [column.name for column in columns]
        assert names[-2:] == list(PROVENANCE_COLUMNS)
        assert not any(column.required for column in columns if column.name in PROVENANCE_COLUMNS)
    types = {column.name: column.type for column in TABLES["al_samples"]}
    assert types["latent"] == "FLOAT[]"

    con = duckdb.connect(":memory:")
    create_schema(con)
    create_schema(con)  # idempotent
    found = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert found == set(TABLES)


def test_schema_mismatch_is_reported():
    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE datasets (formula VARCHAR)")
    with pytest.raises(CatalogError, match="datasets.*agd catalog"):
        create_schema(con)


@pytest.mark.parametrize("as_parquet", [False, True])
def test_loading_same_source_twice_keeps_one_copy(tmp_path, as_parquet):
    db = tmp_path / "agd.duckdb"
    frame = prepared()
    if as_parquet:
        source = tmp_path / "prepared.parquet"
        frame.to_parquet(source)
        kwargs = {}
    else:
        source, kwargs = frame, {"source_file": "prepared.parquet"}
    key = {"dataset": "demo"}
    assert load_table(db, "datasets", source, key=key, **kwargs) == 3
    assert load_table(db, "datasets", source, key=key, **kwargs) == 3

    with CatalogReader(db) as reader:
        assert reader.tables()["datasets"] == 3
        rows = reader.table("datasets")
    assert set(rows["dataset"]) == {"demo"}
    assert rows["source_file"].str.endswith("prepared.parquet").all()
    assert rows["loaded_at"].notna().all()
    # NaN from pandas and from parquet both land as NULL
    assert rows.loc[rows["formula"] == "K4Mn4O8", "band_gap"].isna().all()


def test_default_key_is_the_source_file_and_other_keys_add_rows(tmp_path):
    db = tmp_path / "agd.duckdb"
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    frame = prepared().assign(dataset="demo")
    frame.to_parquet(first)
    frame.iloc[:2].to_parquet(second)

    load_table(db, "datasets", first)
    load_table(db, "datasets", second)
    load_table(db, "datasets", first)
    assert counts(db)["datasets"] == 5

    # a new version of the same source replaces the old rows
    frame.iloc[:1].to_parquet(first)
    load_table(db, "datasets", first)
    with CatalogReader(db) as reader:
        per_file = reader.query(
            "SELECT source_file, count(*) AS n FROM datasets GROUP BY source_file ORDER BY source_file"
        )
    assert per_file["n"].tolist() == [1, 2]


def test_optional_columns_become_null_and_key_fills_absent_columns(tmp_path):
    db = tmp_path / "agd.duckdb"
    samples = pd.DataFrame(
        {
            "repeat": [0, 0],
            "round": [1, 1],
            "idx": [0, 1],
            "latent": [np.array([0.1, 0.2], dtype=np.float32), None],
            "formula": ["NaCl", None],
            "fate": ["registered", "undecodable"],
        }
    )
    load_table(db, "al_samples", samples, key={"campaign": "exp1-r0"})
    with CatalogReader(db) as reader:
        rows = reader.table("al_samples", {"campaign": "exp1-r0"})
        assert reader.table("al_samples", {"formula": None})["fate"].tolist() == ["undecodable"]
        assert len(reader.table("al_samples", {"fate": ["registered", "invalid"]})) == 1
        assert reader.table("al_samples", {"fate": []}).empty
    assert rows["label"].isna().all() and rows["experiment"].isna().all()
    assert rows.loc[0, "source_file"] == "<DataFrame>"
    assert np.allclose(rows.loc[0, "latent"], [0.1, 0.2])


def test_bad_columns_are_clear_errors_and_change_nothing(tmp_path):
    db = tmp_path / "agd.duckdb"
    key = {"dataset": "demo"}
    load_table(db, "datasets", prepared(), key=key)

    with pytest.raises(CatalogError, match=r"unknown column\(s\) \['structure_json'\] for table 'datasets'"):
        load_table(db, "datasets", prepared(extra=True), key=key)
    with pytest.raises(
        CatalogError, match=r"missing required column\(s\) \['formula'\] for table 'datasets'"
    ):
        load_table(db, "datasets", prepared().drop(columns="formula"), key=key)
    with pytest.raises(CatalogError, match="set by the loader"):
        load_table(db, "datasets", prepared().assign(source_file="x"), key=key)
    with pytest.raises(CatalogError, match="unknown catalog table 'dataset'"):
        load_table(db, "dataset", prepared(), key=key)
    with pytest.raises(CatalogError, match="'nope' is not a loadable column"):
        load_table(db, "datasets", prepared(), key={"nope": 1})
    with pytest.raises(CatalogError, match="row.*other than the load key"):
        load_table(db, "datasets", prepared().assign(dataset="other"), key=key)
    with pytest.raises(CatalogError, match="Could not convert"):
        load_table(db, "datasets", prepared(), key={"dataset": "demo", "row": "abc"})
    with pytest.raises(CatalogError, match="source_file= or key="):
        load_table(db, "datasets", prepared().assign(dataset="demo"))
    with pytest.raises(CatalogError, match="does not exist"):
        load_table(db, "datasets", tmp_path / "missing.parquet", key=key)
    # a value the database rejects fails the whole load: the earlier rows survive
    with pytest.raises(CatalogError, match="datasets"):
        load_table(db, "datasets", prepared().assign(split="holdout"), key=key)
    assert counts(db)["datasets"] == 3


def test_reader_is_read_only(tmp_path):
    db = tmp_path / "agd.duckdb"
    load_table(db, "datasets", prepared(), key={"dataset": "demo"})
    with CatalogReader(db) as reader:
        for sql in (
            "DELETE FROM datasets",
            "DROP TABLE datasets",
            "INSERT INTO datasets SELECT * FROM datasets",
        ):
            with pytest.raises(duckdb.Error, match="read-only"):
                reader.query(sql)
        assert reader.tables()["datasets"] == 3


def test_missing_database_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(CatalogMissingError, match="agd catalog") as info:
        CatalogReader(tmp_path / "agd.duckdb")
    assert isinstance(info.value, FileNotFoundError)
    assert "dvc repro pipelines/dvc.yaml" in str(info.value)
    assert not (tmp_path / "agd.duckdb").exists()


def test_hostile_filter_values_are_bound_not_spliced(tmp_path):
    db = tmp_path / "agd.duckdb"
    load_table(db, "datasets", prepared(), key={"dataset": "demo"})
    load_table(db, "datasets", prepared(1).assign(formula=HOSTILE), key={"dataset": HOSTILE})
    with CatalogReader(db) as reader:
        assert reader.table("datasets", {"formula": "nothing' OR 1=1 --"}).empty
        assert reader.table("datasets", {"dataset": "demo", "split": HOSTILE}).empty
        assert sorted(reader.table("datasets", {"formula": [HOSTILE, "NaCl"]})["formula"]) == [
            "NaCl",
            HOSTILE,
        ]
        assert reader.query("SELECT * FROM datasets WHERE formula = ?", ["x'; DROP TABLE datasets; --"]).empty
        assert len(reader.table("datasets", {"dataset": HOSTILE})) == 1
        with pytest.raises(CatalogError, match="unknown column"):
            reader.table("datasets", {"formula = formula OR 1": 1})
        assert reader.tables()["datasets"] == 4
    # deleting by a hostile key removed only its own rows
    load_table(db, "datasets", prepared(0), key={"dataset": HOSTILE})
    assert counts(db)["datasets"] == 3


def test_build_catalog_is_fresh_atomic_and_ignores_extra_columns(tmp_path):
    db = tmp_path / "out" / "agd.duckdb"
    parquet = tmp_path / "prepared.parquet"
    prepared(extra=True).to_parquet(parquet)
    candidates = pd.DataFrame({"run_id": "gan-1", "formula": ["NaCl", "LiF"], "source": "gan", "scratch": 0})

    extra = [Load("candidates", candidates, key={"run_id": "gan-1"})]
    assert build_catalog(db, parquet, "demo", extra=extra)["datasets"] == 3
    # a reader holding the old file does not block a rebuild
    with CatalogReader(db) as old:
        result = build_catalog(db, parquet, "demo", extra=extra)
        assert old.tables()["datasets"] == 3
    assert result["datasets"] == 3 and result["candidates"] == 2
    assert counts(db) == result
    assert sorted(path.name for path in db.parent.iterdir()) == ["agd.duckdb"]

    # a failed build leaves the previous catalog in place and no temporary files
    prepared().assign(split="holdout").to_parquet(parquet)
    with pytest.raises(CatalogError, match="datasets"):
        build_catalog(db, parquet, "demo")
    assert counts(db) == result
    assert sorted(path.name for path in db.parent.iterdir()) == ["agd.duckdb"]


def test_design_map_is_the_live_embedding_of_the_same_sample(tmp_path):
    """The catalog's stored t-SNE map holds the points (and coordinates) the dashboard would embed live."""
    from agd.config import DesignMapConfig
    from agd.tracking.design_map import embed_sample, latent_sample_query, selection_key
    from dashboard.synthetic import synthetic_tables, write_synthetic_catalog

    tables = synthetic_tables(seed=3)
    db = tmp_path / "agd.duckdb"
    cfg = DesignMapConfig(n_points=120, perplexity=10, seed=4)
    counts = write_synthetic_catalog(db, tmp_path / "parquet", tables, design_map=cfg)
    experiments = sorted(set(tables["al_samples"]["experiment"]) - {"kappa"})
    assert counts["design_map"] == 120  # 60 from round 0, 60 suggestions
    with CatalogReader(db) as reader:
        stored = reader.query("SELECT * FROM design_map ORDER BY campaign, repeat, round, idx")
        sql, params = latent_sample_query(experiments, cfg.n_points, cfg.seed)
        live = embed_sample(reader.query(sql, params), seed=cfg.seed, perplexity=cfg.perplexity)
    assert set(stored["experiments"]) == {selection_key(experiments)}
    assert set(stored["sample"]) == {"training (round 0)", "active learning"}
    assert not set(stored["experiment"]) & {"kappa"}
    assert stored["formula"].tolist() == live["formula"].tolist()
    assert np.allclose(
        stored[["tsne_1", "tsne_2"]].to_numpy(), live[["tsne_1", "tsne_2"]].to_numpy(), atol=1e-4
    )

    # without a design_map setting the table stays empty
    counts = write_synthetic_catalog(tmp_path / "plain.duckdb", tmp_path / "parquet2", tables)
    assert counts["design_map"] == 0
