"""A shared MLflow tracking server for a team: the ``mlflow server`` command line with safe defaults.

``agd tracking-server`` builds the command and replaces itself with it (``exec``), so signals reach MLflow
directly. What it adds over typing ``mlflow server`` by hand:

- it binds to 127.0.0.1 unless told otherwise and warns loudly for any other address: the server has no
  authentication, so colleagues should reach it through an ssh tunnel;
- the run database and the artifacts live in one folder of their own (``mlflow-server/`` at the project
  root), apart from the local ``mlflow.db`` whose experiments point their artifacts at local paths that
  a colleague's machine cannot write;
- it switches off MLflow's background job runner (GenAI scoring, evaluation and trace maintenance; we
  log no traces), which starts eight extra processes and costs tens of seconds at start-up on a small machine.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

#: The folder (under the project root) of the server's own run database and artifact store.
SERVER_DIR = "mlflow-server"

#: Environment switch of MLflow's job runner; "false" unless the caller set it already.
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure_warning(host: str, port: int) -> str | None:
    """The warning to print for a non-loopback bind address, or None for a loopback one."""
    if is_loopback(host):
        return None
    return (
        f"WARNING: the MLflow server will listen on {host}:{port}. Without --app-name basic-auth it has\n"
        "no authentication: anyone who can reach that address can read, change and delete every run and\n"
        f"artifact. Prefer --host 127.0.0.1 and an ssh tunnel for colleagues:\n"
        f"    ssh -N -L {port}:127.0.0.1:{port} you@this-machine\n"
        "If you must expose it, pass MLflow's own protection after '--', e.g.\n"
        "    -- --app-name basic-auth --allowed-hosts NAME:PORT"
    )


def default_paths(root: Path) -> tuple[str, str]:
    """The default backend store URI and artifact folder for a server run from ``root``."""
    folder = (root / SERVER_DIR).resolve()
    return f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")


def _is_uri(location: str) -> bool:
    return "://" in location or location.startswith("mlflow-artifacts:")


def server_command(
    host: str,
    port: int,
    backend_store_uri: str,
    artifacts_destination: str,
    workers: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``mlflow server`` argument list (run with this interpreter, so the project's MLflow serves)."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not in 1..65535")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    destination = artifacts_destination
    if not _is_uri(destination):  # absolute, so the printed command means the same from any folder
        destination = str(Path(destination).expanduser().resolve())
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", destination,
        "--workers", str(workers),
        *extra,
    ]  # fmt: skip


def server_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``base`` (default os.environ) with the job runner off unless set."""
    env = dict(os.environ if base is None else base)
    env.setdefault(JOB_EXECUTION_ENV, "false")
    return env


def prepare_locations(backend_store_uri: str, artifacts_destination: str) -> None:
    """Create the folders a SQLite store and a local artifact folder need (MLflow does not)."""
    if backend_store_uri.startswith("sqlite:///"):
        database = Path(backend_store_uri.removeprefix("sqlite:///"))
        if not database.is_absolute():
            database = Path.cwd() / database
        database.parent.mkdir(parents=True, exist_ok=True)
    if not _is_uri(artifacts_destination):
        Path(artifacts_destination).expanduser().mkdir(parents=True, exist_ok=True)


def exec_server(command: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process with the server (Ctrl-C and kill then reach MLflow itself)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], list(command), dict(env))


def describe(command: Sequence[str], env: Mapping[str, str]) -> str:
    """The command as one shell line, with the environment switch it depends on."""
    switch = f"{JOB_EXECUTION_ENV}={env[JOB_EXECUTION_ENV]} " if JOB_EXECUTION_ENV in env else ""
    return switch + shlex.join(command)
