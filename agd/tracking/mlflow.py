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
    from agd.environment import environment_tags

    all_tags = {"agd.stage": stage, **environment_tags(), **(tags or {})}
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


def _quote_value(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class CampaignTracker:
    """MLflow for campaigns: a parent run per campaign, a nested run per repeat, metrics with step=round.

    Runs are found again by their tags (campaign, repeat and a fingerprint of the settings), so a
    resumed campaign keeps logging into the runs it started, and ``sync`` logs only the rounds a run
    has not seen yet: no duplicate steps, whatever point the previous process was killed at.
    Everything goes through ``MlflowClient`` with explicit run ids, never the process-global active run.
    """

    def __init__(
        self,
        cfg: TrackingConfig | None = None,
        experiment: str = "campaigns",
        tags: Mapping[str, str] | None = None,
        root: Path | None = None,
    ) -> None:
        import mlflow

        root = root or find_project_root()
        self.uri = tracking_uri(cfg, root)
        self.client = mlflow.MlflowClient(self.uri)
        prefix = cfg.experiment_prefix if cfg is not None else "agd"
        self.experiment_id = _experiment_id(self.client, f"{prefix}-{experiment}", root)
        self.tags = {"agd.stage": experiment, **(tags or {})}
        self._parents: dict[tuple[str, str], str] = {}

    def _find(self, tags: Mapping[str, str]) -> str | None:
        query = " and ".join(f"tags.`{k}` = {_quote_value(v)}" for k, v in tags.items())
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time ASC"]
        )
        return runs[0].info.run_id if runs else None

    def _run(self, tags: Mapping[str, str], name: str, params: Mapping[str, Any] | None) -> str:
        run_id = self._find(tags)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        from agd.environment import environment_tags

        run = self.client.create_run(
            self.experiment_id, tags={**self.tags, **environment_tags(), **tags}, run_name=name
        )
        if params:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in flatten_params(params).items()]
            for start in range(0, len(items), 100):
                self.client.log_batch(run.info.run_id, params=items[start : start + 100])
        return run.info.run_id

    def parent(self, campaign: str, settings: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
        """The campaign's parent run (created once per campaign name and settings fingerprint)."""
        key = (campaign, settings)
        if key not in self._parents:
            self._parents[key] = self._run(
                {"agd.campaign": campaign, "agd.role": "campaign", "agd.settings": settings, **tags},
                campaign,
                params,
            )
        return self._parents[key]

    def repeat(
        self, parent_id: str, campaign: str, repeat: int, fingerprint: str, tags: Mapping[str, str]
    ) -> str:
        """The nested run of one repeat."""
        return self._run(
            {
                "agd.campaign": campaign,
                "agd.role": "repeat",
                "repeat": str(repeat),
                "agd.fingerprint": fingerprint,
                "mlflow.parentRunId": parent_id,
                **tags,
            },
            f"{campaign}-r{repeat}",
            None,
        )

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """Steps already logged for a metric of a run."""
        return set(self.logged_values(run_id, key))

    def logged_values(self, run_id: str, key: str) -> dict[int, float]:
        """A metric's value at each step already logged for a run (the last one logged, per step)."""
        history = sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        return {m.step: m.value for m in history}

    def supersede(self, run_id: str, why: str) -> None:
        """Retire a run whose rounds belong to a state table that no longer exists (a campaign started
        afresh under other models): its fingerprint tag no longer finds it, and it says why."""
        fingerprint = self.client.get_run(run_id).data.tags.get("agd.fingerprint", "")
        self.client.set_tag(run_id, "agd.fingerprint", f"{fingerprint}~superseded")
        self.client.set_tag(run_id, "agd.superseded", why)
        self.client.set_terminated(run_id, status="KILLED")

    def log_step(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log one step's metrics in a single batch."""
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start : start + 1000])

    def finish(
        self, run_id: str, metrics: Mapping[str, float] | None = None, status: str = "FINISHED"
    ) -> None:
        """Log final metrics (no step) and close the run."""
        if metrics:
            # a resumed run logs its totals once, and again only those that changed (a campaign restarted)
            seen = self.client.get_run(run_id).data.metrics
            self.log_step(run_id, {k: v for k, v in metrics.items() if seen.get(k) != float(v)}, 0)
        self.client.set_terminated(run_id, status=status)
