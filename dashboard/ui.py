"""Streamlit helpers shared by the pages: settings, catalog guard, and query caching."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard import data


def settings() -> data.Settings:
    """Settings read afresh on every run (cheap), so a changed AGD_CATALOG or params.yaml takes effect."""
    return data.load_settings()


@st.cache_resource(show_spinner=False)
def warm_mlflow(uri: str, delay_s: float = 1.5) -> threading.Thread:
    """Once per server and tracking URI: import mlflow and open its store in a background thread.

    On a fresh server the Campaigns page otherwise pays about 2 s for that (1.2 s of imports, 0.9 s for
    the store's first query) before its MLflow table appears. The delay lets the first page's own script
    run first on a 2-core machine. Anything that fails here fails again, visibly, on the page.
    """

    def warm() -> None:
        time.sleep(delay_s)
        data.mlflow_runs(uri)

    thread = threading.Thread(target=warm, name="agd-warm-mlflow", daemon=True)
    thread.start()
    return thread


@st.cache_data(show_spinner=False, max_entries=8, ttl=30)
def _catalog_status(db: str, version: int) -> data.CatalogStatus:
    return data.catalog_status(Path(db))


def catalog_status() -> data.CatalogStatus:
    """Row counts of the catalog in force, re-read whenever the file changes."""
    db = settings().catalog
    return _catalog_status(str(db), data.catalog_version(db))


@st.cache_data(show_spinner=False, max_entries=256)
def _cached(name: str, db: str, version: int, args: tuple, kwargs: tuple) -> Any:
    return getattr(data, name)(Path(db), *args, **dict(kwargs))


def query(name: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``dashboard.data.<name>(catalog, *args, **kwargs)``, cached until the catalog file changes."""
    db = settings().catalog
    return _cached(name, str(db), data.catalog_version(db), args, tuple(sorted(kwargs.items())))


def require_table(table: str) -> None:
    """Stop the page with a clear message when ``table`` is empty."""
    status = catalog_status()
    if status.error:
        st.error(status.message())
        st.stop()
    if not status.counts.get(table):
        st.info(data.empty_table_message(table))
        st.stop()


def caption_catalog() -> None:
    """Say which catalog the page reads."""
    st.caption(f"Catalog: `{settings().catalog}`")
