"""The Ray executor on a local Ray instance (2 CPUs): the same tables and MLflow histories as local runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from agd.executors import ExecutorError, LocalExecutor, make_executor
from tests.active.test_campaign import TIMING, _params
from tests.conftest import REPO_ROOT
from tests.screening.test_screen import TINY, inputs  # noqa: F401 - inputs is a fixture

ray = pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'agd[ray]'")

# the tiny screening config with Roost kept to two groups, and a window below 2 eV where the two-epoch
# Roost models put their predictions, so both model kinds' predictions cross the Ray boundary as hits
SCREEN_CFG = type(TINY).model_validate(
    TINY.model_dump()
    | {
        "limits": {"roost": {"repeats": 1, "training_sets": ["BS"]}},
        "windows": TINY.model_dump()["windows"] | {"lt2": {"low": None, "high": 2.0, "include_high": False}},
    }
)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs for this module (the executors reuse it and leave it running)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _square(x: int, offset: int) -> int:
    return x * x + offset


def test_map_keeps_input_order_and_reports_each_result(local_ray):
    seen: list[tuple[int, int]] = []
    executor = make_executor("ray")
    assert executor.kind == "ray"
    result = executor.map(_square, [3, 1, 2, 0], 10, on_result=lambda i, r: seen.append((i, r)))
    assert result == [19, 11, 14, 10]
    assert sorted(seen) == [(0, 19), (1, 11), (2, 14), (3, 10)]
    assert LocalExecutor().map(_square, [3, 1, 2, 0], 10) == result
    executor.close()
    assert ray.is_initialized()  # an executor never shuts down a Ray it did not start


def _fail_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("item 2 is bad")
    return x


def test_a_failing_task_raises_its_own_error(local_ray):
    with pytest.raises(ValueError, match="item 2 is bad"):
        make_executor("ray").map(_fail_on_two, [1, 2, 3])


def test_clear_errors_without_ray_or_without_a_cluster(monkeypatch, tmp_path, capsys):
    with pytest.raises(ExecutorError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(ExecutorError, match="--executor ray"):
        make_executor("local", address="10.0.0.1:6379")
    # the command line turns it into one line on stderr and exit code 2, before any work
    from agd.cli import main

    for name in ("prepared.parquet", "autoencoder", "oracle", "candidates.parquet"):
        (tmp_path / name).touch()
    args = ["--params", str(REPO_ROOT / "params.tiny.yaml"), "experiments", "--address", "10.0.0.1:6379"]
    args += [f"--{k}={tmp_path / v}" for k, v in (("prepared", "prepared.parquet"), ("autoencoder", "autoencoder"), ("oracle", "oracle"), ("candidates", "candidates.parquet"))]  # fmt: skip
    assert main(args) == 2
    assert "--address is for the ray executor" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when Ray is not installed
    with pytest.raises(ExecutorError, match=r"pip install 'agd\[ray\]'"):
        make_executor("ray")
    monkeypatch.undo()
    # a fresh process: nothing listens on the port, so the executor must say so at once
    code = (
        "import socket; from agd.executors import make_executor, ExecutorError\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "try:\n    make_executor('ray', address=f'127.0.0.1:{port}')\n"
        "except ExecutorError as exc:\n    print('ERR', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.startswith("ERR cannot reach the Ray cluster at 127.0.0.1:"), out.stdout + out.stderr
    assert "ray start --head" in out.stdout


# -- experiments ---------------------------------------------------------------------------------


def _histories(uri: str) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """Every repeat run's metric histories, timings left out (they measure the machine, not the campaign)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("agd-campaigns")
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        if run.data.tags.get("agd.role") != "repeat":
            continue
        keys = [k for k in run.data.metrics if k not in TIMING and k != "summary.seconds"]
        out[(run.data.tags["agd.campaign"], run.data.tags["repeat"])] = {
            k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys
        }
    return out


def test_experiments_on_ray_match_the_local_run(local_ray, campaign_models, tmp_path, monkeypatch):
    from agd.active.experiments import run_experiments

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = {}
    for kind in ("local", "ray"):
        folder = tmp_path / kind
        params = _params(folder, repeats=1)
        executor = make_executor(kind)
        args = (campaign_models.prepared, campaign_models.autoencoder, campaign_models.oracle, folder / "exp")
        summary = run_experiments(*args, params, progress=False, executor=executor)
        runs[kind] = (folder, summary)
    (local, local_summary), (remote, remote_summary) = runs["local"], runs["ray"]

    states = sorted(p.relative_to(local / "exp") for p in (local / "exp" / "campaigns").rglob("*.parquet"))
    assert len(states) == 4  # Exp2-bo, Exp2-random, kappa-0, kappa-10
    assert states == sorted(
        p.relative_to(remote / "exp") for p in (remote / "exp" / "campaigns").rglob("*.parquet")
    )
    for name in [*states, Path("samples.parquet")]:
        a = pd.read_parquet(local / "exp" / name).drop(columns=TIMING)
        b = pd.read_parquet(remote / "exp" / name).drop(columns=TIMING)
        assert a.drop(columns="latent").equals(b.drop(columns="latent")), name
        assert np.array_equal(np.stack(a["latent"].to_numpy()), np.stack(b["latent"].to_numpy())), name
    assert (local / "exp" / "training_sets.parquet").read_bytes() == (
        remote / "exp" / "training_sets.parquet"
    ).read_bytes()
    for summary in (local_summary, remote_summary):
        for item in summary["campaigns"].values():
            item.pop("seconds")
    assert local_summary == remote_summary

    local_hist = _histories(f"sqlite:///{local / 'mlflow.db'}")
    assert len(local_hist) == 4 and all(h["best_label"] for h in local_hist.values())
    assert _histories(f"sqlite:///{remote / 'mlflow.db'}") == local_hist

    # resumed on Ray with every campaign done: no table changes, no new MLflow steps
    before = {p: (remote / "exp" / p).read_bytes() for p in states}
    run_experiments(*args, _params(remote, repeats=1), progress=False, executor=make_executor("ray"))
    assert {p: (remote / "exp" / p).read_bytes() for p in states} == before
    assert _histories(f"sqlite:///{remote / 'mlflow.db'}") == local_hist

    # a campaign cut back to its first round (as a killed run leaves it) continues on Ray to the same table
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    state = remote / "exp" / "campaigns" / "Exp2-bo" / "repeat-00.parquet"
    whole = pq.read_table(state)
    pq.write_table(whole.filter(pc.less_equal(whole["round"], 1)), state)  # keeps the fingerprint metadata
    assert pq.read_table(state).num_rows < whole.num_rows
    run_experiments(*args, _params(remote, repeats=1), progress=False, executor=make_executor("ray"))
    a = pd.read_parquet(local / "exp" / state.relative_to(remote / "exp")).drop(columns=TIMING)
    b = pd.read_parquet(state).drop(columns=TIMING)
    assert a.drop(columns="latent").equals(b.drop(columns="latent"))
    assert _histories(f"sqlite:///{remote / 'mlflow.db'}") == local_hist  # no round logged twice


# -- screening -----------------------------------------------------------------------------------


def _screen_args(inputs, out: Path, params: Path, *extra: str) -> list[str]:  # noqa: F811
    return [
        "--params", str(params), "screen",
        "--training-sets", str(inputs["training_sets"]), "--candidates", str(inputs["candidates"]),
        "--prepared", str(inputs["prepared"]), "--oracle", str(inputs["oracle"]), "--out-dir", str(out),
        "--metrics", str(out / "screening.json"), "--report", str(out / "table1.md"), "--no-mlflow", *extra,
    ]  # fmt: skip


def test_screening_on_ray_matches_the_local_run(local_ray, inputs, tmp_path):  # noqa: F811
    from agd.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"screening": SCREEN_CFG.model_dump()}, sort_keys=False))
    assert main(_screen_args(inputs, tmp_path / "local", params)) == 0
    assert main(_screen_args(inputs, tmp_path / "ray", params, "--executor", "ray")) == 0

    for name in ("metrics.parquet", "hits.parquet", "table1.parquet"):
        a = pd.read_parquet(tmp_path / "local" / name)
        pd.testing.assert_frame_equal(a, pd.read_parquet(tmp_path / "ray" / name), check_exact=True)
    hits = pd.read_parquet(tmp_path / "local" / "hits.parquet")
    assert set(hits["model"]) == {"forest", "roost"} and set(hits["gap_window"]) >= {"2-4", "lt2"}
    parts = list((tmp_path / "local" / "state" / "oracle").rglob("part-*.parquet"))
    assert len(parts) >= 3  # several parts, so the merge order matters
    for name in ("summary.json", "screening.json"):
        local = json.loads((tmp_path / "local" / name).read_text())
        assert json.loads((tmp_path / "ray" / name).read_text()) == local
    assert (tmp_path / "local" / "table1.md").read_text() == (tmp_path / "ray" / "table1.md").read_text()


def test_local_runs_never_import_ray(inputs, tmp_path):  # noqa: F811
    """`agd screen` with the default executor, in a fresh process: Ray must not be imported."""
    forest_only = SCREEN_CFG.model_copy(update={"models": ["forest"]})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"screening": forest_only.model_dump()}, sort_keys=False))
    args = _screen_args(inputs, tmp_path / "out", params)
    code = (
        "import sys; from agd.cli import main\n"
        f"assert main({args!r}) == 0\n"
        "print('RAY_IMPORTED' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'NO_RAY')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("NO_RAY"), out.stdout[-500:]
    assert (tmp_path / "out" / "hits.parquet").is_file()
