"""agd dashboard: `streamlit run dashboard/app.py` from the project root (binds to 127.0.0.1, see .streamlit/).

The catalog comes from AGD_CATALOG or params.yaml's catalog.path; MLflow from MLFLOW_TRACKING_URI or
params.yaml's tracking.uri. Without a readable, non-empty catalog only the explanation and the run
status are offered.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the project root
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import duckdb  # noqa: E402
import streamlit as st  # noqa: E402

from agd.tracking.catalog import CatalogError  # noqa: E402
from dashboard import ui  # noqa: E402

st.set_page_config(page_title="agd dashboard", page_icon=":material/science:", layout="wide")

# No MLflow warm-up in the background here: the Campaigns page reads MLflow only when its MLflow tab is
# opened, and a warm-up thread holding the GIL slowed the first pages' loads by about 1 s with the
# pipeline's 290 runs (README, dashboard load times).
status = ui.catalog_status()
run_status = st.Page("views/run_status.py", title="Run status", icon=":material/build:", url_path="status")
if status.ok:
    pages = [
        st.Page(
            "views/experiments.py",
            title="Experiments",
            icon=":material/bar_chart:",
            url_path="experiments",
            default=True,
        ),
        st.Page("views/campaigns.py", title="Campaigns", icon=":material/show_chart:", url_path="campaigns"),
        st.Page(
            "views/design_space.py",
            title="Design space",
            icon=":material/scatter_plot:",
            url_path="design_space",
        ),
        st.Page(
            "views/candidates.py", title="Candidates", icon=":material/table_view:", url_path="candidates"
        ),
        run_status,
    ]
else:
    pages = [
        st.Page(
            "views/no_catalog.py",
            title="No catalog",
            icon=":material/warning:",
            url_path="setup",
            default=True,
        ),
        run_status,
    ]
try:
    st.navigation(pages).run()
except (CatalogError, duckdb.Error) as exc:
    # e.g. the catalog was replaced by one of another schema while the page ran
    st.error(f"Reading the catalog failed: {exc}. Rebuild it with `agd catalog`, then reload the page.")
