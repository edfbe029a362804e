"""A small synthetic catalog built with the real build_catalog, and an AppTest factory pointed at it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from agd.config import DesignMapConfig
from dashboard.synthetic import synthetic_tables, write_synthetic_catalog

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.fixture(scope="session")
def fixture_tables() -> dict[str, pd.DataFrame]:
    """The tables loaded into the fixture catalog (the tests compute expected values from these)."""
    return synthetic_tables(seed=7)


@pytest.fixture(scope="session")
def fixture_catalog(
    tmp_path_factory: pytest.TempPathFactory, fixture_tables: dict[str, pd.DataFrame]
) -> Path:
    """A DuckDB catalog built by build_catalog from parquet files of the fixture tables.

    Like the pipeline's catalog stage it embeds the design-space map, here of the dashboard's default
    settings (1,000 points, perplexity 30), so the page's first view reads it and other settings embed live.
    """
    folder = tmp_path_factory.mktemp("catalog")
    db = folder / "agd.duckdb"
    counts = write_synthetic_catalog(
        db, folder / "parquet", fixture_tables, design_map=DesignMapConfig(n_points=1000, perplexity=30)
    )
    n_map = counts.pop("design_map")
    assert counts == {name: len(frame) for name, frame in fixture_tables.items()}
    assert n_map > 0
    return db


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fixture_catalog: Path) -> Path:
    """Point the dashboard at the fixture catalog and at an MLflow store that does not exist yet."""
    monkeypatch.setenv("AGD_CATALOG", str(fixture_catalog))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-mlflow.db'}")
    monkeypatch.delenv("AGD_DVC_FILE", raising=False)
    return fixture_catalog


def make_app():
    """A fresh AppTest of the dashboard (imported lazily: streamlit's testing module is slow to import)."""
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(APP), default_timeout=120)
