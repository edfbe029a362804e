"""Shown instead of the data pages when the catalog is missing, unreadable or empty."""

import streamlit as st

from dashboard import data, ui

status = ui.catalog_status()
st.title("No catalog data yet")
st.error(status.message())
st.markdown(
    f"""
**How to get data into the dashboard**

1. From the project root, run the pipeline: `{data.BUILD_COMMAND}`
   (or a single stage, then `agd catalog` to load its outputs into `{status.path.name}`).
2. To browse another catalog, start the dashboard with `AGD_CATALOG=/path/to/agd.duckdb streamlit run dashboard/app.py`.
3. Reload this page.
"""
)
