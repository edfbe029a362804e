"""MLflow conventions: where runs are stored, how runs are named, how params are flattened.

The default store is SQLite at the project root (``sqlite:///<root>/mlflow.db``) with artifacts in
``<root>/mlruns``; ``MLFLOW_TRACKING_URI`` overrides both the default and params.yaml.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agd.config import TrackingConfig, find_project_root

#: Keys whose values are never sent to MLflow, whatever section they appear in.
_SECRET_MARKERS = ("api_key", "apikey", "token", "password", "secret")


def tracking_uri(cfg: TrackingConfig | None = None, root: Path | None = None) -> str:
    """The tracking URI in force: MLFLOW_TRACKING_URI, else params' tracking.uri, else SQLite at the root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg is not None and cfg.uri:
        return cfg.uri
    root = root or find_project_root()
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> flat ``a.b.c`` keys with string values; secrets are dropped."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if any(marker in str(key).lower() for marker in _SECRET_MARKERS):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= 6000 else text[:5997] + "..."
    return flat


def _experiment_id(client, name: str, root: Path) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    uri = client.tracking_uri if hasattr(client, "tracking_uri") else ""
    # A local store keeps artifacts beside the database, not wherever the process happens to run.
    location = (root / "mlruns").resolve().as_uri() if str(uri).startswith("sqlite") else None
    return client.create_experiment(name, artifact_location=location)


@contextmanager
def stage_run(
    stage: str,
    cfg: TrackingConfig | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> Iterator[Any]:
    """Open an MLflow run for one pipeline stage in the experiment ``<prefix>-<stage>``.

    The active run is yielded; params are flattened and logged on entry; the run is closed as
    FAILED if the body raises.
    """
    import mlflow  # slow import: only when a stage actually logs

    root = find_project_root()
    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    prefix = cfg.experiment_prefix if cfg is not None else "agd"
    client = mlflow.MlflowClient(uri)
    experiment_id = _experiment_id(client, f"{prefix}-{stage}", root)
    all_tags = {"agd.stage": stage, **(tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or stage, tags=all_tags) as run:
        if params:
            flat = flatten_params(params)
            items = list(flat.items())
            for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[start : start + 100]))
        yield run


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric leaves of a nested mapping to the active run (``a.b`` keys)."""
    import mlflow

    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, bool):
            flat[prefix.rstrip(".")] = float(value)
        elif isinstance(value, int | float):
            flat[prefix.rstrip(".")] = float(value)

    walk("", metrics)
    if flat:
        mlflow.log_metrics(flat, step=step)
