"""Streamlit helpers shared by the pages: settings, catalog guard, and query caching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from dashboard import data


def settings() -> data.Settings:
    """Settings read afresh on every run (cheap), so a changed AGD_CATALOG or params.yaml takes effect."""
    return data.load_settings()


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
