"""Streaming screen of a candidate file: bounded memory, bad rows reported, same numbers as in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agd.chem.formula import parse_formula
from agd.cli import main
from agd.config import ForestConfig, GapWindowConfig, RoostConfig
from agd.models.forest import train_forest
from agd.screening.metrics import window_mask
from agd.screening.stream import (
    StreamError,
    load_screening_model,
    rejected_path_for,
    stream_screen,
)
from tests.conftest import REPO_ROOT, read_shared_csv

WINDOWS = {"gt4": GapWindowConfig(low=4.0, include_low=False), "1-3": GapWindowConfig(low=1.0, high=3.0)}
N_TRAIN = 400


@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory) -> dict:
    """A 20-tree forest trained on 400 real rows, and the real formulas made only of elements it knows."""
    data = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv")
    train = data.sample(N_TRAIN, random_state=0)
    forest = train_forest(
        train["reduced_formula"].tolist(),
        train["band_gap"].to_numpy(),
        ForestConfig(n_estimators=20, max_features=0.3, n_jobs=1),
        seed=0,
    )
    path = forest.save(tmp_path_factory.mktemp("forest") / "forest.joblib")
    pool = [f for f in data["reduced_formula"] if forest.elements.issuperset(parse_formula(f))]
    return {"forest_path": path, "forest": forest, "pool": pool}


def candidate_file(path: Path, pool: list[str], n: int, seed: int = 0, row_group: int = 50_000) -> Path:
    """n real formulas drawn with replacement, with a random 'valid' flag, in several row groups."""
    rng = np.random.default_rng(seed)
    formulas = [pool[i] for i in rng.integers(0, len(pool), n)]
    table = pa.table({"formula": formulas, "valid": rng.random(n) < 0.7})
    pq.write_table(table, path, row_group_size=row_group)
    return path


def test_counts_and_hits_match_an_in_memory_prediction(real, tmp_path):
    path = candidate_file(tmp_path / "cand.parquet", real["pool"], 3000, row_group=1000)
    model = load_screening_model(real["forest_path"], "forest", n_jobs=1)
    # 700 does not divide 3000 nor the row groups: chunks straddle row groups and the last one is short
    result = stream_screen(
        path, model, tmp_path / "hits.parquet", WINDOWS, chunk_size=700, valid_only=True, progress=False
    )
    table = pq.read_table(path).to_pandas()
    selected = table[table["valid"]]
    direct = real["forest"].predict(selected["formula"].tolist())
    assert result.n_rows == 3000 and result.chunks == 5
    assert result.n_selected == len(selected) == result.n_predicted
    assert result.n_rejected == 0
    for name, window in WINDOWS.items():
        assert result.counts[name] == int(window_mask(direct.gaps, window).sum()) > 0
    hits = pq.read_table(tmp_path / "hits.parquet").to_pandas()
    assert len(hits) == result.n_hits == sum(result.counts.values())
    expected = pd.Series(direct.gaps, index=selected.index)
    np.testing.assert_allclose(hits["predicted_gap"], expected.loc[hits["row"]].to_numpy(), rtol=1e-12)
    std = pd.Series(direct.std, index=selected.index)
    np.testing.assert_allclose(hits["predicted_std"], std.loc[hits["row"]].to_numpy(), rtol=1e-6, atol=1e-9)
    assert (hits["formula"].to_numpy() == table.loc[hits["row"], "formula"].to_numpy()).all()
    assert set(hits["gap_window"]) == set(WINDOWS)


def test_bad_rows_are_reported_by_row_and_the_others_screened(real, tmp_path):
    good = real["pool"][:4]
    formulas = [good[0], "", None, "Xx2O3", good[1], "Fe0O", good[2], "Og2O", good[3]]
    path = tmp_path / "cand.parquet"
    pq.write_table(pa.table({"formula": pa.array(formulas, pa.string())}), path)
    model = load_screening_model(real["forest_path"], n_jobs=1)
    wide = {"all": GapWindowConfig(low=-1.0)}  # every predicted row is a hit
    result = stream_screen(path, model, tmp_path / "hits.parquet", wide, chunk_size=4, progress=False)
    assert (result.n_rows, result.n_predicted, result.n_rejected) == (9, 4, 5)
    rejected = pd.read_csv(rejected_path_for(tmp_path / "hits.parquet"), keep_default_na=False)
    assert rejected["row"].tolist() == [1, 2, 3, 5, 7]
    reasons = dict(zip(rejected["row"], rejected["reason"], strict=True))
    assert reasons[2] == "no formula"
    assert reasons[1].startswith("unparsable")
    assert "Xx" in reasons[3]
    assert reasons[7] == "element Og unknown to the model"
    hits = pq.read_table(tmp_path / "hits.parquet").to_pandas()
    assert hits["row"].tolist() == [0, 4, 6, 8]
    np.testing.assert_allclose(hits["predicted_gap"], real["forest"].predict(good).gaps)


def test_unusable_files_are_refused_before_any_state_and_empty_ones_screen(real, tmp_path):
    model = load_screening_model(real["forest_path"], n_jobs=1)
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"formula": [1, 2]}), numbers)
    with pytest.raises(StreamError, match="column 'formula' holds int64, not formula text"):
        stream_screen(numbers, model, tmp_path / "out" / "hits.parquet", progress=False)
    with pytest.raises(StreamError, match="not a readable parquet file"):
        stream_screen(real["forest_path"], model, tmp_path / "out" / "hits.parquet", progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # no part folder was started
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"formula": pa.array([], pa.string())}), empty)
    result = stream_screen(empty, model, tmp_path / "out" / "hits.parquet", progress=False)
    assert (result.n_rows, result.n_hits, result.chunks) == (0, 0, 0)
    assert pq.read_table(tmp_path / "out" / "hits.parquet").schema.names[:2] == ["row", "formula"]


def test_rerun_is_idempotent_and_a_killed_run_resumes(real, tmp_path):
    path = candidate_file(tmp_path / "cand.parquet", real["pool"], 2000, row_group=600)
    model = load_screening_model(real["forest_path"], n_jobs=1)
    out = tmp_path / "hits.parquet"
    first = stream_screen(path, model, out, WINDOWS, chunk_size=500, keep_parts=True, progress=False)
    first_bytes = out.read_bytes()
    parts = tmp_path / ".hits.parquet.parts"
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == [f"part-{k:05d}.parquet" for k in range(4)]
    # a run killed during its last chunk: that chunk's part is missing, and a stale temporary lies around
    (parts / "part-00003.parquet").unlink()
    (tmp_path / ".hits.parquet.tmp").write_bytes(b"half-written")
    resumed = stream_screen(path, model, out, WINDOWS, chunk_size=500, progress=False)
    assert resumed.chunks_resumed == 3
    assert out.read_bytes() == first_bytes
    assert resumed.counts == first.counts and resumed.n_hits == first.n_hits
    assert not parts.exists() and not (tmp_path / ".hits.parquet.tmp").exists()
    again = stream_screen(path, model, out, WINDOWS, chunk_size=500, keep_parts=True, progress=False)
    assert again.chunks_resumed == 0 and out.read_bytes() == first_bytes
    # other settings never reuse the parts of these
    narrow = {"gt4": WINDOWS["gt4"]}
    other = stream_screen(path, model, out, narrow, chunk_size=500, progress=False)
    assert other.chunks_resumed == 0 and other.counts == {"gt4": first.counts["gt4"]}


def test_model_choice_in_an_oracle_folder(real, tmp_path):
    folder = tmp_path / "oracle"
    (folder / "deployed").mkdir(parents=True)
    real["forest"].save(folder / "deployed" / "forest.joblib")
    meta = {"kind": "forest", "path": "deployed/forest.joblib", "name": "forest-all-data", "others": {}}
    (folder / "oracle.json").write_text(json.dumps(meta))
    assert load_screening_model(folder).name == "forest-all-data"
    assert load_screening_model(folder, "forest").kind == "forest"
    with pytest.raises(StreamError, match="no deployed roost model; it has forest"):
        load_screening_model(folder, "roost")
    with pytest.raises(StreamError, match="model must be one of"):
        load_screening_model(folder, "svm")


def test_roost_ensemble_screens_like_its_own_predict(real, tmp_path):
    from agd.models.roost import train_ensemble

    pool = real["pool"]
    gaps = np.random.default_rng(1).uniform(0, 6, 200)
    cfg = RoostConfig(
        ensemble_size=2, epochs=2, batch_size=64, loss="l1", elem_fea_len=16, n_graph=1, elem_heads=1,
        cry_heads=1, hidden=16, trunk_hidden=[32], out_hidden=[16], patience=None, num_threads=1,
    )  # fmt: skip
    ensemble = train_ensemble(pool[:200], gaps, None, None, cfg, seed=0, progress=False)
    ensemble.save(tmp_path / "roost")
    path = candidate_file(tmp_path / "cand.parquet", pool, 1500, row_group=400)
    model = load_screening_model(tmp_path / "roost", "roost")
    window = {"mid": GapWindowConfig(low=2.0, high=4.0)}
    result = stream_screen(path, model, tmp_path / "hits.parquet", window, chunk_size=600, progress=False)
    direct = ensemble.predict(pq.read_table(path)["formula"].to_pylist())
    assert result.counts["mid"] == int(window_mask(direct.gaps, window["mid"]).sum())
    hits = pq.read_table(tmp_path / "hits.parquet").to_pandas()
    np.testing.assert_allclose(hits["predicted_gap"], direct.gaps[hits["row"]], rtol=1e-6)
    np.testing.assert_allclose(hits["predicted_std"], direct.std[hits["row"]], rtol=1e-5, atol=1e-7)


def test_cli_screens_and_refuses_an_unknown_window(real, tmp_path, capsys):
    path = candidate_file(tmp_path / "cand.parquet", real["pool"], 1000, row_group=400)
    out = tmp_path / "hits.parquet"
    common = ["screen-candidates", str(path), "--model-dir", str(real["forest_path"]), "--out", str(out)]
    summary = tmp_path / "summary.json"
    assert (
        main([*common, "--window", "gt6", "--chunk-size", "300", "--jobs", "1", "--metrics", str(summary)])
        == 0
    )
    written = json.loads(summary.read_text())
    assert written["n_rows"] == 1000 and list(written["counts"]) == ["gt6"]
    assert pq.read_table(out).num_rows == written["counts"]["gt6"]
    assert main([*common, "--window", "gt60"]) == 2
    assert "--window gt60" in capsys.readouterr().err
    assert main([*common, "--valid-only", "--novel-only"]) == 2  # the file has no 'novel' column
    assert "novel_only needs a 'novel' column" in capsys.readouterr().err


# -- memory cap ---------------------------------------------------------------------------------------

#: Runs in a fresh interpreter: load the model (and the Magpie tables), then cap the process's data
#: segment at what it holds now plus BUDGET and screen. RLIMIT_DATA, not RLIMIT_AS: the address-space
#: limit also counts reserved-but-unused mappings (thread stacks, malloc arenas, torch's reservations
#: when it is imported), which have nothing to do with how much the screen holds. Since Linux 4.7
#: RLIMIT_DATA covers brk and private writable mmaps, i.e. every numpy and Python allocation here.
_CAPPED = textwrap.dedent(
    """
    import json, resource, sys
    from agd.screening.stream import load_screening_model, stream_screen

    model_path, candidates, out, chunk, budget = sys.argv[1:6]
    model = load_screening_model(model_path, "forest", n_jobs=1)
    model.featurise(["NaCl"])  # builds the featuriser before the cap
    with open("/proc/self/status") as fh:
        held = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmData:"))
    resource.setrlimit(resource.RLIMIT_DATA, (held + int(budget), resource.RLIM_INFINITY))
    result = stream_screen(candidates, model, out, chunk_size=int(chunk), progress=False)
    print(json.dumps(result.counts))
    """
)
N_CAPPED = 300_000
#: Measured on 300,000 rows: chunks of 20,000 grow the data segment by ~130 MiB (parse cache, one chunk's
#: features and temporaries); the whole file at once by ~910 MiB (a 300,000 x 22 x 6 float64 block alone
#: is 302 MiB). 400 MiB leaves a 3x margin for the first and is less than half the second.
BUDGET = 400 * 2**20


def _run_capped(forest: Path, candidates: Path, out: Path, chunk: int) -> subprocess.CompletedProcess:
    # pyarrow's default jemalloc pool maps large writable extents up front (~1 GiB of VmData while
    # ~100 MiB is resident); the system allocator makes the data segment track what is really used
    env = {
        **os.environ,
        "ARROW_DEFAULT_MEMORY_POOL": "system",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    command = [sys.executable, "-c", _CAPPED, str(forest), str(candidates), str(out), str(chunk), str(BUDGET)]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA covers mmap on Linux only")
def test_streaming_fits_a_memory_cap_that_an_unchunked_screen_exceeds(real, tmp_path):
    candidates = candidate_file(tmp_path / "cand.parquet", real["pool"], N_CAPPED)
    streamed = _run_capped(real["forest_path"], candidates, tmp_path / "capped" / "hits.parquet", 20_000)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    model = load_screening_model(real["forest_path"], n_jobs=1)
    free = stream_screen(
        candidates, model, tmp_path / "free" / "hits.parquet", chunk_size=20_000, progress=False
    )
    assert json.loads(streamed.stdout.strip().splitlines()[-1]) == free.counts
    capped_hits = pq.read_table(tmp_path / "capped" / "hits.parquet")
    assert capped_hits.equals(pq.read_table(tmp_path / "free" / "hits.parquet"))
    assert capped_hits.num_rows > 0
    # the same screen with the whole file as one chunk must not fit: the cap can fail
    whole = _run_capped(real["forest_path"], candidates, tmp_path / "whole" / "hits.parquet", N_CAPPED)
    assert whole.returncode != 0
    assert "MemoryError" in whole.stderr, whole.stderr[-2000:]
    assert not (tmp_path / "whole" / "hits.parquet").exists()
