"""Team mode: a shared MLflow server that real stages log to over HTTP, and a DVC directory remote that
moves stage outputs into a fresh clone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError
from urllib.parse import quote, urlencode
from urllib.request import Request, urlopen

import numpy as np
import pandas as pd
import pytest
import yaml

from agd.tracking import server
from tests.conftest import REPO_ROOT, read_shared_csv

SERVER_START_S = 60
ACQ = {"n_random": 64, "n_local": 256, "local_centres": 10, "local_radius": (0.5, 1.5), "local_scale": 0.05, "n_refine": 4,
       "refine_maxiter": 10, "accept_chunk": 64, "max_extra_pools": 2}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the helper command, without a server
def test_loopback_hosts_pass_and_others_get_a_loud_warning():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert server.is_loopback(host) and server.exposure_warning(host, 5000) is None, host
    for host in ("0.0.0.0", "10.1.2.3", "::", "mlflow.example.org"):
        warning = server.exposure_warning(host, 5001)
        assert warning is not None and warning.startswith("WARNING") and f"{host}:5001" in warning, host
        assert "ssh -N -L 5001:127.0.0.1:5001" in warning


def test_server_command_pins_paths_and_turns_the_job_runner_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = server.server_command("127.0.0.1", 5123, "sqlite:///db/runs.db", "arts", extra=["--dev"])
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    flags = dict(zip(command[4:-1:2], command[5:-1:2], strict=True))
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "5123",
        "--backend-store-uri": "sqlite:///db/runs.db",
        "--artifacts-destination": str(tmp_path / "arts"),
        "--workers": "1",
    }
    assert command[-1] == "--dev"
    s3 = server.server_command("127.0.0.1", 1, "sqlite:///x.db", "s3://bucket/agd")
    assert s3[s3.index("--artifacts-destination") + 1] == "s3://bucket/agd"  # a URI is left alone
    with pytest.raises(ValueError, match="port 70000"):
        server.server_command("127.0.0.1", 70000, "sqlite:///x.db", "arts")
    assert server.server_env({})[server.JOB_EXECUTION_ENV] == "false"
    assert server.server_env({server.JOB_EXECUTION_ENV: "true"})[server.JOB_EXECUTION_ENV] == "true"
    server.prepare_locations("sqlite:///db/runs.db", "arts")
    assert (tmp_path / "db").is_dir() and (tmp_path / "arts").is_dir()


def test_tracking_server_dry_run_prints_the_raw_command_and_warns_for_open_hosts(capsys):
    from agd.cli import main

    assert main(["tracking-server", "--port", "5055", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert (
        out.startswith("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false ") and "--host 127.0.0.1 --port 5055" in out
    )
    assert "mlflow-server/mlflow.db" in out and err == ""
    assert main(["tracking-server", "--host", "0.0.0.0", "--dry-run", "--", "--app-name", "basic-auth"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("WARNING") and out.rstrip().endswith("--app-name basic-auth")


# ---------------------------------------------------------------------------------------------
# a live server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, payload: dict | None = None, timeout: float = 30) -> bytes:
    data = None if payload is None else json.dumps(payload).encode()
    request = Request(url, data=data, headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=timeout) as response:
        return response.read()


@contextlib.contextmanager
def _mlflow_server(folder: Path) -> Iterator[str]:
    """`agd tracking-server` on a free localhost port with its own store; yields the base URL."""
    port = _free_port()
    log = folder / "server.log"
    command = [
        sys.executable, "-m", "agd.cli", "tracking-server", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder / 'db.sqlite'}", "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "wb") as sink:
        # its own session, so the uvicorn child goes down with it
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(URLError, ConnectionError, TimeoutError):
                if _http(f"{base}/health", timeout=2).strip() == b"OK":
                    break
            if time.monotonic() > deadline:
                pytest.skip(
                    f"mlflow server did not answer on {base} within {SERVER_START_S} s (busy machine?)"
                )
            time.sleep(0.25)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class _Rest:
    """The few MLflow REST calls the test needs (what a colleague's script or the UI uses)."""

    def __init__(self, base: str) -> None:
        self.api = f"{base}/api/2.0/mlflow"

    def get(self, path: str, **query) -> dict:
        return json.loads(_http(f"{self.api}/{path}?{urlencode(query)}"))

    def experiment_id(self, name: str) -> str:
        return self.get("experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

    def runs(self, experiment: str, filter_string: str = "") -> list[dict]:
        body = {
            "experiment_ids": [self.experiment_id(experiment)],
            "filter": filter_string,
            "max_results": 1000,
        }
        runs = json.loads(_http(f"{self.api}/runs/search", body)).get("runs", [])
        for run in runs:  # tags as a plain mapping
            run["tags"] = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        return runs

    def steps(self, run_id: str, key: str) -> list[int]:
        history = self.get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
        return sorted(int(m.get("step", 0)) for m in history)


def test_stages_log_to_a_shared_server_and_runs_read_back_over_rest(campaign_models, shared_data, tmp_path):
    """Start the server, run `agd campaign` and `agd data prepare` against it, read everything back over REST."""
    work = tmp_path / "project"
    work.mkdir()
    params = {
        "tracking": {"uri": None},  # MLFLOW_TRACKING_URI decides
        "experiments": {
            "repeats": 2,
            "experiments": [{"name": "Exp2", "n_initial": 30, "budget": 10}],
            "kappa_sweep": [],
            "kappa_experiment": "Exp2",
            "kappa_repeats": 1,
            "campaign": {"batch_size": 5, "random_draws": 3000, "acquisition": ACQ},
        },
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    real = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv", nrows=40)
    raw = pd.DataFrame(
        {"row": np.arange(1, 41), "formula": real["composition"], "band_gap": real["band_gap"]}
    )
    raw.loc[39, "formula"] = "Xx2O"  # one reject, so rejects.csv has a row
    raw.to_parquet(work / "raw.parquet", index=False)

    with _mlflow_server(tmp_path) as base:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": base}
        agd = [sys.executable, "-m", "agd.cli", "--params", str(work / "params.yaml")]
        commands = (
            ["campaign", "Exp2-bo", "--prepared", str(campaign_models.prepared), "--autoencoder",
             str(campaign_models.autoencoder), "--oracle", str(campaign_models.oracle), "--out", "exp"],
            ["data", "prepare", "--raw", "raw.parquet", "--out-dir", "prepared", "--metrics", ""],
        )  # fmt: skip
        # two clients at once, as two colleagues would be
        procs = [
            subprocess.Popen(agd + args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for args in commands
        ]  # fmt: skip
        try:
            for args, proc in zip(commands, procs, strict=True):
                _, err = proc.communicate(timeout=240)
                assert proc.returncode == 0, f"agd {args[0]}: {err[-3000:]}"
        finally:
            for proc in procs:  # a failed or stuck client must not outlive the test
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        rest = _Rest(base)

        runs = rest.runs("agd-campaigns")
        parents = [r for r in runs if r["tags"].get("agd.role") == "campaign"]
        repeats = [r for r in runs if r["tags"].get("agd.role") == "repeat"]
        assert len(parents) == 1 and len(repeats) == 2
        parent = parents[0]["info"]["run_id"]
        assert parents[0]["tags"]["agd.campaign"] == "Exp2-bo"
        assert parents[0]["info"]["status"] == "FINISHED"
        for run in repeats:
            tags = run["tags"]
            assert tags["mlflow.parentRunId"] == parent
            assert (tags["experiment"], tags["method"], tags["agd.campaign"]) == ("Exp2", "bo", "Exp2-bo")
            assert tags["dataset_version"] and run["info"]["status"] == "FINISHED"
            state = pd.read_parquet(
                work / "exp" / "campaigns" / "Exp2-bo" / f"repeat-{int(tags['repeat']):02d}.parquet"
            )
            rounds = list(range(int(state["round"].max()) + 1))
            assert len(rounds) > 1  # the initial round and at least one suggestion round
            assert rest.steps(run["info"]["run_id"], "best_label") == rounds  # every round once, step = round
        assert {r["tags"]["repeat"] for r in repeats} == {"0", "1"}
        one = rest.runs("agd-campaigns", "tags.repeat = '1' and tags.`agd.role` = 'repeat'")
        assert [r["tags"]["repeat"] for r in one] == ["1"]  # the server filters

        # the prepare stage's artifacts went through the server into its artifact folder
        (prepare,) = rest.runs("agd-data")
        run_id = prepare["info"]["run_id"]
        assert prepare["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
        listed = rest.get("artifacts/list", run_id=run_id).get("files", [])
        assert {f["path"] for f in listed} >= {"summary.json", "rejects.csv"}
        metrics = {m["key"]: m["value"] for m in prepare["data"]["metrics"]}
        assert metrics["rejected"] == 1 and metrics["rows_in"] == 40
        local = (work / "prepared" / "rejects.csv").read_bytes()
        stored = list((tmp_path / "artifacts").rglob("rejects.csv"))
        assert len(stored) == 1 and stored[0].read_bytes() == local
        path = prepare["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/") + "/rejects.csv"
        assert _http(f"{base}/api/2.0/mlflow-artifacts/artifacts/{quote(path)}") == local

    # nothing went to a local store
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()


# ---------------------------------------------------------------------------------------------
# a DVC directory remote
def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_dvc_push_to_a_directory_remote_and_pull_into_a_fresh_clone(shared_data, tmp_path):
    """The project's real fetch and prepare stages: repro, push, clone, pull, byte-identical and up to date."""
    origin, remote, clone = tmp_path / "origin", tmp_path / "remote", tmp_path / "clone"
    stages = yaml.safe_load((REPO_ROOT / "pipelines" / "dvc.yaml").read_text())["stages"]
    (origin / "pipelines").mkdir(parents=True)
    (origin / "pipelines" / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {name: stages[name] for name in ("fetch", "prepare")}}, sort_keys=False)
    )
    for stage in ("fetch", "prepare"):  # the code files the stages depend on
        for dep in stages[stage]["deps"]:
            if dep.startswith("agd/"):
                (origin / dep).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO_ROOT / dep, origin / dep)
    params = yaml.safe_load((REPO_ROOT / "params.tiny.yaml").read_text())
    params["data"].update(source="local", path="tiny.csv")
    (origin / "params.yaml").write_text(yaml.safe_dump(params))
    read_shared_csv(shared_data / "mp_gap_agd_exp1.csv", nrows=60)[["composition", "band_gap"]].to_csv(
        origin / "tiny.csv", index=False
    )

    env = {k: v for k, v in os.environ.items() if k not in ("AGD_DATA", "MP_API_KEY")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # outside the repository
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "agd test", "GIT_AUTHOR_EMAIL": "test@agd.invalid",
        "GIT_COMMITTER_NAME": "agd test", "GIT_COMMITTER_EMAIL": "test@agd.invalid",
    }  # fmt: skip
    _run(["git", "init", "-q", "-b", "main"], origin, env)
    _run(["dvc", "init", "-q"], origin, env)
    _run(["dvc", "remote", "add", "-d", "store", str(remote)], origin, env)
    _run(["dvc", "repro", "pipelines/dvc.yaml"], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-q", "-m", "tiny pipeline"], origin, env)
    _run(["dvc", "push"], origin, env)

    # what DVC caches goes to the remote; cache: false outputs (metrics, source info) travel through git
    cached = ["data/raw/dataset.parquet", "data/prepared/dataset.parquet", "data/prepared/rejects.csv",
              "data/prepared/summary.json"]  # fmt: skip
    pushed = {p.parent.name + p.name for p in remote.rglob("*") if p.is_file()}
    assert pushed == {_md5(origin / path) for path in cached}
    assert "Everything is up to date" in _run(["dvc", "push"], origin, env)

    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not any((clone / path).exists() for path in cached)  # git alone does not bring the data
    assert (clone / "metrics" / "data.json").is_file()  # a cache: false output, committed to git
    _run(["dvc", "pull"], clone, env)
    for path in cached:
        assert (clone / path).read_bytes() == (origin / path).read_bytes(), path
    assert "Data and pipelines are up to date" in _run(["dvc", "status", "pipelines/dvc.yaml"], clone, env)
    assert "in sync" in _run(["dvc", "status", "--cloud"], clone, env)
