"""The screening benchmark: its synthetic sample stream and a run at tiny sizes with a tiny real forest."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bench.screening as screening_bench
from agd.chem.formula import formula_key
from agd.config import ForestConfig
from agd.models.forest import train_forest
from bench import BenchOptions, Skipped
from tests.conftest import read_shared_csv


def test_stream_index_repeats_each_candidate_and_smaller_sizes_are_prefixes(monkeypatch):
    monkeypatch.setattr(screening_bench, "TARGET_ROWS", 12)
    weights = [3, 1, 5]
    full = screening_bench.stream_index(weights, 12, seed=0)
    assert len(full) == 12
    counts = np.bincount(full, minlength=3)
    assert (counts >= weights).all() and counts.sum() == 12
    assert (screening_bench.stream_index(weights, 5, seed=0) == full[:5]).all()
    assert not (screening_bench.stream_index(weights, 12, seed=1) == full).all()


def test_screening_bench_runs_and_judges_the_targets(shared_data, tmp_path, monkeypatch):
    data = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv").sample(600, random_state=0)
    forest = train_forest(
        data["reduced_formula"].tolist()[:200],
        data["band_gap"].to_numpy()[:200],
        ForestConfig(n_estimators=10, n_jobs=1),
    )
    forest_path = forest.save(tmp_path / "forest.joblib")
    formulas = data["reduced_formula"].tolist()
    candidates = tmp_path / "candidates.parquet"
    table = {
        "formula": formulas,
        "reduced_formula": [formula_key(f) for f in formulas],
        "valid": [True] * len(formulas),
        "novel": [False] * len(formulas),
        "n_sampled": np.arange(len(formulas)) % 3 + 1,
    }
    pq.write_table(pa.table(table), candidates)
    monkeypatch.setattr(screening_bench, "CANDIDATES", candidates)
    monkeypatch.setattr(screening_bench, "FOREST", forest_path)
    monkeypatch.setattr(screening_bench, "TARGET_ROWS", 1500)
    monkeypatch.setenv("AGD_BENCH_CACHE", str(tmp_path / "cache"))
    section = screening_bench.run(BenchOptions(sizes=[400, 1500], repeats=1, quick=True))
    assert section.name == "screening"
    assert "| 1,500 |" in section.body and "| 400 |" in section.body
    assert [t.met for t in section.targets] == [True, True]  # seconds and a fraction of a GiB
    hits = pq.read_table(tmp_path / "cache" / "out" / "hits-1500.parquet")
    assert hits.num_rows > 0 and set(hits["row"].to_pylist()) <= set(range(1500))
    monkeypatch.setattr(screening_bench, "FOREST", tmp_path / "absent.joblib")
    with pytest.raises(Skipped, match="absent.joblib"):
        screening_bench.run(BenchOptions(sizes=[400], repeats=1))
